"""InferenceSession: a sequence whose KV caches live on the peers of one route, with failover.

The client keeps what it sent into each hop (`_History`: hidden states per block boundary,
position ids, attention mask). When a peer fails mid-session (crash, timeout, "busy"), the
session bans it, opens sessions for exactly its blocks on a replacement route, replays that
hop's whole input history through them and continues; later hops never notice.

Where its steps run (the client's network thread, or an event loop of its own for an all-direct route) is
swarmlm.client.step_loop's business.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Optional

import torch

from swarmlm.client.routing import RouteHop
from swarmlm.client.rpc import InferenceStream
from swarmlm.client.step_loop import ForeignStream, StepLoop
from swarmlm.client.swarm import RemoteSequential
from swarmlm.client.verification import Segment
from swarmlm.errors import MissingBlocksError, RemotePeerError, SwarmError, WrongOutputError
from swarmlm.experts.protocol import PushTarget

logger = logging.getLogger(__name__)


PUSH_WAIT_FACTOR = 4.0  # a pushed step's answer is overdue after this many times the hop's usual answer time


@dataclass
class _Hop:
    route: RouteHop
    stream: InferenceStream | ForeignStream
    length: int = 0  # tokens this hop's peer holds for the session
    takes_pushes: bool = True  # False after a step pushed to it was lost: the client sends it every step
    answer_seconds: Optional[float] = None  # moving average of the wait for its answer (from the previous answer)

    def observe_answer(self, seconds: float) -> None:
        previous = self.answer_seconds
        self.answer_seconds = seconds if previous is None else 0.8 * previous + 0.2 * seconds


def _check_output(hop: _Hop, output: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """A hop's answer must be finite hidden states [batch, tokens sent, hidden] (else the peer counts as failed, and
    not the next hop, which would choke on them)."""
    if tuple(output.shape) != shape or not output.is_floating_point():
        raise RemotePeerError(hop.route.peer_id, f"answered a step with a {output.dtype} tensor of shape "
                              f"{list(output.shape)}, expected {list(shape)}")
    if not bool(torch.isfinite(output).all()):
        raise RemotePeerError(hop.route.peer_id, "answered a step with NaN or infinite hidden states", wrong_output=True)


def _close_all(hops: list[_Hop]) -> None:
    for hop in hops:
        hop.stream.close()


class _History:
    """Everything the session sent so far: inputs of each block boundary, position ids, mask."""

    def __init__(self, batch: int, max_length: int):
        self.batch, self.max_length = batch, max_length
        self.hidden: dict[int, torch.Tensor] = {}  # block -> [batch, max_length, hidden] inputs of that block
        self.lengths: dict[int, int] = {}  # block -> tokens of hidden[block] that are filled
        self.position_ids = torch.zeros(batch, max_length, dtype=torch.int64)
        self.mask = torch.ones(batch, max_length, dtype=torch.bool)
        self.sources: dict[int, list[tuple[int, int, str]]] = {}  # block -> (start, end, peer) that wrote its inputs

    def write(self, block: int, start: int, hidden: torch.Tensor, source: str = "client") -> None:
        """Records inputs of `block` at positions [start, start + seq), computed by `source` (the peer whose output
        they are); keeps what is already there."""
        end = start + hidden.shape[1]
        if block not in self.hidden:
            self.hidden[block] = hidden.new_zeros(self.batch, self.max_length, hidden.shape[2])
            self.lengths[block] = 0
        keep = max(self.lengths[block], start)
        if keep < end:
            self.hidden[block][:, keep:end] = hidden[:, keep - start:]
            self.sources.setdefault(block, []).append((keep, end, source))
        self.lengths[block] = max(self.lengths[block], end)

    def sources_of(self, block: int, start: int, end: int) -> dict[tuple[int, int], str]:
        """{(from, to): peer} for the recorded inputs of `block` that overlap positions [start, end)."""
        return {(a, b): peer for a, b, peer in self.sources.get(block, []) if a < end and b > start}

    def truncate(self, length: int) -> None:
        """Forgets everything recorded at positions from `length` on."""
        for block in self.lengths:
            self.lengths[block] = min(self.lengths[block], length)
        for block, spans in self.sources.items():
            self.sources[block] = [(a, min(b, length), peer) for a, b, peer in spans if a < length]

    def mask_chunk(self, start: int, end: int) -> Optional[torch.Tensor]:
        """The mask for positions [start, end), or None when every token so far is attended."""
        return None if bool(self.mask[:, :end].all()) else self.mask[:, start:end]


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
        self.failovers = 0  # hops replaced after a failure, over the session's life
        self.pushed_steps = 0  # hop steps that a peer sent straight to the next peer (ClientConfig.peer_push)
        self.lost_pushes = 0  # pushed hop steps whose answer was overdue, so the client sent them itself
        self.prefix_tokens = 0  # leading virtual tokens (prompt tuning) among `position`
        self._hops: list[_Hop] = []
        self._history: Optional[_History] = None
        self._prompts: Optional[torch.Tensor] = None  # deep prompts, resent whenever a hop starts from position 0
        self._batch: Optional[int] = None
        self._step_id = 0  # of the current step (peers echo it in their answers)
        self._loop = StepLoop(remote.loop)  # where steps run: its own loop if the first route is all direct
        self._first_route: Optional[list[RouteHop]] = None  # the route _choose_loop found, for the first _open
        self._verified = 0  # tokens [0, _verified) hold verified outputs at every block boundary
        self._audits = random.Random()  # which steps audit (its own generator: the caller's RNG state is theirs)
        self.closed = False

    @property
    def route(self) -> list[RouteHop]:
        return [hop.route for hop in self._hops]

    def describe_route(self) -> list[tuple[str, int, int]]:
        return [(h.route.peer_id, h.route.start, h.route.end) for h in self._hops]

    @property
    def transports(self) -> list[str]:
        """How the client reaches each hop: "direct" (plain TCP, swarmlm.transport.direct) or "p2p"."""
        return ["direct" if hop.stream.direct else "p2p" for hop in self._hops]

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask_chunk: Optional[torch.Tensor],
             prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs [batch, seq, hidden] new tokens through the route; returns the last block's output.
        `prompts` (deep prompt tuning, [num_blocks, n, hidden]) may come with the first step only."""
        if self.closed:
            raise SwarmError("this inference session is closed")
        batch, seq = hidden.shape[:2]
        if self.position + seq > self.max_length:
            raise SwarmError(
                f"the session would hold {self.position + seq} tokens, beyond its max_length={self.max_length}; "
                f"open it with a larger max_length"
            )
        if self._batch is None:
            self._batch = batch
        elif batch != self._batch:
            raise SwarmError(f"this session has batch size {self._batch}, got {batch}")
        if prompts is not None:
            if self.position != 0:
                raise SwarmError("deep prompts can only come with the session's first step")
            self._prompts = prompts.detach()
        output = self._run(self._step(hidden, position_ids, mask_chunk))
        self.position += seq
        if self.remote.config.verify != "off" and self._audits.random() < self.remote.config.verify_rate:
            self.verify()
        return output.to(hidden.device, hidden.dtype)

    # ---- verification (swarmlm.client.verification) ---------------------------------------------------------

    @property
    def verified(self) -> int:
        """Tokens of the session whose outputs are verified at every block boundary."""
        return self._verified

    def verify(self) -> None:
        """Audits every token not verified yet (see swarmlm.client.verification). A peer caught answering wrong
        numbers is banned and the session rolls back to the first wrong token: WrongOutputError says where."""
        if self.remote.config.verify != "off" and self.position > self._verified and self._hops:
            self._run(self._audit())

    async def _audit(self) -> None:
        n, lo, history = self.position, self._verified, self._history
        bounds = [hop.route.start for hop in self._hops] + [self.remote.num_blocks]
        wrong = []
        for a, b in zip(bounds, bounds[1:]):
            sources = history.sources_of(b, lo, n)
            segment = Segment(a, b, history.hidden[a][:, :n], history.hidden[b][:, :n], history.position_ids[:, :n],
                              history.mask_chunk(0, n), self._prompts, lo, frozenset(sources.values()))
            verdict = await self.remote.auditor.audit(segment, self._loop.on_shared)
            if verdict.wrong is not None:
                liar = next(peer for (x, y), peer in sources.items() if x <= verdict.wrong < y)
                wrong.append((verdict.wrong, liar, (a, b), verdict.error))
        if not wrong:
            self._verified = n
            return
        for position, liar, (a, b), error in wrong:
            self.remote.bans.convict(liar)
            logger.warning(f"Peer {liar} answered wrong hidden states for blocks {a}:{b} from token {position} on "
                           f"(relative error {error:.3g}); it is banned for this client")
        position, liar, blocks, error = min(wrong)
        self.rollback(position)
        raise WrongOutputError(liar, blocks, position, error)

    def rollback(self, position: int) -> None:
        """Forgets the tokens from `position` on: the peers' sessions close, and the next step opens a route (without
        banned peers) and replays the verified history into it."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} tokens")
        if self._history is not None:
            self._history.truncate(position)
        self.position, self._verified = position, min(self._verified, position)
        for hop in self._hops:
            hop.stream.close()
        self._hops = []

    # ---- where steps run ---------------------------------------------------------------------------------

    def _run(self, coro):
        """Runs a step where the session's steps run (see StepLoop)."""
        if not self._hops and self._loop.own is None and self._first_route is None:
            self._choose_loop()
        return self._loop.run(coro, on_interrupt=self.close)

    def _choose_loop(self) -> None:
        """Before the first step: finds the route and, if every hop of it serves direct connections (and the
        client uses them), gives the session its own event loop. A failure here is left to the step's retries."""
        if not self.remote.config.direct_connections or not self._loop.can_own():
            return
        try:
            route = self.remote.loop.run(self.remote.make_route(
                0, self.remote.num_blocks, mode="latency", cache_tokens=self._batch * self.max_length))
        except (MissingBlocksError, RemotePeerError):
            return
        self._first_route = route
        if all(hop.direct_address is not None for hop in route):
            self._loop.use_own()

    # ---- one step ----------------------------------------------------------------------------------------

    async def _step(self, hidden, position_ids, mask_chunk) -> torch.Tensor:
        start, end = self.position, self.position + hidden.shape[1]
        if self._history is None:  # created here, outside inference mode (see _run), written in place later
            self._history = _History(self._batch, self.max_length)
        history = self._history
        history.position_ids[:, start:end] = position_ids
        history.mask[:, start:end] = True if mask_chunk is None else mask_chunk.to(torch.bool)
        history.write(0, start, hidden)
        attempts, i, sent = self.remote.attempts(f"inference step at position {start}"), 0, False
        self._step_id += 1
        while not self._hops:
            try:
                self._hops = await self._open(0, self.remote.num_blocks)
            except (MissingBlocksError, RemotePeerError) as e:
                await attempts.failed(e, getattr(e, "peer", None))
        loop = asyncio.get_running_loop()
        while i < len(self._hops):
            hop, resend, sent_by_peer = self._hops[i], None, sent
            try:
                if not sent:
                    self._send(hop, start, end, self._push_chain(i + 1, start))
                else:  # the previous hop's peer pushed this step to the hop's peer; if the answer is late, it was lost
                    wait = self._push_wait(hop, end - start)
                    resend = loop.call_later(wait, self._resend_pushed, hop, i, start, end, wait)
                waiting_since = loop.time()
                try:
                    output, sent = await hop.stream.receive(self._step_id, self.remote.config.request_timeout)
                finally:
                    if resend is not None:
                        resend.cancel()
                _check_output(hop, output, (self._batch, end - hop.length, hidden.shape[2]))
                waited = loop.time() - waiting_since
                hop.observe_answer(waited)
                if end - start == 1 and hop.length == start:  # a decode step: what the peer's speed is judged on
                    self._measure(hop, waited, pushed=sent_by_peer)
                self.pushed_steps += sent
            except RemotePeerError as e:
                if e.wrong_output:
                    self.remote.bans.convict(e.peer)
                await attempts.failed(e, e.peer)
                await self._replace(i, attempts)
                # the step goes on under a new id: answers to what the failed hop's peer pushed on are skipped
                self._step_id += 1
                sent = False
                continue
            self.remote.bans.clear(hop.route.peer_id)  # O(1) unless the peer has failures on record
            history.write(hop.route.end, hop.length, output, source=hop.route.peer_id)
            hop.length, i = end, i + 1
        return output[:, -(end - start):]

    def _measure(self, hop: _Hop, waited: float, pushed: bool) -> None:
        """Records the hop's peer's speed from the wait for its answer to a one-token step: less the round trip if
        the client sent the step; all of it if the previous peer pushed it (its answer left for us at the same time
        as the push left for this peer)."""
        compute = waited if pushed else waited - self.remote.manager.latencies.get(hop.route.peer_id, 0.0)
        self.remote.manager.speeds.observe(hop.route.peer_id, self._batch, hop.route.end - hop.route.start,
                                           max(compute, waited * 0.1))

    def _send(self, hop: _Hop, start: int, end: int, push_to: list[PushTarget]) -> None:
        """Sends the hop everything it lacks up to `end` (the step's tokens [start, end) on a normal step,
        the whole history after a failover); its peer pushes its output on along `push_to`."""
        history, first = self._history, hop.length
        prompts = self._prompts[hop.route.start:hop.route.end] if self._prompts is not None and first == 0 else None
        hop.stream.send(self._step_id, first, history.hidden[hop.route.start][:, first:end], history.position_ids[:, first:end],
                        history.mask_chunk(first, end), prompts, push_to if first == start else [])

    def _push_chain(self, i: int, start: int) -> list[PushTarget]:
        """The hops from i on that can take this step (tokens from `start`) straight from the previous hop's
        peer: they hold exactly `start` tokens, have accepted their session, lost no push and take pushes from that
        peer (it was their previous hop when they opened); none for the first step."""
        chain = []
        for k in range(i, len(self._hops)) if start > 0 and i > 0 and self.remote.config.peer_push else ():
            hop = self._hops[k]
            if hop.length != start or not hop.stream.opened or not hop.takes_pushes \
                    or hop.stream.span.push_from != self._hops[k - 1].route.peer_id:
                break  # (a hop opened after a failover before it takes pushes from no peer, or from the failed one)
            chain.append(hop.stream.push_target)
        return chain

    def _push_wait(self, hop: _Hop, tokens: int) -> float:
        """Seconds after which the answer to a step of `tokens` new tokens pushed into `hop` is overdue (the push
        counts as lost): PUSH_WAIT_FACTOR times the hop's usual answer time (the prefill's at first, so a slow
        peer is not mistaken), scaled up for steps of more than 8 tokens, and at least ClientConfig.push_timeout."""
        usual = hop.answer_seconds if hop.answer_seconds is not None else 0.0
        return max(self.remote.config.push_timeout, PUSH_WAIT_FACTOR * usual * max(1.0, tokens / 8))

    def _resend_pushed(self, hop: _Hop, i: int, start: int, end: int, waited: float) -> None:
        """The answer to a step pushed into hop i is overdue: the push was lost (its stream between the peers
        broke, or the peer dropped it). Sends the step ourselves and no longer pushes into this hop. If the
        push arrives after all, the peer answers twice with the same step id; the first answer is used, and
        a push that comes after the step was served is dropped there."""
        hop.takes_pushes = False
        self.lost_pushes += 1
        logger.info(f"A step pushed to {hop.route.peer_id} had no answer within {waited:.1f} s; "
                    f"sending it directly (no more pushes into that hop)")
        try:
            self._send(hop, start, end, self._push_chain(i + 1, start))
        except RemotePeerError:
            pass  # the stream is closed: receive() fails with that, and the hop is replaced

    async def _open(self, start: int, end: int, previous: Optional[str] = None) -> list[_Hop]:
        """Opens streams on the cheapest route for blocks [start, end) (their answers come with the first step),
        each taking steps pushed by the hop before it (the first: by the peer `previous`, if any).
        If any of them fails to open, all are closed (so no peer keeps a KV reservation for a session that
        will never step) and the first error is raised."""
        route, self._first_route = self._first_route, None
        if route is None or (route[0].start, route[-1].end) != (start, end):
            cache_tokens = self._batch * self.max_length
            route = await self._loop.on_shared(self.remote.make_route(start, end, mode="latency", cache_tokens=cache_tokens))
        pushers = [previous, *(r.peer_id for r in route[:-1])]
        hops = [_Hop(r, InferenceStream(r.peer_id, self.remote.span_request(
            r, max_length=self.max_length, batch_size=self._batch), r.direct_address, push_from))
            for r, push_from in zip(route, pushers)]
        logger.info(f"Route for blocks {start}:{end}: " + " -> ".join(f"{r.peer_id[-6:]}[{r.start}:{r.end}]" for r in route))
        try:
            direct = self.remote.config.direct_connections
            results = await asyncio.gather(*(self._open_stream(hop, direct) for hop in hops), return_exceptions=True)
        except BaseException:  # cancelled
            _close_all(hops)
            raise
        for hop in hops:  # a direct address that failed is not tried again (until the peer is probed anew)
            if direct and hop.route.direct_address is not None and not hop.stream.direct:
                self.remote.manager.direct_addresses.pop(hop.route.peer_id, None)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            _close_all(hops)
            raise errors[0]
        return hops

    async def _open_stream(self, hop: _Hop, direct: bool) -> None:
        await self._loop.open(hop, self.remote.dialer, direct)

    async def _replace(self, i: int, attempts) -> None:
        """Replaces hop i by a fresh route for its blocks; the new hops start empty (length 0), so the
        next `_send` replays the whole history into them."""
        failed = self._hops[i]
        failed.stream.close()
        while True:
            try:
                previous = self._hops[i - 1].route.peer_id if i > 0 else None
                self._hops[i:i + 1] = await self._open(failed.route.start, failed.route.end, previous)
                break
            except (MissingBlocksError, RemotePeerError) as e:
                await attempts.failed(e, getattr(e, "peer", None))
        self.failovers += 1
        self.remote.metrics.failover()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.close([hop.stream for hop in self._hops])

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
