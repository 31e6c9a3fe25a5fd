"""Client side of a peer's methods (swarmlm.experts.protocol), over the client's Dialer (swarmlm.transport), run on
the client's event loop."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Awaitable, Optional, TypeVar

import torch
from hivemind.proto import runtime_pb2

from swarmlm.errors import RemotePeerError, RequestError
from swarmlm.experts.protocol import (
    BACKWARD,
    FORWARD,
    INFERENCE,
    INFO,
    InferenceStep,
    PeerInfo,
    PushTarget,
    SpanRequest,
    StepResult,
    check_response,
    deserialize_tensor,
    pack,
    serialize_all,
    unpack,
)
from swarmlm.transport import Channel, ChannelClosedError, Dialer

T = TypeVar("T")
logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 2**32  # an answer frame longer than this is refused before it is read (float32 hidden states of
# 16384 tokens x 65536 hidden; a peer's answers are as large as the requests it accepts)


def _inputs(hidden, position_ids, attention_mask, grad=None, prompts=None) -> list[torch.Tensor]:
    tensors = [hidden] + ([grad] if grad is not None else []) + [position_ids]
    tensors += [attention_mask] if attention_mask is not None else []
    return tensors + ([prompts.detach()] if prompts is not None else [])


async def call_peer(peer_id: str, call: Awaitable[T], timeout: float, timeout_message: str, what: str = "") -> T:
    """Awaits `call` (a request to `peer_id`) for at most `timeout` s; every failure becomes RemotePeerError:
    a timeout says `timeout_message`, anything else "`what`ExceptionType: message"."""
    try:
        return await asyncio.wait_for(call, timeout)
    except RemotePeerError:
        raise
    except asyncio.TimeoutError:
        raise RemotePeerError(peer_id, timeout_message) from None
    except Exception as e:
        raise RemotePeerError(peer_id, f"{what}{type(e).__name__}: {e}") from e


async def _unary_stream_call(dialer: Dialer, peer_id: str, method: str, request: runtime_pb2.ExpertRequest,
                             timeout: float) -> list[torch.Tensor]:
    async def call():
        async with dialer.answers(peer_id, method, request, runtime_pb2.ExpertResponse) as stream:
            async for response in stream:
                return [deserialize_tensor(t) for t in check_response(peer_id, response).tensors]
        raise RemotePeerError(peer_id, "closed the stream without an answer")

    return await call_peer(peer_id, call(), timeout, f"no answer within {timeout} s")


async def call_forward(dialer: Dialer, peer_id, span: SpanRequest, hidden, position_ids, attention_mask, timeout,
                       prompts=None) -> torch.Tensor:
    """-> the span's output; `prompts` [blocks, span.prompt_tokens, hidden] are deep prompts for its blocks."""
    request = runtime_pb2.ExpertRequest(
        tensors=serialize_all(_inputs(hidden, position_ids, attention_mask, prompts=prompts)), metadata=pack(span)
    )
    return (await _unary_stream_call(dialer, peer_id, FORWARD, request, timeout))[0]


