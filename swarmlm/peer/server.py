"""The volunteer peer: load a span of blocks, serve it over P2P, announce it in the DHT.

Lifecycle: `Peer(config)` does no I/O; `start()` joins the DHT, picks and loads blocks, serves
and announces ONLINE; `shutdown()` stops taking sessions, announces OFFLINE, lets running steps
finish (bounded) and stops.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import hivemind
import torch
from hivemind.utils import get_dht_time
from transformers import AutoConfig

from swarmlm import __version__
from swarmlm.dht.records import ServerRecord, ServerState, record_expiration
from swarmlm.dht.node import create_dht, shutdown_dht
from swarmlm.dht.registry import declare_span, fetch_block_records, make_validators
from swarmlm.experts.families import family_for_config
from swarmlm.experts.span import BlockSpan
from swarmlm.models.checkpoint import load_tensors, resolve_model
from swarmlm.peer.block_selection import block_throughputs, choose_span
from swarmlm.peer.cache_budget import CacheBudget
from swarmlm.peer.config import PeerConfig
from swarmlm.peer.handler import Limits, SpanHandler
from swarmlm.peer.throughput import measure_throughput
from swarmlm.utils.aio import LoopThread

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Peer:
    def __init__(self, config: PeerConfig):
        self.config = config
        self.dht: Optional[hivemind.DHT] = None
        self.handler: Optional[SpanHandler] = None
        self.span: Optional[BlockSpan] = None
        self.model_name: Optional[str] = None
        self.throughput = 0.0
        self._validators = make_validators()
        self._loop: Optional[LoopThread] = None
        self._stop = threading.Event()
        self._announcer: Optional[threading.Thread] = None
        self._p2p = None

    # ---- start ------------------------------------------------------------------------------------

    def start_dht(self) -> list[str]:
        """Joins (or starts) the swarm; returns this node's full multiaddrs."""
        c = self.config
        self.dht = create_dht(
            [] if c.new_swarm else c.initial_peers, c.host_maddrs, c.announce_maddrs, c.identity_path,
            use_nat_port_map=c.use_nat_port_map, use_relay=c.use_relay, startup_timeout=c.startup_timeout,
            validators=self._validators,
        )
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def start(self) -> None:
        """Loads blocks, serves them and announces ONLINE (start_dht() first, or it is called here)."""
        c = self.config
        if self.dht is None:
            self.start_dht()
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        resolved = resolve_model(c.model)
        self.model_name = c.dht_prefix or resolved.name
        model_config = AutoConfig.from_pretrained(resolved.path)
        family = family_for_config(model_config)
        total = model_config.num_hidden_layers
        if c.blocks is not None:
            start, end = c.blocks
            if end > total:
                raise ValueError(f"blocks {start}:{end} out of range: {self.model_name} has {total} blocks")
        else:
            records = fetch_block_records(self.dht, self.model_name, total)
            start, end = choose_span(block_throughputs(records), min(c.num_blocks, total))
        dtype, device = DTYPES[c.torch_dtype], torch.device(c.device)
        self._announce(ServerState.JOINING, start, end, free=0)
        logger.info(f"Loading blocks {start}:{end} of {self.model_name} ({family.name}) from {resolved.path}")
        span = BlockSpan(family, model_config, start, end)
        state = load_tensors(resolved.path, lambda name: family.block_tensor_name(name, start, end), dtype)
        missing, unexpected = span.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        span = span.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.span = span
        self.throughput = c.throughput or measure_throughput(span, device, dtype)
        max_positions = getattr(model_config, "max_position_embeddings", 2048)
        limits = Limits(
            hidden_size=model_config.hidden_size,
            max_batch_size=c.max_batch_size,
            max_request_tokens=c.max_request_tokens,
            max_session_length=min(c.max_session_length or max_positions, max_positions),
            request_timeout=c.request_timeout,
            session_timeout=c.session_timeout,
        )
        self.budget = CacheBudget(c.max_cache_tokens)
        self.handler = SpanHandler(span, self.model_name, limits, self.budget, dtype, device)
        self._loop = LoopThread("swarmlm-peer-rpc")
        self._loop.run(self._serve(), timeout=c.startup_timeout)
        self._announce(ServerState.ONLINE)
        self._announcer = threading.Thread(target=self._announce_loop, name="swarmlm-announcer", daemon=True)
        self._announcer.start()
        logger.info(f"Serving blocks {start}:{end} of {self.model_name} ({self.throughput:.0f} tokens/s per block)")

    async def _serve(self) -> None:
        self._p2p = await self.dht.replicate_p2p()
        await self.handler.add_p2p_handlers(self._p2p)

    # ---- announcements ----------------------------------------------------------------------------

    def record(self, state: ServerState, start: int | None = None, end: int | None = None, free: int | None = None):
        return ServerRecord(
            peer_id=self.dht.peer_id.to_base58(),
            state=state,
            start=self.span.start if start is None else start,
            end=self.span.end if end is None else end,
            throughput=float(self.throughput),
            free_cache_tokens=self.budget.free_tokens if free is None else free,
            max_cache_tokens=self.config.max_cache_tokens,
            version=__version__,
            torch_dtype=self.config.torch_dtype,
            public_name=self.config.public_name,
        )

    def _announce(self, state: ServerState, start=None, end=None, free=None) -> None:
        record = self.record(state, start, end, free)
        expiration = get_dht_time() + record_expiration(self.config.update_period)
        declare_span(self.dht, self.model_name, record, expiration, self._validators[0])

    def _announce_loop(self) -> None:
        while not self._stop.wait(self.config.update_period):
            try:
                self._announce(ServerState.ONLINE)
            except Exception as e:
                logger.warning(f"Failed to announce: {e}; retrying in {self.config.update_period} s")

    # ---- shutdown ---------------------------------------------------------------------------------

    def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stops taking sessions, announces OFFLINE, waits (bounded) for running sessions, stops."""
        self._stop.set()
        if self.handler is not None:
            self.handler.accepting_sessions = False
        if self.dht is not None and self.span is not None:
            try:
                self._announce(ServerState.OFFLINE)
            except Exception as e:
                logger.warning(f"Could not announce OFFLINE: {e}")
        deadline = time.monotonic() + drain_timeout
        while self.handler is not None and self.handler.active_sessions > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._loop is not None:
            if self._p2p is not None:
                try:
                    self._loop.run(self.handler.remove_p2p_handlers(self._p2p), timeout=5)
                except Exception:
                    pass
            self._loop.stop()
        if self.handler is not None:
            self.handler.shutdown()
        if self._announcer is not None:
            self._announcer.join(timeout=5)
        if self.dht is not None:
            shutdown_dht(self.dht)
        logger.info("Peer stopped")
