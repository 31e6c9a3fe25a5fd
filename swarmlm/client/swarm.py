"""RemoteSequential: the model's blocks as one module whose forward/backward run on the swarm.

Fault tolerance lives here: a failing peer is banned for a while (`PeerBans`), the failed part of
the work is retried on a fresh route after an exponential backoff, and after `max_retries` failed
attempts in a row the caller gets a `SwarmError` naming the last error.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from functools import partial
from typing import Iterable, Optional

import torch

from swarmlm.client.config import ClientConfig
from swarmlm.client.peer_stats import PeerBans
from swarmlm.client.routing import RouteHop, SequenceManager
from swarmlm.client.rpc import call_backward, call_forward, call_info
from swarmlm.client.verification import Auditor
from swarmlm.client.metrics import ClientMetrics
from swarmlm.dht.node import create_dht, shutdown_dht
from swarmlm.monitoring.http_service import serve_metrics
from swarmlm.utils.swarm_key import load_swarm_key
from swarmlm.dht.records import model_keys
from swarmlm.errors import MissingBlocksError, RemotePeerError, SwarmError, VerificationError
from swarmlm.experts.protocol import SpanRequest
from swarmlm.transport import Dialer
from swarmlm.utils.aio import LoopThread

logger = logging.getLogger(__name__)


class RemoteSequential:
    """All blocks of one model, served by the swarm. Owns the client's DHT node and event loop."""

    def __init__(self, model: str, num_blocks: int, config: ClientConfig, hint: str = ""):
        self.model, self.num_blocks, self.config = model, num_blocks, config
        swarm_key = load_swarm_key(config.swarm_key)
        self.dht = create_dht(config.initial_peers, ["/ip4/127.0.0.1/tcp/0"], client_mode=True,
                              protected=model_keys(model, num_blocks), swarm_key=swarm_key,
                              use_nat_port_map=config.use_nat_port_map, startup_timeout=config.startup_timeout)
        self.loop = LoopThread("swarmlm-client-rpc")
        self.p2p = self.loop.run(self.dht.replicate_p2p(), timeout=config.startup_timeout)
        # every call and stream to peers goes here
        self.dialer = Dialer(self.p2p, direct=config.direct_connections, swarm_key=swarm_key)
        self.manager = SequenceManager(self.dht, model, num_blocks, config.route_refresh_period, hint)
        self.metrics = ClientMetrics()
        self.bans = PeerBans(config.ban_duration, config.max_ban_duration, on_ban=self.metrics.banned)
        self.metrics_server = (serve_metrics(self.metrics.registry, config.metrics_host, config.metrics_port)
                               if config.metrics_port is not None else None)
        self.auditor = Auditor(self)  # verifies peers' answers; model.py gives it the local checkpoint
        self._audit_coin = random.Random()  # draws which forward passes are audited
        self.training_peers: set[str] = set()  # peers whose last info answer said they train their blocks

    def span_request(self, hop: RouteHop, **kwargs) -> SpanRequest:
        return SpanRequest(model=self.model, start=hop.start, end=hop.end, **kwargs)

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [batch, seq, hidden] -> hidden after all blocks; differentiable w.r.t. `hidden` and the
        optional deep prompts [num_blocks, prompt_tokens, hidden] (added to the first positions at each block)."""
        return _RemoteChain.apply(hidden, prompts, position_ids, attention_mask, self)

    # ---- routing ----------------------------------------------------------------------------------

    def attempts(self, what: str) -> "Attempts":
        return Attempts(self, what)

    async def probe(self, peer_ids: Iterable[str]) -> None:
        """Measures the round trip to each peer (concurrently) and learns where it serves direct connections; bans
        those that do not answer."""
        async def probe_one(peer_id: str) -> None:
            started = time.perf_counter()
            try:
                info = await call_info(self.dialer, peer_id, self.config.probe_timeout)
            except RemotePeerError as e:
                logger.info(f"Leaving {peer_id} out of routes for {self.bans.ban(peer_id):.0f} s: {e}")
                return
            self.manager.latencies.update(peer_id, time.perf_counter() - started)
            self.dialer.learn(peer_id, info.direct_ticket)
            if info.training_epoch is not None:  # its weights change every epoch: audits cannot compare them
                self.training_peers.add(peer_id)
            else:
                self.training_peers.discard(peer_id)
            if info.direct_address is not None:
                self.manager.direct_addresses[peer_id] = info.direct_address
            else:
                self.manager.direct_addresses.pop(peer_id, None)
            if not info.accepting_sessions:
                self.bans.ban(peer_id)

        await asyncio.gather(*(probe_one(peer_id) for peer_id in peer_ids))

    async def make_route(self, start: int, end: int, *, mode: str, cache_tokens: int = 0,
                         exclude: frozenset[str] = frozenset()) -> list[RouteHop]:
        """A route for blocks [start, end) that avoids banned peers where it can; probes peers seen for the first time.

        Runs the blocking DHT reads in a worker thread, so the event loop keeps serving other streams.
        """
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.manager.refresh)
        new_peers = self.manager.latencies.unknown(self.manager.candidates(start, end, self.bans.banned() | exclude))
        if new_peers:
            await self.probe(new_peers)
        exclude = exclude | self.bans.convicted
        route = partial(self.manager.make_route, start, end, self.bans.banned(), mode=mode, cache_tokens=cache_tokens,
                        exclude=frozenset(exclude))
        return await loop.run_in_executor(None, route)

    # ---- forward / backward ----------------------------------------------------------------------

    def run_chain(self, hidden, position_ids, mask, prompts=None) -> tuple[torch.Tensor, list[tuple[RouteHop, torch.Tensor]]]:
        """Forward through all blocks; returns the output and each hop with its input (for backward). Audited with
        probability verify_rate (see `_audited_forward`)."""
        return self.loop.run(self._audited_forward(hidden, position_ids, mask, prompts))

    async def _audited_forward(self, hidden, position_ids, mask, prompts):
        """forward_blocks through every block; with verification on, the pass is audited hop by hop with
        probability verify_rate (swarmlm.client.verification.Auditor.audit_chain), and run again, without the
        peers caught lying, until an audited pass holds (at most max_retries times)."""
        for attempt in range(self.config.max_retries + 1):
            output, hops = await self.forward_blocks(hidden, position_ids, mask, 0, self.num_blocks, prompts)
            if self.config.verify == "off" or self._audit_coin.random() >= self.config.verify_rate:
                return output, hops
            liars = await self.auditor.audit_chain(hops, output, position_ids, mask, prompts, _here)
            if not liars:
                return output, hops
            self.metrics.rerun()
        raise VerificationError(f"a forward pass had wrong answers {self.config.max_retries + 1} times in a row")

    def run_backward(self, hops: list[tuple[RouteHop, torch.Tensor]], grad, position_ids, mask, prompts=None):
        """-> (grad of the chain's input, grad of the deep prompts or None)."""
        return self.loop.run(self._backward_chain(hops, grad, position_ids, mask, prompts))

    def _hop_request(self, hop: RouteHop, prompts) -> tuple[SpanRequest, Optional[torch.Tensor]]:
        """The SpanRequest of a forward/backward call through `hop` (it tells the peer how long we wait), with
        the hop's slice of the deep prompts."""
        request = self.span_request(hop, timeout=self.config.request_timeout,
                                    prompt_tokens=prompts.shape[1] if prompts is not None else 0)
        return request, (prompts[hop.start:hop.end] if prompts is not None else None)

    async def forward_blocks(self, hidden, position_ids, mask, start: int, end: int, prompts=None,
                             exclude: frozenset[str] = frozenset()):
        """Forward through blocks [start, end), hop by hop, never through peers in `exclude`; a failed hop is retried
        from its first block."""
        hops, block, attempts = [], start, self.attempts(f"forward through blocks {start}:{end}")
        while block < end:
            try:
                hop = (await self.make_route(block, end, mode="throughput", exclude=exclude))[0]
            except MissingBlocksError as e:
                await attempts.failed(e)
                continue
            request, hop_prompts = self._hop_request(hop, prompts)
            try:
                output = await call_forward(self.dialer, hop.peer_id, request, hidden, position_ids, mask,
                                            self.config.request_timeout, hop_prompts)
            except RemotePeerError as e:
                await attempts.failed(e, hop.peer_id)
                continue
            self.bans.clear(hop.peer_id)
            hops.append((hop, hidden))
            hidden, block = output.to(hidden.device, hidden.dtype), hop.end
        return hidden, hops

    async def _backward_chain(self, hops, grad, position_ids, mask, prompts=None):
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        for hop, hop_input in reversed(hops):
            grad = await self._backward_hop(hop, hop_input, grad, position_ids, mask, prompts, grad_prompts)
        return grad, grad_prompts

    async def _backward_hop(self, hop: RouteHop, hop_input, grad, position_ids, mask, prompts, grad_prompts):
        """Backward through one forward hop (writing its deep prompts' grads into `grad_prompts`). If
        its peer fails, the hop's blocks are recomputed forward on a fresh route from the stored
        input, then backward runs through that route."""
        pieces, attempts = [(hop, hop_input)], self.attempts(f"backward through blocks {hop.start}:{hop.end}")
        while True:
            piece_grad, failed = grad, None
            for piece, piece_input in reversed(pieces):
                request, piece_prompts = self._hop_request(piece, prompts)
                try:
                    piece_grad, piece_prompt_grad = await call_backward(
                        self.dialer, piece.peer_id, request, piece_input, piece_grad, position_ids, mask,
                        self.config.request_timeout, piece_prompts)
                except RemotePeerError as e:
                    failed = e
                    break
                self.bans.clear(piece.peer_id)
                piece_grad = piece_grad.to(grad.device, grad.dtype)
                if piece_prompt_grad is not None:
                    grad_prompts[piece.start:piece.end] = piece_prompt_grad.to(grad_prompts.device, grad_prompts.dtype)
            if failed is None:
                return piece_grad
            await attempts.failed(failed, failed.peer)
            _, pieces = await self.forward_blocks(hop_input, position_ids, mask, hop.start, hop.end, prompts)

    @property
    def metrics_url(self) -> Optional[str]:
        """Where Prometheus scrapes this client (None without ClientConfig.metrics_port)."""
        return f"{self.metrics_server.url}/metrics" if self.metrics_server is not None else None

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            pass
        self.loop.stop()
        shutdown_dht(self.dht)


class Attempts:
    """Counts failed attempts of one piece of work: bans the failing peer, waits an exponential
    backoff from the second failure in a row on, and raises after `max_retries` retries."""

    def __init__(self, remote: RemoteSequential, what: str):
        self.remote, self.what, self.failures = remote, what, 0

    async def failed(self, error: Exception, peer_id: Optional[str] = None) -> None:
        config, bans = self.remote.config, self.remote.bans
        if isinstance(error, MissingBlocksError) and not self._banned_peer_announces(error.missing):
            raise error  # no peer, banned or not, serves these blocks: retrying would not help
        self.failures += 1
        if peer_id is not None:
            duration = bans.ban(peer_id)
            logger.warning(f"{self.what}: {error}; leaving peer {peer_id} out of routes for {duration:.0f} s")
        if self.failures > config.max_retries:
            raise SwarmError(f"{self.what} failed after {self.failures} attempts; last error: {error}") from error
        if self.failures > 1:
            await asyncio.sleep(self.backoff(self.failures))

    def backoff(self, failures: int) -> float:
        """Seconds to wait before retrying after `failures` failures in a row: none after the first, then
        retry_backoff, doubling, at most max_backoff."""
        config = self.remote.config
        return 0.0 if failures < 2 else min(config.retry_backoff * 2 ** (failures - 2), config.max_backoff)

    def _banned_peer_announces(self, missing: list[tuple[int, int]]) -> bool:
        """Whether a banned peer announces some of the `missing` blocks (ONLINE or JOINING) in the records last
        read: only then may the gap close on a retry (the route could not use that peer, or it is loading)."""
        banned = self.remote.bans.banned()
        return bool(banned) and bool(banned & self.remote.manager.announcing(missing))


async def _here(coro):
    """Runs a coroutine on the current loop (the auditor's `on_shared` when already on the network loop)."""
    return await coro


class _RemoteChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, prompts, position_ids, attention_mask, remote: RemoteSequential):
        prompts = prompts.detach() if prompts is not None else None
        output, hops = remote.run_chain(hidden.detach(), position_ids, attention_mask, prompts)
        ctx.remote, ctx.hops, ctx.position_ids, ctx.attention_mask = remote, hops, position_ids, attention_mask
        ctx.prompts = prompts
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad, grad_prompts = ctx.remote.run_backward(ctx.hops, grad_output.contiguous(), ctx.position_ids,
                                                     ctx.attention_mask, ctx.prompts)
        return grad, grad_prompts, None, None, None
