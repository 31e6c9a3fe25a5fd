"""InferenceSession: a sequence whose KV caches live on the peers of one route."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import torch

from swarmlm.client.rpc import InferenceStream
from swarmlm.client.swarm import RemoteSequential
from swarmlm.errors import SwarmError

logger = logging.getLogger(__name__)


class InferenceSession:
    """Opens one inference stream per hop on first use; `step()` runs new tokens through all of them.

    Also keeps the token-level state that lets several `generate(..., session=...)` calls continue
    one sequence: `output_ids` (every token so far, the last one not yet fed) and its attention mask.
    """

    def __init__(self, remote: RemoteSequential, max_length: int):
        self.remote, self.max_length = remote, max_length
        self.position = 0  # tokens every peer of the route holds
        self.output_ids: Optional[torch.Tensor] = None  # [batch, n] all tokens of the sequence so far
        self.output_mask: Optional[torch.Tensor] = None  # [batch, n] attention mask of output_ids
        self.route: list = []
        self._streams: list[InferenceStream] = []
        self._batch: Optional[int] = None
        self.closed = False

    def _open(self, batch: int) -> None:
        self._batch = batch
        self.route = self.remote.manager.make_route()
        self._streams = [
            InferenceStream(hop.peer_id, self.remote.span_request(hop, max_length=self.max_length, batch_size=batch))
            for hop in self.route
        ]
        logger.info("Route: " + " -> ".join(f"{s.peer_id[-6:]}[{s.span.start}:{s.span.end}]" for s in self._streams))
        self.remote.loop.run(self._open_all(), timeout=self.remote.config.session_open_timeout)

    async def _open_all(self) -> None:
        await asyncio.gather(*(stream.open(self.remote.p2p) for stream in self._streams))

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask_chunk: Optional[torch.Tensor]) -> torch.Tensor:
        """Runs [batch, seq, hidden] new tokens through the route; returns the last block's output."""
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, seq = hidden.shape[:2]
        if self.position + seq > self.max_length:
            raise SwarmError(
                f"the session would hold {self.position + seq} tokens, beyond its max_length={self.max_length}; "
                f"open it with a larger max_length"
            )
        if self._batch is None:
            self._open(batch)
        elif batch != self._batch:
            raise SwarmError(f"this session has batch size {self._batch}, got {batch}")
        output = self.remote.loop.run(self._step(hidden, position_ids, mask_chunk))
        self.position += seq
        return output.to(hidden.dtype)

    async def _step(self, hidden, position_ids, mask_chunk) -> torch.Tensor:
        timeout = self.remote.config.request_timeout
        for stream in self._streams:
            hidden = await stream.step(self.position, hidden, position_ids, mask_chunk, timeout)
        return hidden

    def describe_route(self) -> list[tuple[str, int, int]]:
        return [(s.peer_id, s.span.start, s.span.end) for s in self._streams]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self._streams:
            self.remote.loop.loop.call_soon_threadsafe(stream.close)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
