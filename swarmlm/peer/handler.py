"""RPC handlers of a peer: forward, backward and streaming inference over hivemind P2P.

Client side: `swarmlm.client.rpc` (call_forward, call_backward, InferenceStream). Every message is
parsed and bounded before use (`_Limits`), every step runs under a timeout, and every failure is
answered in-band as an error message; the peer keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from contextlib import aclosing
from typing import TYPE_CHECKING, AsyncIterator, Optional

import numpy as np
import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from swarmlm.errors import RequestError
from swarmlm.experts.direct import DirectListener, connect
from swarmlm.experts.protocol import (
    InferenceStep,
    PeerInfo,
    PushTarget,
    STATE_CHUNK_BYTES,
    SpanRequest,
    SpanService,
    StateTensor,
    StepResult,
    all_finite,
    array_bounded,
    as_tensor,
    deserialize_bounded,
    error_response,
    pack,
    read_frame,
    serialize,
    stream_frame,
    unpack,
)
from swarmlm.experts.span import BlockSpan
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.monitoring.rpc_tap import metered
from swarmlm.peer.cache_budget import CacheBudget

if TYPE_CHECKING:
    from swarmlm.training.span_trainer import SpanTrainer

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, np.float32, np.float16)  # torch's, or numpy's
INDEX_DTYPES = (torch.int64, torch.int32, np.int64, np.int32)  # position ids
MASK_DTYPES = (torch.bool, torch.int64, torch.int32, torch.uint8, torch.int8,
               np.bool_, np.int64, np.int32, np.uint8, np.int8)
SHUTTING_DOWN = "this peer is shutting down: it takes no new sessions or requests; use another peer"
INLINE_MAX_TOKENS = 8  # inference steps of at most this many tokens (batch x seq) may run on the event loop...
INLINE_STEP_SECONDS = 0.02  # ...if such steps took at most this long (see _runs_inline)
MAX_PUSH_STREAMS = 256  # open rpc_push streams to other peers at most (one per peer pushed to)
MAX_WAITING_PUSHES = 8  # pushed steps a session holds before it drops more
MAX_WAITING_STEPS = 8  # steps from its caller a session holds unread before it stops reading the caller's stream
PUSH_RETRY_SECONDS = 30.0  # a push stream that failed is re-opened no sooner than this after it was opened
PUSH_IDLE_SECONDS = 300.0  # a push stream unused this long is closed (checked while pushing, every 30 s)
CALLER_TIMEOUT_SHARE = 0.9  # a forward/backward call gives up after this share of its caller's timeout (the rest
# is for the answer's way back), so that a training peer never counts a micro-batch whose caller retried elsewhere


@dataclass(frozen=True)
class Limits:
    hidden_size: int
    max_batch_size: int
    max_request_tokens: int
    max_session_length: int
    request_timeout: float
    session_timeout: float


class SpanHandler(SpanService):
    """Serves blocks [span.start, span.end) of `model`; requests may use any sub-span of it."""

    def __init__(self, span: BlockSpan, model: str, limits: Limits, budget: CacheBudget, dtype: torch.dtype,
                 device: torch.device, metrics: Optional[PeerMetrics] = None, trainer: Optional[SpanTrainer] = None):
        self.span, self.model, self.limits, self.budget = span, model, limits, budget
        self.dtype, self.device = dtype, device
        self.metrics = metrics if metrics is not None else PeerMetrics()  # default: private, never exported
        self.trainer = trainer  # set: backward also accumulates the span's parameter gradients (training peer)
        # torch's intra-op thread count is per thread under OpenMP: carry the process setting over
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="swarmlm-compute", initializer=torch.set_num_threads,
                                          initargs=(torch.get_num_threads(),))
        self.accepting_sessions = True  # False once the peer shuts down: new sessions and calls are refused
        self.active_sessions = 0  # open inference sessions
        self.active_calls = 0  # forward/backward/state calls being answered
        self.small_step_block_seconds = float("inf")  # observed time per block of recent small inference steps
        self._p2p: Optional[P2P] = None
        self.direct: Optional[DirectListener] = None  # serves sessions and pushes over plain TCP too (serve_direct)
        self._sessions: dict[str, _Inbox] = {}  # session_id -> inbox of an open session that accepts pushes
        self._push_streams: dict[str, _PushStream] = {}  # peer id -> our stream of pushed steps to it
        self._push_streams_checked = time.monotonic()  # when idle push streams were last closed
        self._push_streams_in = 0  # rpc_push streams other peers have open to us

    def stop_accepting(self) -> None:
        """Refuses new sessions and stateless calls from now on; running ones go on (see `busy`)."""
        self.accepting_sessions = False

    @property
    def busy(self) -> bool:
        """Whether some session is open or some call is being answered."""
        return self.active_sessions > 0 or self.active_calls > 0

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: Optional[str] = None,
                               balanced: bool = False) -> None:
        """Registers every rpc_* method; rpc_inference and rpc_push as raw stream handlers (`_serve_inference`,
        `_serve_pushes`: same wire format, but a message reaches its session without hivemind's per-message
        task and queue, and an answer leaves in one write)."""
        if wrapper is not None:
            raise ValueError("SpanHandler serves its own methods (no wrapper)")
        self._p2p = p2p  # also used to push steps to other peers
        self._collect_rpc_handlers()
        raw = {"rpc_inference": self._serve_inference, "rpc_push": self._serve_pushes}
        await asyncio.gather(*(
            p2p.add_binary_stream_handler(self._get_handle_name(namespace, h.method_name), raw[h.method_name], balanced)
            if h.method_name in raw else
            p2p.add_protobuf_handler(self._get_handle_name(namespace, h.method_name), getattr(self, h.method_name),
                                     h.request_type, stream_input=h.stream_input, stream_output=h.stream_output,
                                     balanced=balanced)
            for h in self._rpc_handlers
        ))

    async def serve_direct(self, host: str, port: int, announce_host: str) -> str:
        """Also serves rpc_inference and rpc_push on direct TCP connections (swarmlm.experts.direct) at host:port
        (0: any free port), and pushes steps over them to peers that announce one; returns the address to
        announce. Call after add_p2p_handlers."""
        self.direct = DirectListener(self._p2p.peer_id.to_base58(),
                                     {"inference": self._serve_inference, "push": self._serve_pushes})
        return await self.direct.start(host, port, announce_host)

    async def remove_handlers(self) -> None:
        """Stops serving: no new p2p streams; direct connections and our push streams closed."""
        if self.direct is not None:
            await self.direct.stop()
        for stream in self._push_streams.values():
            stream.close()
        if self._p2p is not None:
            await self.remove_p2p_handlers(self._p2p)

    # ---- validation of remote input -------------------------------------------------------------

    def _check_span(self, request: SpanRequest, span: BlockSpan) -> tuple[int, int]:
        """Returns the requested blocks relative to `span` (the peer's span when the request came;
        a request keeps using it even if the peer moves meanwhile)."""
        if request.model != self.model:
            raise RequestError(f"this peer serves model {self.model!r}, not {request.model!r}")
        if not span.start <= request.start < request.end <= span.end:
            raise RequestError(
                f"blocks {request.start}:{request.end} of {self.model} are not served here "
                f"(this peer serves {span.start}:{span.end})"
            )
        return request.start - span.start, request.end - span.start

    def _tensor(self, proto: runtime_pb2.Tensor, what: str, max_elements: int) -> torch.Tensor:
        return deserialize_bounded(proto, max_elements, what)

    def _parse_prompts(self, tensors, prompt_tokens: int, num_blocks: int):
        """Splits off the trailing deep-prompts tensor [num_blocks, prompt_tokens, hidden] (if announced)."""
        if prompt_tokens == 0:
            return tensors, None
        if len(tensors) < 1:
            raise RequestError("the request announces deep prompts but carries no tensors")
        hidden_size, max_tokens = self.limits.hidden_size, self.limits.max_request_tokens
        if num_blocks * prompt_tokens > max_tokens:
            raise RequestError(f"deep prompts for {num_blocks} blocks x {prompt_tokens} tokens exceed this peer's "
                               f"limit of {max_tokens} (blocks x prompt tokens)")
        prompts = self._tensor(tensors[-1], "prompts", num_blocks * prompt_tokens * hidden_size)
        if prompts.shape != (num_blocks, prompt_tokens, hidden_size):
            raise RequestError(f"prompts must be [{num_blocks}, {prompt_tokens}, {hidden_size}], got {list(prompts.shape)}")
        if prompts.dtype not in FLOAT_DTYPES or not all_finite(prompts):
            raise RequestError(f"prompts must be finite float32/float16/bfloat16, got {prompts.dtype}")
        return tensors[:-1], prompts.to(self.device, self.dtype)

    def _parse_inputs(self, tensors, expect_grad: bool = False, mask_offset: int = 0, prompts=None):
        """Parses [hidden, (grad,) position_ids, (attention_mask)] into validated tensors. The checks run on numpy
        views of the message (array_bounded); torch tensors are made once, at the end."""
        limits = self.limits
        n_required = 3 if expect_grad else 2
        if not n_required <= len(tensors) <= n_required + 1:
            raise RequestError(f"expected {n_required} or {n_required + 1} tensors, got {len(tensors)}")
        max_elems = limits.max_request_tokens * limits.hidden_size
        hidden = array_bounded(tensors[0], max_elems, "hidden_states")
        if hidden.ndim != 3 or hidden.shape[-1] != limits.hidden_size:
            raise RequestError(f"hidden_states must be [batch, seq, {limits.hidden_size}], got {list(hidden.shape)}")
        batch, seq = hidden.shape[:2]
        if batch < 1 or seq < 1 or batch > limits.max_batch_size or batch * seq > limits.max_request_tokens:
            raise RequestError(
                f"hidden_states shape {list(hidden.shape)} is outside limits (batch <= {limits.max_batch_size}, "
                f"batch x seq <= {limits.max_request_tokens}, both >= 1)"
            )
        if hidden.dtype not in FLOAT_DTYPES or not all_finite(hidden):
            raise RequestError(f"hidden_states must be finite float32/float16/bfloat16, got {hidden.dtype}")
        grad = None
        if expect_grad:
            grad = array_bounded(tensors[1], max_elems, "grad_outputs")
            if tuple(grad.shape) != tuple(hidden.shape) or grad.dtype not in FLOAT_DTYPES:
                raise RequestError(f"grad_outputs must match hidden_states {list(hidden.shape)}, got {list(grad.shape)}")
        position_ids = array_bounded(tensors[n_required - 1], batch * seq, "position_ids")
        if tuple(position_ids.shape) != (batch, seq) or position_ids.dtype not in INDEX_DTYPES:
            raise RequestError(f"position_ids must be int64 [{batch}, {seq}], got {position_ids.dtype} {list(position_ids.shape)}")
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= limits.max_session_length:
            raise RequestError(f"position_ids must lie in [0, {limits.max_session_length})")
        mask = None
        if len(tensors) == n_required + 1:
            mask = array_bounded(tensors[-1], batch * (mask_offset + seq), "attention_mask")
            if tuple(mask.shape) != (batch, mask_offset + seq):
                raise RequestError(f"attention_mask must be [{batch}, {mask_offset + seq}], got {list(mask.shape)}")
            if mask.dtype not in MASK_DTYPES or bool(((mask != 0) & (mask != 1)).any()):
                raise RequestError("attention_mask must hold only 0 and 1")
            mask = as_tensor(mask).to(torch.bool)
        if prompts is not None and prompts.shape[1] > seq:
            raise RequestError(f"{prompts.shape[1]} prompt tokens do not fit in a sequence of {seq}")
        return (self._placed(as_tensor(hidden)), self._placed(as_tensor(grad)) if grad is not None else None,
                self._placed(as_tensor(position_ids), torch.int64), mask)

    def _placed(self, tensor: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """`tensor` on the peer's device in `dtype` (default: the blocks' dtype); no torch call when it already is."""
        dtype = self.dtype if dtype is None else dtype
        if tensor is None or (tensor.dtype == dtype and tensor.device == self.device):
            return tensor
        return tensor.to(self.device, dtype)

    def _runs_inline(self, hidden: torch.Tensor, num_blocks: int) -> bool:
        """Whether an inference step runs right on the event loop instead of the compute thread: only a
        few tokens on a frozen CPU peer whose recent small steps took under INLINE_STEP_SECONDS for these
        blocks (the first ones always go to the compute thread, which measures them). The hand-off to the
        compute thread and back costs about 0.25 ms per step on a busy 2-core machine, a tenth of a small
        model's step; a step this short holds up the loop's other streams only briefly."""
        return (self.trainer is None and self.device.type == "cpu" and hidden.shape[0] * hidden.shape[1] <= INLINE_MAX_TOKENS
                and num_blocks * self.small_step_block_seconds <= INLINE_STEP_SECONDS)

    async def _run(self, fn, *args, timeout: Optional[float] = None, counting: Optional["_Counting"] = None):
        """Runs `fn` on the compute thread under `timeout` (default: the request timeout). With `counting` (passed
        on to `fn`), a job that runs out of time, or whose caller goes away, counts nothing: unless `fn` already
        began counting, then its result is awaited and answered (see _Counting)."""
        loop = asyncio.get_running_loop()
        timeout = self.limits.request_timeout if timeout is None else timeout
        job = loop.run_in_executor(self.compute, fn if counting is None else partial(fn, counting=counting), *args)
        try:
            return await asyncio.wait_for(job if counting is None else asyncio.shield(job), timeout)
        except asyncio.TimeoutError:
            if counting is None or counting.abandon():
                raise RequestError(f"the request took longer than its timeout of {timeout:.3g} s (the peer's "
                                   f"request timeout, or less if the caller waits less)") from None
            return await job  # it is counting its gradients already: they go back to the caller
        except asyncio.CancelledError:
            if counting is not None:
                counting.abandon()
            raise

    def _timeout(self, meta: SpanRequest) -> float:
        """Seconds a forward/backward call may take here: the peer's request timeout, or CALLER_TIMEOUT_SHARE of
        the caller's if that is shorter."""
        if meta.timeout is None:
            return self.limits.request_timeout
        return min(self.limits.request_timeout, meta.timeout * CALLER_TIMEOUT_SHARE)

    async def _span_request(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """The one message of a stateless call -> (request, its SpanRequest, the span it runs on (a later move
        of this peer does not affect the call), first and last block within that span)."""
        request = await _first(requests, self.limits.request_timeout)
        span, meta = self.span, unpack(request.metadata, SpanRequest)
        first, last = self._check_span(meta, span)
        return request, meta, span, first, last

    async def _stateless_call(self, kind: str, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                              context: P2PContext, answer) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """One stateless call (forward, backward, state): `answer(request, meta, span, first, last)` yields the
        responses; any failure is answered in-band. While the peer shuts down, new calls are refused with a
        clear error (the caller retries on another peer); a call that was accepted counts in `active_calls`
        until its caller has read the whole answer, so that shutdown can wait for it."""
        accepted = self.accepting_sessions
        if accepted:
            self.active_calls += 1
        try:
            try:
                if not accepted:
                    raise RequestError(SHUTTING_DOWN)
                request, meta, span, first, last = await self._span_request(requests)
                async for response in answer(request, meta, span, first, last):
                    yield response
            except Exception as e:
                yield self._error(e, kind, context)
            await _drain(requests)
        finally:
            if accepted:
                self.active_calls -= 1

    # ---- forward / backward (stateless) ------------------------------------------------------------

    @metered("forward")
    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stateless_call("forward", requests, context, self._answer_forward):
            yield response

    async def _answer_forward(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        tensors, prompts = self._parse_prompts(request.tensors, meta.prompt_tokens, last - first)
        hidden, _, position_ids, mask = self._parse_inputs(tensors, prompts=prompts)
        output = await self._run(self._forward, span, hidden, position_ids, mask, first, last, prompts,
                                 timeout=self._timeout(meta))
        yield runtime_pb2.ExpertResponse(tensors=[serialize(output)])

    def _forward(self, span, hidden, position_ids, mask, first, last, prompts=None):
        with torch.inference_mode():
            return span(hidden, position_ids, mask, first=first, last=last, prompts=prompts).float()

    @metered("backward")
    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._stateless_call("backward", requests, context, self._answer_backward):
            yield response

    async def _answer_backward(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        tensors, prompts = self._parse_prompts(request.tensors, meta.prompt_tokens, last - first)
        hidden, grad, position_ids, mask = self._parse_inputs(tensors, expect_grad=True, prompts=prompts)
        if self.trainer is not None and not all_finite(grad):
            raise RequestError("grad_outputs must be finite (this peer trains its blocks with them)")
        grads = await self._run(self._backward, span, hidden, grad, position_ids, mask, first, last, prompts,
                                timeout=self._timeout(meta), counting=_Counting() if self.trainer is not None else None)
        yield runtime_pb2.ExpertResponse(tensors=[serialize(g) for g in grads])

    def _backward(self, span, hidden, grad, position_ids, mask, first, last, prompts=None,
                  counting: Optional["_Counting"] = None) -> list[torch.Tensor]:
        """-> [grad of hidden] (+ [grad of prompts] when deep prompts were sent). On a training peer, the
        gradients of the span's parameters go to the trainer (the micro-batch counts hidden.shape[0] samples),
        unless `counting` says that the request gave up meanwhile (its caller retries elsewhere)."""
        trainer = self.trainer if self.trainer is not None and span is self.trainer.span else None
        params = trainer.parameters if trainer is not None else []
        with torch.enable_grad():
            inputs = [hidden.detach().requires_grad_(True)]
            if prompts is not None:
                inputs.append(prompts.detach().requires_grad_(True))
            output = span(inputs[0], position_ids, mask, first=first, last=last,
                          prompts=inputs[1] if prompts is not None else None)
            grads = torch.autograd.grad(output, inputs + params, grad, allow_unused=bool(params))
        if trainer is not None:
            if counting is not None and not counting.begin():
                self.metrics.micro_batch_dropped()
                logger.info(f"Dropped the parameter gradients of a micro-batch of {hidden.shape[0]}: its request "
                            f"gave up before they were ready")
            else:
                trainer.accumulate(grads[len(inputs):], batch_size=hidden.shape[0])  # blocks outside [first, last): None
        return [g.float() for g in grads[:len(inputs)]]

    # ---- live state ----------------------------------------------------------------------------------

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        info = PeerInfo(start=self.span.start, end=self.span.end, free_cache_tokens=max(self.budget.free_tokens, 0),
                        accepting_sessions=self.accepting_sessions, active_calls=self.active_calls,
                        training_epoch=self.trainer.epoch if self.trainer is not None else None,
                        direct_address=self.direct.address if self.direct is not None else None)
        return runtime_pb2.ExpertResponse(metadata=pack(info))

    async def rpc_state(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The current tensors of the requested blocks with their checkpoint names (see SpanService.rpc_state)."""
        async for response in self._stateless_call("state", requests, context, self._answer_state):
            yield response

    async def _answer_state(self, request, meta: SpanRequest, span: BlockSpan, first: int, last: int):
        if request.tensors or meta.prompt_tokens or meta.max_length is not None or meta.batch_size is not None:
            raise RequestError("a state request names only the model and blocks (no tensors, prompts or session)")
        epoch, named = await self._run(self._snapshot, span, first, last)
        for name, tensor in named:
            header = pack(StateTensor(name=name, training_epoch=epoch))
            for i, chunk in enumerate(split_for_streaming(serialize(tensor), STATE_CHUNK_BYTES)):
                yield runtime_pb2.ExpertResponse(tensors=[chunk], metadata=header if i == 0 else b"")

    def _snapshot(self, span: BlockSpan, first: int, last: int) -> tuple[Optional[int], list[tuple[str, torch.Tensor]]]:
        """(training epoch, [(checkpoint name, CPU copy)]) of blocks [first, last) of `span`, taken on the compute
        thread, so that no optimizer step falls between two tensors."""
        epoch = self.trainer.epoch if self.trainer is not None and span is self.trainer.span else None
        named = []
        for j in range(first, last):
            prefix = f"{span.family.block_prefix}{span.start + j}."
            named += [(prefix + name, tensor.detach().to("cpu", copy=True))
                      for name, tensor in span.layers[j].state_dict().items()]
        return epoch, named

    # ---- inference sessions (server-side KV cache) -------------------------------------------------

    def max_message_bytes(self, prompts: bool = True) -> int:
        """The largest inference message read: float32 hidden states of max_request_tokens tokens, as much
        again for deep prompts (see _parse_prompts; pushed steps carry none: `prompts=False`), 16 bytes per
        token for position ids and mask, and 1 MiB for metadata and framing."""
        tokens, hidden_size = self.limits.max_request_tokens, self.limits.hidden_size
        return 4 * tokens * hidden_size * (2 if prompts else 1) + 16 * tokens + 2**20

    async def _serve_inference(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """rpc_inference: a session. First message = SpanRequest (max_length, batch_size); then one message per step.

        Each step carries [hidden, position_ids, (attention_mask for the new tokens)] and
        InferenceStep(position); `position` may be below the cached length to rewind the session.
        Steps may also arrive from the previous peer of the client's route (rpc_push); all are answered here,
        one frame per answer."""
        context = P2PContext(handle_name="rpc_inference", local_id=self._p2p.peer_id, remote_id=info.peer_id)
        inbox = _Inbox(reader, self.max_message_bytes())
        try:
            async with aclosing(self._serve_session(inbox, context, inbox)) as responses:
                async for response in responses:
                    writer.write(stream_frame(response))
                    await writer.drain()  # returns at once unless the caller reads slowly
        except ConnectionError as e:  # the caller left; its session ends here
            logger.debug(f"Inference stream of {info.peer_id} broke: {type(e).__name__}: {e}")
        finally:
            inbox.close()
            writer.close()

    @metered("inference")
    async def _serve_session(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext,
                             inbox: "_Inbox") -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """rpc_inference's work: `requests` iterates over `inbox` (through the metering tap)."""
        reservation, session_id = None, None
        try:
            open_request = unpack((await _first(requests, self.limits.session_timeout)).metadata, SpanRequest)
            span = self.span
            first, last = self._check_span(open_request, span)
            max_length, batch = open_request.max_length, open_request.batch_size
            if max_length is None or batch is None:
                raise RequestError("an inference session needs max_length and batch_size")
            if max_length > self.limits.max_session_length or batch > self.limits.max_batch_size:
                raise RequestError(
                    f"session of batch {batch} x max_length {max_length} exceeds this peer's limits "
                    f"(batch <= {self.limits.max_batch_size}, max_length <= {self.limits.max_session_length})"
                )
            if not self.accepting_sessions:
                raise RequestError(SHUTTING_DOWN)
            if open_request.session_id is not None and open_request.session_id in self._sessions:
                raise RequestError("a session with this session_id is already open here")
            reservation = self.budget.reserve(batch * max_length)
            self.active_sessions += 1
            if open_request.session_id is not None:
                session_id = open_request.session_id
                self._sessions[session_id] = inbox
            yield runtime_pb2.ExpertResponse(metadata=pack(StepResult(position=0)))
            session = _Session(span=span, cache=span.new_cache(first, last), first=first, last=last, batch=batch,
                               max_length=max_length)
            while True:
                try:
                    async with asyncio.timeout(self.limits.session_timeout):  # no task per message, unlike wait_for
                        message = await requests.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise RequestError(f"session closed after {self.limits.session_timeout} s without a step") from None
                pushed = inbox.pushed_step is not None  # else from the session's client
                step = inbox.pushed_step if pushed else unpack(message.metadata, InferenceStep)
                if pushed and step.step_id <= session.last_step_id:
                    continue  # a push that came after its client sent the step itself (and it was served): dropped
                try:
                    parsed = self._parse_step(session, step, message.tensors)
                except RequestError as e:
                    if not pushed:
                        raise  # a bad step from the client ends the session
                    logger.info(f"Dropped a step pushed into a session of {context.remote_id}: {e}")
                    continue  # the client sends the step itself
                yield await self._inference_step(session, step, message.tensors, *parsed)
        except Exception as e:
            yield self._error(e, "inference", context)
            await _drain(requests)
        finally:
            if session_id is not None:
                self._sessions.pop(session_id, None)
            if reservation is not None:
                reservation.release()
                self.active_sessions -= 1

    async def _serve_pushes(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """rpc_push: steps pushed by another peer go to the inbox of their session (validated there, like a
        client's); a step for no open session is dropped. A stream that is not framed right is closed, and so is
        a stream beyond MAX_PUSH_STREAMS open to us."""
        if self._push_streams_in >= MAX_PUSH_STREAMS:
            logger.info(f"Refused a push stream of {info.peer_id}: {MAX_PUSH_STREAMS} are open")
            writer.close()
            return
        self._push_streams_in += 1
        try:
            while (message := await _frame_within(reader, self.max_message_bytes(prompts=False),
                                                  PUSH_IDLE_SECONDS * 2)) is not None:
                try:
                    step = unpack(message.metadata, InferenceStep)
                    inbox = self._sessions.get(step.session_id) if step.session_id is not None else None
                    if inbox is None:
                        raise RequestError(f"no open session {step.session_id!r} accepts pushed steps here")
                    inbox.push(message, step)
                except RequestError as e:
                    logger.info(f"Dropped a step pushed by {info.peer_id}: {e}")
        except RequestError as e:
            logger.info(f"Closed the push stream of {info.peer_id}: {e}")
        finally:
            self._push_streams_in -= 1
            writer.close()

    def _push(self, target: PushTarget, message: runtime_pb2.ExpertRequest) -> bool:
        """Sends `message` on our push stream to `target.peer_id`; False if that stream is not open (yet): it is
        opened in the background on first use and re-opened at most every PUSH_RETRY_SECONDS after it failed."""
        now = time.monotonic()
        if now - self._push_streams_checked >= PUSH_IDLE_SECONDS / 10:
            self._close_idle_push_streams(now)
        stream = self._push_streams.get(target.peer_id)
        if stream is not None and stream.expired(now):
            stream.close()
            del self._push_streams[target.peer_id]
            stream = None
        if stream is None:
            if len(self._push_streams) >= MAX_PUSH_STREAMS:
                self._close_idle_push_streams(now)
            if self._p2p is None or len(self._push_streams) >= MAX_PUSH_STREAMS:
                return False
            try:
                peer_id = PeerID.from_base58(target.peer_id)
            except Exception:
                return False
            self._push_streams[target.peer_id] = _PushStream(self._p2p, peer_id, direct=self.direct is not None)
            return False
        if not stream.send(message):
            return False
        self.metrics.step_pushed("direct" if stream.direct else "p2p")
        return True

    def _close_idle_push_streams(self, now: float) -> None:
        """Closes and forgets the push streams that carried nothing for PUSH_IDLE_SECONDS (and failed ones that
        may be retried), so that a long-lived peer keeps only the streams its current routes use."""
        self._push_streams_checked = now
        for peer_id, stream in list(self._push_streams.items()):
            if stream.expired(now):
                stream.close()
                del self._push_streams[peer_id]

    def _parse_step(self, session: "_Session", step: InferenceStep, tensors):
        """Validates a step against its session -> (hidden, position_ids, mask, prompts)."""
        if step.position > session.length:
            raise RequestError(f"step starts at position {step.position} but the session holds {session.length} tokens")
        if step.prompt_tokens and step.position != 0:
            raise RequestError("deep prompts can only come with a step at position 0")
        tensors, prompts = self._parse_prompts(tensors, step.prompt_tokens, session.last - session.first)
        hidden, _, position_ids, mask = self._parse_inputs(tensors, prompts=prompts)
        if hidden.shape[0] != session.batch:
            raise RequestError(f"session batch is {session.batch}, step has batch {hidden.shape[0]}")
        if step.position + hidden.shape[1] > session.max_length:
            raise RequestError(
                f"step would grow the session to {step.position + hidden.shape[1]} tokens, beyond its max_length {session.max_length}"
            )
        return hidden, position_ids, mask, prompts

    async def _inference_step(self, session: "_Session", step: InferenceStep, tensors, hidden, position_ids, mask,
                              prompts) -> runtime_pb2.ExpertResponse:
        """Runs a step validated by _parse_step; pushes its output on (step.push_to) and returns the answer."""
        if self._runs_inline(hidden, session.last - session.first):
            output = self._step(session, step.position, hidden, position_ids, mask, prompts)
        else:
            output = await self._run(self._step, session, step.position, hidden, position_ids, mask, prompts)
        session.last_step_id = max(session.last_step_id, step.step_id)
        serialized, pushed = serialize(output), False
        if step.push_to and not step.prompt_tokens:  # first to the next peer: it is on the critical path
            target = step.push_to[0]
            pushed = self._push(target, runtime_pb2.ExpertRequest(tensors=[serialized, *tensors[1:]], metadata=pack(
                InferenceStep(position=step.position, step_id=step.step_id, push_to=list(step.push_to[1:]),
                              session_id=target.session_id))))
        return runtime_pb2.ExpertResponse(tensors=[serialized], metadata=pack(
            StepResult(position=session.length, step_id=step.step_id, pushed=pushed)))

    def _step(self, session: "_Session", position: int, hidden, position_ids, new_mask, prompts=None):
        started = time.perf_counter()
        output = self._step_span(session, position, hidden, position_ids, new_mask, prompts)
        if hidden.shape[0] * hidden.shape[1] <= INLINE_MAX_TOKENS:  # exponential average, for _runs_inline
            seconds = (time.perf_counter() - started) / (session.last - session.first)
            previous = self.small_step_block_seconds
            self.small_step_block_seconds = seconds if previous == float("inf") else 0.8 * previous + 0.2 * seconds
        return output

    def _step_span(self, session: "_Session", position: int, hidden, position_ids, new_mask, prompts=None):
        with torch.inference_mode():
            if position < session.length:
                session.cache.truncate(position)
                session.mask = session.mask[:, :position] if session.mask is not None else None
            seq = hidden.shape[1]
            if new_mask is not None or session.mask is not None:
                old = session.mask if session.mask is not None else torch.ones(session.batch, position, dtype=torch.bool)
                new = new_mask if new_mask is not None else torch.ones(session.batch, seq, dtype=torch.bool)
                session.mask = torch.cat([old, new], dim=1)
            output = session.span(hidden, position_ids, session.mask, session.cache, first=session.first,
                                  last=session.last, prompts=prompts)
            session.length = position + seq
            return output.float()

    # ---- errors ------------------------------------------------------------------------------------

    def _error(self, error: Exception, kind: str, context: P2PContext) -> runtime_pb2.ExpertResponse:
        if isinstance(error, RequestError):
            logger.info(f"Refused {kind} request from {context.remote_id}: {error}")
        else:
            logger.warning(f"{kind} request from {context.remote_id} failed", exc_info=error)
        return error_response(error)

    def shutdown(self) -> None:
        for stream in self._push_streams.values():
            stream.close()
        self.compute.shutdown(wait=False, cancel_futures=True)


class _Counting:
    """Decides once, between a backward job on the compute thread and its request on the event loop, whether
    the job's parameter gradients count: the job calls `begin` right before it counts them, the request calls
    `abandon` when it runs out of time or its caller goes away; whichever comes first wins. So a micro-batch is
    counted only by a peer that answers it (a caller that got no answer retries it on another peer)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counted: Optional[bool] = None

    def begin(self) -> bool:
        """The job may count its gradients (True), or the request gave up (False)."""
        with self._lock:
            if self._counted is None:
                self._counted = True
            return self._counted

    def abandon(self) -> bool:
        """The job will count nothing (True), or it began counting already (False: its answer must follow)."""
        with self._lock:
            if self._counted is None:
                self._counted = False
            return not self._counted


@dataclass
class _Session:
    span: BlockSpan  # the span the session was opened on (kept if the peer moves meanwhile)
    cache: object
    first: int
    last: int
    batch: int
    max_length: int
    length: int = 0
    mask: Optional[torch.Tensor] = None  # [batch, length] bool, None while all ones
    last_step_id: int = 0  # highest InferenceStep.step_id served (pushed steps up to it are stale)


class _Inbox:
    """The messages of one inference session: its caller's raw stream merged with the steps other peers push
    into it. Iterating ends when the caller's stream ends; a caller's message that cannot be read (see
    read_frame) raises RequestError, then iterating ends. After each message, `pushed_step` is its parsed
    InferenceStep if another peer pushed it (parsed once, by rpc_push), None if it came from the caller."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int):
        self.pushed_step: Optional[InferenceStep] = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pushed = 0  # pushed steps in the queue
        self._room = asyncio.Semaphore(MAX_WAITING_STEPS)  # for the caller's steps in the queue
        self._pump = asyncio.create_task(self._forward_caller(reader, max_bytes))

    async def _forward_caller(self, reader: asyncio.StreamReader, max_bytes: int) -> None:
        try:
            while True:
                await self._room.acquire()  # a caller that sends faster than the session runs waits in its stream
                message = await read_frame(reader, max_bytes)
                if message is None:
                    break
                self._queue.put_nowait((None, message))
        except RequestError as e:
            self._queue.put_nowait((None, e))
        finally:
            self._queue.put_nowait((None, None))

    def push(self, message: runtime_pb2.ExpertRequest, step: InferenceStep) -> None:
        if self._pushed >= MAX_WAITING_PUSHES:
            raise RequestError(f"the session already holds {MAX_WAITING_PUSHES} pushed steps")
        self._pushed += 1
        self._queue.put_nowait((step, message))

    def __aiter__(self) -> "_Inbox":
        return self

    async def __anext__(self) -> runtime_pb2.ExpertRequest:
        step, message = await self._queue.get()
        if message is None:
            self._queue.put_nowait((None, None))  # stays ended
            raise StopAsyncIteration
        if isinstance(message, RequestError):
            raise message
        if step is not None:
            self._pushed -= 1
        else:
            self._room.release()
        self.pushed_step = step
        return message

    def close(self) -> None:
        self._pump.cancel()


class _PushStream:
    """Our long-lived rpc_push stream to one peer; `closed` once it ends or fails (a new one is opened then).

    With `direct` (this peer serves direct connections itself), the stream is a direct connection if the target
    serves them too: its address comes from the target's own rpc_info answer over p2p, which authenticates the
    target (an address named by a client or a DHT record could be anyone's). Otherwise it is a p2p stream.

    Messages are written straight into the stream (hivemind's protobuf stream framing) as `send` is called,
    without waiting for a writer task, so a pushed step leaves before the answer to the client does. A push
    that was written but never arrives (the stream broke meanwhile) costs the client its push timeout, after
    which it sends the step itself (ClientConfig.push_timeout)."""

    MAX_BUFFERED_BYTES = 64 * 1024**2  # a target that reads slower than this is given up on
    INFO_TIMEOUT = 5.0  # seconds to wait for the target's rpc_info (its direct address)

    def __init__(self, p2p: P2P, peer_id: PeerID, direct: bool = False):
        self._writer: Optional[asyncio.StreamWriter] = None
        self.closed = False
        self.direct = False  # whether the stream is a direct connection
        self.started = self.last_used = time.monotonic()
        self._task = asyncio.create_task(self._run(p2p, peer_id, direct))

    async def _open(self, p2p: P2P, peer_id: PeerID, direct: bool):
        if direct:
            address = None
            try:
                async with asyncio.timeout(self.INFO_TIMEOUT):
                    response = await SpanService.get_stub(p2p, peer_id).rpc_info(runtime_pb2.ExpertRequest())
                address = unpack(response.metadata, PeerInfo).direct_address
                if address is not None:
                    reader, writer = await connect(address, peer_id.to_base58(), "push")
                    self.direct = True
                    return reader, writer
            except Exception as e:
                logger.info(f"No direct push connection to {peer_id} (at {address}): {type(e).__name__}: {e}; "
                            f"pushing over p2p")
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, SpanService._get_handle_name(None, "rpc_push"))
        return reader, writer

    async def _run(self, p2p: P2P, peer_id: PeerID, direct: bool) -> None:
        try:
            reader, writer = await self._open(p2p, peer_id, direct)
            self._writer = writer
            while await reader.read(2**16):  # the peer answers nothing; whatever comes is dropped, not kept
                pass
        except Exception as e:
            logger.debug(f"Push stream to {peer_id} ended: {type(e).__name__}: {e}")
        finally:
            self.closed = True
            if self._writer is not None:
                self._writer.close()

    def expired(self, now: float) -> bool:
        """Whether to drop this stream: idle for PUSH_IDLE_SECONDS, or failed PUSH_RETRY_SECONDS after it was
        opened (a new one may be opened then)."""
        return now - self.last_used >= PUSH_IDLE_SECONDS or (self.closed and now - self.started >= PUSH_RETRY_SECONDS)

    def send(self, message: runtime_pb2.ExpertRequest) -> bool:
        """Writes `message` into the stream; False (nothing sent) while it is not open or after it closed."""
        if self._writer is None or self.closed:
            return False
        if self._writer.transport.get_write_buffer_size() > self.MAX_BUFFERED_BYTES:
            self.close()
            return False
        self._writer.write(stream_frame(message))
        self.last_used = time.monotonic()
        return True

    def close(self) -> None:
        self.closed = True
        self._task.cancel()


async def _frame_within(reader: asyncio.StreamReader, max_bytes: int, seconds: float):
    """read_frame, or None (the stream is given up on) if no frame starts arriving within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await read_frame(reader, max_bytes)
    except TimeoutError:
        return None


async def _drain(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float = 2.0) -> None:
    """Reads the caller's stream to its end before closing ours, so the caller never writes into a
    closed stream (which would make it lose the answer to a broken pipe)."""
    async def drain():
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(drain(), timeout)
    except Exception:
        pass


async def _first(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float) -> runtime_pb2.ExpertRequest:
    try:
        return await asyncio.wait_for(requests.__anext__(), timeout)
    except StopAsyncIteration:
        raise RequestError("the request stream ended before the first message") from None
    except asyncio.TimeoutError:
        raise RequestError(f"no request within {timeout} s") from None
