"""SpanHandler: what a peer serves, method by method, on the transport (swarmlm.transport.Server).

Client side: `swarmlm.client.rpc` (call_forward, call_backward, call_info, InferenceStream). The jobs live
in their own modules; this one wires them to the wire and maps every failure to an in-band answer:
    validation.py  parsing and limits of every request          compute.py  block compute, the compute thread
    sessions.py    inference sessions (server-side KV caches)   push.py     pushed steps between peers
While the peer shuts down it refuses new sessions and calls (a clear error: the caller retries elsewhere);
those already accepted go on and count in `busy`.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Optional

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarmlm.errors import LimitError, RequestError
from swarmlm.experts.protocol import (
    BACKWARD,
    FORWARD,
    INFERENCE,
    INFO,
    PUSH,
    STATE,
    STATE_CHUNK_BYTES,
    PeerInfo,
    SpanRequest,
    StateTensor,
    all_finite,
    error_response,
    pack,
    serialize,
    unpack,
)
from swarmlm.experts.span import BlockSpan
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.monitoring.rpc_tap import metered
from swarmlm.peer.cache_budget import CacheBudget
from swarmlm.peer.compute import BlockCompute, Counting
from swarmlm.peer.push import Pushes
from swarmlm.peer.sessions import SHUTTING_DOWN, Sessions, drain, first_request
from swarmlm.peer.trainer_hook import BlockTrainer
from swarmlm.peer.validation import Limits, RequestParser
from swarmlm.transport import Channel, Dialer, Server
from swarmlm.transport.p2p import caller_of

logger = logging.getLogger(__name__)

MAX_STATE_STREAMS = 2  # state answers (block downloads: export, a joining replica) running at once
CALLER_TIMEOUT_SHARE = 0.9  # a forward/backward call gives up after this share of its caller's timeout (the rest
# is for the answer's way back), so that a training peer never counts a micro-batch whose caller retried elsewhere


def refuse_busy(channel, reason: str) -> None:
    """The answer to a channel the transport refused (a limit, or admission): a "busy" error, so that a client
    tries another peer."""
    channel.send(error_response(LimitError(reason)))


class SpanHandler:
    """Serves blocks [span.start, span.end) of `model`; requests may use any sub-span of it."""

    def __init__(self, span: BlockSpan, model: str, limits: Limits, budget: CacheBudget, dtype: torch.dtype,
                 device: torch.device, metrics: Optional[PeerMetrics] = None, trainer: Optional[BlockTrainer] = None):
        self.span, self.model, self.limits, self.budget = span, model, limits, budget
        self.metrics = metrics if metrics is not None else PeerMetrics()  # default: private, never exported
        self.trainer = trainer  # set: backward also accumulates the span's parameter gradients (training peer)
        self.parser = RequestParser(model, limits, dtype, device)
        self.blocks = BlockCompute(device, limits.request_timeout, self.metrics, trainer, limits.max_queued_jobs)
        self.compute = self.blocks.executor  # the compute thread (a training peer's optimizer steps run there too)
        self.sessions = Sessions(self)
        self.pushes = Pushes(self.metrics, limits.max_message_bytes(prompts=False))
        self.server: Optional[Server] = None
        self.accepting_sessions = True  # False once the peer shuts down: new sessions and calls are refused
        self.active_calls = 0  # forward/backward/state calls being answered
        self.state_streams = 0  # state answers running (see _answer_state)

    @property
    def active_sessions(self) -> int:
        return self.sessions.active

    def stop_accepting(self) -> None:
        """Refuses new sessions and stateless calls from now on; running ones go on (see `busy`)."""
        self.accepting_sessions = False

    @property
    def busy(self) -> bool:
        """Whether some session is open or some call is being answered."""
        return self.active_sessions > 0 or self.active_calls > 0

    @property
    def direct_address(self) -> Optional[str]:
        return self.server.direct_address if self.server is not None else None

    async def serve(self, server: Server) -> None:
        """Serves every method on `server` (p2p; call server.serve_direct after this for direct connections);
        pushes go out through a Dialer on the same p2p, direct where this peer serves direct connections."""
        self.server = server
        self.pushes.dialer = Dialer(server.p2p, direct=False, swarm_key=server.swarm_key)
        self.metrics.watch_channels(lambda: server.channels.total, server.channels.refused)
        await server.serve(
            channels={INFERENCE: self.sessions.serve, PUSH: self._serve_pushes, FORWARD: self._call(self.rpc_forward),
                      BACKWARD: self._call(self.rpc_backward), STATE: self._call(self.rpc_state)},
            unary={INFO: (self.rpc_info, runtime_pb2.ExpertRequest)})

    async def serve_direct(self, host: str, port: int, announce_host: str) -> str:
        """Also serves sessions and pushes on direct TCP at host:port, and pushes over direct connections to
        peers that serve them; returns the address to announce."""
        address = await self.server.serve_direct(host, port, announce_host)
        self.pushes.dialer = Dialer(self.server.p2p, direct=True, swarm_key=self.server.swarm_key)
        return address

    async def remove_handlers(self) -> None:
        """Stops serving: no new streams or calls; direct connections and our push streams closed."""
        await self.pushes.close_all()
        if self.server is not None:
            await self.server.stop()

    def shutdown(self) -> None:
        for stream in self.pushes.streams.values():
            stream.close()
        self.blocks.shutdown()

    def error(self, error: Exception, kind: str, caller: str) -> runtime_pb2.ExpertResponse:
        """The in-band answer to a failed request (logged: a refused one at INFO, a failure with its traceback)."""
        if isinstance(error, RequestError):
            logger.info(f"Refused {kind} request from {caller}: {error}")
        else:
            logger.warning(f"{kind} request from {caller} failed", exc_info=error)
        return error_response(error)

    async def _serve_pushes(self, channel) -> None:
        await self.pushes.serve(channel, self.sessions.deliver)

    def _call(self, rpc):
        """A stateless method (forward, backward, state) served on a channel: the caller's request frames, read
        under max_call_bytes (a larger one is refused from its header, before its bytes are read, and answered
        as a bad request), go to `rpc`; its answers go back as frames. The same frames as hivemind's protobuf
        streams, which clients call it with (Dialer.answers)."""
        async def serve(channel: Channel) -> None:
            max_bytes = self.limits.max_call_bytes()

            async def requests():
                while (message := await channel.receive(runtime_pb2.ExpertRequest, max_bytes)) is not None:
                    yield message

            try:
                async with aclosing(rpc(requests(), channel.peer)) as responses:
                    async for response in responses:
                        channel.send(response)
                        await channel.drain()
            except ConnectionError as e:  # the caller left
                logger.debug(f"A call of {channel.peer} broke: {type(e).__name__}: {e}")
            finally:
                channel.close()

        return serve

    # ---- stateless calls: forward, backward, state -------------------------------------------------

    def _timeout(self, meta: SpanRequest) -> float:
        """Seconds a forward/backward call may take here: the peer's request timeout, or CALLER_TIMEOUT_SHARE of
        the caller's if that is shorter."""
        if meta.timeout is None:
            return self.limits.request_timeout
        return min(self.limits.request_timeout, meta.timeout * CALLER_TIMEOUT_SHARE)

    async def _stateless_call(self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                              context, answer) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One stateless call: `answer(request, meta, span, first, last)` yields the responses (the span is the
        peer's when the call came: a later move does not affect it); any failure is answered in-band. A call
        that was accepted counts in `active_calls` until its caller has read the whole answer, so that
        shutdown can wait for it."""
        accepted = self.accepting_sessions
        if accepted:
            self.active_calls += 1
        try:
            try:
                if not accepted:
                    raise RequestError(SHUTTING_DOWN)
                request = await first_request(requests, self.limits.request_timeout)
                span, meta = self.span, unpack(request.metadata, SpanRequest)
                first, last = self.parser.check_span(meta, span)
                async with aclosing(answer(request, meta, span, first, last)) as answers:  # closed at once
                    async for response in answers:  # when the caller leaves (frees what the answer holds)
                        yield response
            except Exception as e:
                yield self.error(e, kind, caller_of(context))
            await drain(requests)
        finally:
            if accepted:
                self.active_calls -= 1

    @metered("forward")
    async def rpc_forward(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stateless_call("forward", requests, context, self._answer_forward):
            yield response

    async def _answer_forward(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        tensors, prompts = self.parser.parse_prompts(request.tensors, meta.prompt_tokens, last - first)
        hidden, _, position_ids, mask = self.parser.parse_inputs(tensors, prompts=prompts)
        output = await self.blocks.run(self.blocks.forward, span, hidden, position_ids, mask, first, last, prompts,
                                       timeout=self._timeout(meta))
        yield runtime_pb2.ExpertResponse(tensors=[serialize(output)])

    @metered("backward")
    async def rpc_backward(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stateless_call("backward", requests, context, self._answer_backward):
            yield response

    async def _answer_backward(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        tensors, prompts = self.parser.parse_prompts(request.tensors, meta.prompt_tokens, last - first)
        hidden, grad, position_ids, mask = self.parser.parse_inputs(tensors, expect_grad=True, prompts=prompts)
        if self.trainer is not None and not all_finite(grad):
            raise RequestError("grad_outputs must be finite (this peer trains its blocks with them)")
        grads = await self.blocks.run(self.blocks.backward, span, hidden, grad, position_ids, mask, first, last,
                                      prompts, timeout=self._timeout(meta),
                                      counting=Counting() if self.trainer is not None else None)
        yield runtime_pb2.ExpertResponse(tensors=[serialize(g) for g in grads])

    async def rpc_state(self, requests, context) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The current tensors of the requested blocks with their checkpoint names (see protocol.STATE)."""
        async for response in self._stateless_call("state", requests, context, self._answer_state):
            yield response

    async def _answer_state(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        """At most MAX_STATE_STREAMS answers run at once: each holds a copy of its blocks until its caller read it."""
        if request.tensors or meta.prompt_tokens or meta.max_length is not None or meta.batch_size is not None:
            raise RequestError("a state request names only the model and blocks (no tensors, prompts or session)")
        if self.state_streams >= MAX_STATE_STREAMS:
            raise LimitError(f"{MAX_STATE_STREAMS} state downloads run here already (each holds a copy of its "
                             f"blocks); retry later or use another peer")
        self.state_streams += 1
        try:
            epoch, named = await self.blocks.run(self.blocks.snapshot, span, first, last)
            for name, tensor in named:
                header = pack(StateTensor(name=name, training_epoch=epoch))
                for i, chunk in enumerate(split_for_streaming(serialize(tensor), STATE_CHUNK_BYTES)):
                    yield runtime_pb2.ExpertResponse(tensors=[chunk], metadata=header if i == 0 else b"")
        finally:
            self.state_streams -= 1

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        info = PeerInfo(start=self.span.start, end=self.span.end, free_cache_tokens=max(self.budget.free_tokens, 0),
                        accepting_sessions=self.accepting_sessions, active_calls=self.active_calls,
                        training_epoch=self.trainer.epoch if self.trainer is not None else None,
                        direct_address=self.direct_address,
                        direct_ticket=self.server.direct_ticket(caller_of(context)) if self.server else None)
        return runtime_pb2.ExpertResponse(metadata=pack(info))
