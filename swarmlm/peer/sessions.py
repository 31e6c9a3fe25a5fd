"""Inference sessions: a KV cache per session, stepped by its client's channel and by pushes from other peers.

A session is opened by the first message of an `inference` channel (SpanRequest: blocks, max_length, batch,
optional session_id), reserves batch x max_length cache tokens, then serves one step per message until the
client ends the channel, times out (session_timeout) or sends a bad step. Steps that the route's previous
peer pushes (swarmlm.peer.push) into a session opened with a session_id join the same queue (`Inbox`), from the
one peer the client named (push_from) only.
Every answer is a frame on the client's channel; every failure is answered in-band, then the session ends.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

import torch
from hivemind.proto import runtime_pb2

from swarmlm.errors import RequestError
from swarmlm.experts.protocol import InferenceStep, SpanRequest, StepResult, pack, serialize, unpack
from swarmlm.experts.span import BlockSpan
from swarmlm.monitoring.rpc_tap import metered
from swarmlm.transport import Channel

if TYPE_CHECKING:
    from swarmlm.peer.handler import SpanHandler

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "this peer is shutting down: it takes no new sessions or requests; use another peer"
MAX_WAITING_PUSHES = 8  # pushed steps a session holds before it drops more
MAX_WAITING_STEPS = 8  # steps from its caller a session holds unread before it stops reading the caller's stream


@dataclass
class Session:
    span: BlockSpan  # the span the session was opened on (kept if the peer moves meanwhile)
    cache: object
    first: int
    last: int
    batch: int
    max_length: int
    length: int = 0
    mask: Optional[torch.Tensor] = None  # [batch, length] bool, None while all ones
    last_step_id: int = 0  # highest InferenceStep.step_id served (pushed steps up to it are stale)


class Inbox:
    """The messages of one inference session: its caller's channel merged with the steps other peers push
    into it. Iterating ends when the caller's channel ends; a caller's message that cannot be read (see
    framing.read_message) raises RequestError, then iterating ends. After each message, `pushed_step` is its
    parsed InferenceStep if another peer pushed it (parsed once, by the push stream), None if it came from
    the caller. `aclose` stops reading the caller and waits for that."""

    def __init__(self, channel: Channel, max_bytes: int):
        self.source = channel.source  # whom the session's KV cache counts against (CacheBudget)
        self.pushed_step: Optional[InferenceStep] = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pushed = 0  # pushed steps in the queue
        self._room = asyncio.Semaphore(MAX_WAITING_STEPS)  # for the caller's steps in the queue
        self._pump = asyncio.create_task(self._forward_caller(channel, max_bytes))

    async def _forward_caller(self, channel: Channel, max_bytes: int) -> None:
        try:
            while True:
                await self._room.acquire()  # a caller that sends faster than the session runs waits in its stream
                message = await channel.receive(runtime_pb2.ExpertRequest, max_bytes)
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

    def __aiter__(self) -> "Inbox":
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

    async def aclose(self) -> None:
        self._pump.cancel()
        await asyncio.wait([self._pump])


class Sessions:
    """The inference sessions of one SpanHandler (its span, limits, parser, compute, pushes and cache budget)."""

    def __init__(self, handler: "SpanHandler"):
        self.handler = handler
        self.active = 0  # open sessions
        self._inboxes: dict[str, tuple[Inbox, str]] = {}  # session_id -> (inbox, the peer whose pushes it takes)

    def deliver(self, step: InferenceStep, message: runtime_pb2.ExpertRequest, pusher: str) -> None:
        """A step pushed by the peer `pusher` (proven by the transport) -> its session's inbox; RequestError unless
        an open session of that id takes pushes from that peer (knowing a session id is not enough)."""
        inbox, allowed = self._inboxes.get(step.session_id, (None, None)) if step.session_id is not None else (None, None)
        if inbox is None or pusher != allowed:
            raise RequestError("no open session here takes steps pushed by this peer under that session id")
        inbox.push(message, step)

    async def serve(self, channel: Channel) -> None:
        """An `inference` channel: one session, answered frame by frame on the same channel."""
        inbox = Inbox(channel, self.handler.limits.max_message_bytes())
        try:
            async with aclosing(self._serve_session(inbox, channel.peer, inbox)) as responses:
                async for response in responses:
                    channel.send(response)
                    await channel.drain()  # returns at once unless the caller reads slowly
        except ConnectionError as e:  # the caller left; its session ends here
            logger.debug(f"Inference stream of {channel.peer} broke: {type(e).__name__}: {e}")
        finally:
            channel.close()
            await inbox.aclose()

    @property
    def metrics(self):  # for @metered
        return self.handler.metrics

    @metered("inference")
    async def _serve_session(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], caller: str,
                             inbox: Inbox) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The session's work: `requests` iterates over `inbox` (through the metering tap)."""
        h = self.handler
        reservation, session_id = None, None
        try:
            open_request = unpack((await first_request(requests, min(h.limits.open_timeout, h.limits.session_timeout))
                                   ).metadata, SpanRequest)
            span = h.span
            first, last = h.parser.check_span(open_request, span)
            max_length, batch = h.parser.check_session(open_request)
            if not h.accepting_sessions:
                raise RequestError(SHUTTING_DOWN)
            if open_request.session_id is not None and open_request.session_id in self._inboxes:
                raise RequestError("a session with this session_id is already open here")
            reservation = h.budget.reserve(batch * max_length, inbox.source)
            self.active += 1
            if open_request.session_id is not None and open_request.push_from is not None:
                session_id = open_request.session_id
                self._inboxes[session_id] = (inbox, open_request.push_from)
            yield runtime_pb2.ExpertResponse(metadata=pack(StepResult(position=0)))
            session = Session(span=span, cache=span.new_cache(first, last), first=first, last=last, batch=batch,
                              max_length=max_length)
            while True:
                try:
                    async with asyncio.timeout(h.limits.session_timeout):  # no task per message, unlike wait_for
                        message = await requests.__anext__()
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise RequestError(f"session closed after {h.limits.session_timeout} s without a step") from None
                pushed = inbox.pushed_step is not None  # else from the session's client
                step = inbox.pushed_step if pushed else unpack(message.metadata, InferenceStep)
                if pushed and step.step_id <= session.last_step_id:
                    continue  # a push that came after its client sent the step itself (and it was served): dropped
                try:
                    parsed = h.parser.parse_step(session, step, message.tensors)
                except RequestError as e:
                    if not pushed:
                        raise  # a bad step from the client ends the session
                    logger.info(f"Dropped a step pushed into a session of {caller}: {e}")
                    continue  # the client sends the step itself
                yield await self._step(session, step, message.tensors, *parsed)
        except Exception as e:
            yield h.error(e, "inference", caller)
            await drain(requests)
        finally:
            if session_id is not None:
                self._inboxes.pop(session_id, None)
            if reservation is not None:
                reservation.release()
                self.active -= 1

    async def _step(self, session: Session, step: InferenceStep, tensors, hidden, position_ids, mask,
                    prompts) -> runtime_pb2.ExpertResponse:
        """Runs a step validated by parse_step; pushes its output on (step.push_to) and returns the answer."""
        output = await self.handler.blocks.inference_step(session, step.position, hidden, position_ids, mask, prompts)
        session.last_step_id = max(session.last_step_id, step.step_id)
        serialized, pushed = serialize(output), False
        if step.push_to and not step.prompt_tokens:  # first to the next peer: it is on the critical path
            target = step.push_to[0]
            pushed = self.handler.pushes.push(target, runtime_pb2.ExpertRequest(tensors=[serialized, *tensors[1:]], metadata=pack(
                InferenceStep(position=step.position, step_id=step.step_id, push_to=list(step.push_to[1:]),
                              session_id=target.session_id))))
        return runtime_pb2.ExpertResponse(tensors=[serialized], metadata=pack(
            StepResult(position=session.length, step_id=step.step_id, pushed=pushed)))


async def drain(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float = 2.0) -> None:
    """Reads the caller's stream to its end before closing ours, so the caller never writes into a
    closed stream (which would make it lose the answer to a broken pipe)."""
    async def drain_all():
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(drain_all(), timeout)
    except Exception:
        pass


async def first_request(requests: AsyncIterator[runtime_pb2.ExpertRequest], timeout: float) -> runtime_pb2.ExpertRequest:
    try:
        return await asyncio.wait_for(requests.__anext__(), timeout)
    except StopAsyncIteration:
        raise RequestError("the request stream ended before the first message") from None
    except asyncio.TimeoutError:
        raise RequestError(f"no request within {timeout} s") from None