async def call_backward(dialer: Dialer, peer_id, span: SpanRequest, hidden, grad, position_ids, attention_mask, timeout,
                        prompts=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (grad of hidden, grad of prompts or None)."""
    request = runtime_pb2.ExpertRequest(
        tensors=serialize_all(_inputs(hidden, position_ids, attention_mask, grad, prompts)), metadata=pack(span)
    )
    grads = await _unary_stream_call(dialer, peer_id, BACKWARD, request, timeout)
    if len(grads) != (2 if prompts is not None else 1):
        raise RemotePeerError(peer_id, f"answered a backward call with {len(grads)} tensors")
    return grads[0], (grads[1] if prompts is not None else None)


async def call_info(dialer: Dialer, peer_id: str, timeout: float) -> PeerInfo:
    """The peer's live state (rpc_info); also a round-trip probe. Raises RemotePeerError on failure."""
    async def call():
        response = await dialer.call(peer_id, INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
        return unpack(check_response(peer_id, response).metadata, PeerInfo)

    return await call_peer(peer_id, call(), timeout, f"no answer to a probe within {timeout} s", "probe failed: ")


class InferenceStream:
    """One open inference session with one peer (one hop of a route), on a channel (swarmlm.transport): a direct
    connection at `direct_address` if given (where the peer said it serves them, see RemoteSequential.probe),
    else a p2p stream. Each message is written as it is sent (one frame, one write, no writer task) and
    answers are read as they come."""

    def __init__(self, peer_id: str, span: SpanRequest, direct_address: Optional[str] = None,
                 push_from: Optional[str] = None):
        self.peer_id, self.direct_address = peer_id, direct_address
        # the session takes steps pushed by the peer `push_from` (the route's previous hop), under its random id
        self.span = span.model_copy(update=dict(session_id=secrets.token_hex(16), push_from=push_from))
        self.push_target = PushTarget(peer_id=peer_id, session_id=self.span.session_id)
        self._channel: Optional[Channel] = None
        self._opened = False
        self._last_step_id = 0  # of step()

    @property
    def direct(self) -> bool:
        """Whether the session runs on a direct connection."""
        return self._channel is not None and self._channel.direct

    async def open(self, dialer: Dialer, direct: bool = True) -> None:
        """Sends the session request, over the peer's direct address if it has one and `direct` (falling back to
        p2p if that fails); its answer is read with the first step (no extra round trip)."""
        try:
            self._channel = await dialer.open(self.peer_id, INFERENCE, self.direct_address if direct else None)
        except Exception as e:
            raise RemotePeerError(self.peer_id, f"cannot open a session: {type(e).__name__}: {e}") from e
        self._send(runtime_pb2.ExpertRequest(metadata=pack(self.span)))

    async def open_direct(self, dialer: Dialer) -> bool:
        """Opens the session on the peer's direct address; False (logged) if it has none or that fails."""
        if self.direct_address is None:
            return False
        self._channel = await dialer.open_direct(self.peer_id, INFERENCE, self.direct_address)
        if self._channel is None:
            return False
        self._send(runtime_pb2.ExpertRequest(metadata=pack(self.span)))
        return True

    async def open_p2p(self, dialer: Dialer) -> None:
        """Opens the session on a p2p stream; RemotePeerError if that fails."""
        try:
            self._channel = await dialer.open_p2p(self.peer_id, INFERENCE)
        except Exception as e:
            raise RemotePeerError(self.peer_id, f"cannot open a session: {type(e).__name__}: {e}") from e
        self._send(runtime_pb2.ExpertRequest(metadata=pack(self.span)))

    def _send(self, request: runtime_pb2.ExpertRequest) -> None:
        if self._channel is None:
            raise RemotePeerError(self.peer_id, "the session is not open")
        try:
            self._channel.send(request)
        except ChannelClosedError:
            raise RemotePeerError(self.peer_id, "the session's stream is closed") from None

    @property
    def opened(self) -> bool:
        """Whether the peer has accepted the session (its answer to open() was read)."""
        return self._opened

    async def step(self, position: int, hidden, position_ids, mask_chunk, timeout: float, prompts=None) -> torch.Tensor:
        """send + receive of one step (for callers that do not push): returns the output."""
        self._last_step_id += 1
        self.send(self._last_step_id, position, hidden, position_ids, mask_chunk, prompts)
        return (await self.receive(self._last_step_id, timeout))[0]

    def send(self, step_id: int, position: int, hidden, position_ids, mask_chunk, prompts=None,
             push_to: Optional[list[PushTarget]] = None) -> None:
        """Sends new tokens (and, at position 0, optional deep prompts [blocks, n, hidden]); the peer also
        pushes its output on to `push_to` (the route's next peers); the answer is read by `receive`."""
        prompt_tokens = prompts.shape[1] if prompts is not None else 0
        self._send(runtime_pb2.ExpertRequest(
            tensors=serialize_all(_inputs(hidden, position_ids, mask_chunk, prompts=prompts)),
            metadata=pack(InferenceStep(position=position, prompt_tokens=prompt_tokens, step_id=step_id, push_to=push_to or [])),
        ))

    async def receive(self, step_id: int, timeout: float) -> tuple[torch.Tensor, bool]:
        """-> (the output of step `step_id`, whether the peer pushed it on); answers of other steps (left
        over from a step that was sent twice after a failure) are skipped."""
        try:
            async with asyncio.timeout(timeout):  # no task per read, unlike wait_for (this is on every token's path)
                await self._channel.drain()  # returns at once unless much is still unsent
                if not self._opened:
                    await self._next()  # the answer to open()
                    self._opened = True
                while True:
                    response = await self._next()
                    result = unpack(response.metadata, StepResult)
                    if result.step_id == step_id:
                        break
        except RemotePeerError:
            raise
        except asyncio.TimeoutError:
            raise RemotePeerError(self.peer_id, f"no answer within {timeout} s") from None
        except Exception as e:
            raise RemotePeerError(self.peer_id, f"{type(e).__name__}: {e}") from e
        if len(response.tensors) != 1:
            raise RemotePeerError(self.peer_id, f"answered an inference step with {len(response.tensors)} tensors")
        try:
            return deserialize_tensor(response.tensors[0]), result.pushed
        except Exception as e:
            raise RemotePeerError(self.peer_id, f"answered an unreadable tensor ({type(e).__name__}: {e})") from e

    async def _next(self) -> runtime_pb2.ExpertResponse:
        try:
            response = await self._channel.receive(runtime_pb2.ExpertResponse, MAX_ANSWER_BYTES)
        except RequestError as e:
            raise RemotePeerError(self.peer_id, f"session failed: {e}") from None
        if response is None:
            raise RemotePeerError(self.peer_id, "closed the session")
        return check_response(self.peer_id, response)

    def close(self) -> None:
        """Ends the session: the peer sees the end of our stream (and frees the session's cache)."""
        if self._channel is not None:
            self._channel.end()
