"""Client side of a peer's RPCs (see swarmlm.experts.protocol.SpanService), run on the client's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
from typing import Awaitable, Optional, TypeVar

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmlm.errors import RemotePeerError
from swarmlm.experts.direct import connect
from swarmlm.experts.protocol import (
    END_OF_STREAM_FRAME,
    InferenceStep,
    PeerInfo,
    PushTarget,
    SpanRequest,
    SpanService,
    StepResult,
    check_response,
    deserialize_tensor,
    pack,
    serialize_all,
    stream_frame,
    unpack,
)

T = TypeVar("T")
logger = logging.getLogger(__name__)


def _stub(p2p: P2P, peer_id: str):
    return SpanService.get_stub(p2p, PeerID.from_base58(peer_id))


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


@contextlib.asynccontextmanager
async def answer_stream(p2p: P2P, peer_id: str, method: str, request: runtime_pb2.ExpertRequest):
    """The peer's answer stream to `request` (one message) over rpc `method`. Our side of the stream stays
    open until the block exits (the whole answer read): peers close their side only after ours ends
    (handler `_drain`), so a peer never closes first, which could make the p2p daemons drop the answer's tail."""
    answered = asyncio.Event()

    async def requests():
        yield request
        await answered.wait()

    try:
        yield await getattr(_stub(p2p, peer_id), method)(requests())
    finally:
        answered.set()


async def _unary_stream_call(p2p: P2P, peer_id: str, method: str, request: runtime_pb2.ExpertRequest,
                             timeout: float) -> list[torch.Tensor]:
    async def call():
        async with answer_stream(p2p, peer_id, method, request) as stream:
            async for response in stream:
                return [deserialize_tensor(t) for t in check_response(peer_id, response).tensors]
        raise RemotePeerError(peer_id, "closed the stream without an answer")

    return await call_peer(peer_id, call(), timeout, f"no answer within {timeout} s")


async def call_forward(p2p, peer_id, span: SpanRequest, hidden, position_ids, attention_mask, timeout,
                       prompts=None) -> torch.Tensor:
    """-> the span's output; `prompts` [blocks, span.prompt_tokens, hidden] are deep prompts for its blocks."""
    request = runtime_pb2.ExpertRequest(
        tensors=serialize_all(_inputs(hidden, position_ids, attention_mask, prompts=prompts)), metadata=pack(span)
    )
    return (await _unary_stream_call(p2p, peer_id, "rpc_forward", request, timeout))[0]


async def call_backward(p2p, peer_id, span: SpanRequest, hidden, grad, position_ids, attention_mask, timeout,
                        prompts=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (grad of hidden, grad of prompts or None)."""
    request = runtime_pb2.ExpertRequest(
        tensors=serialize_all(_inputs(hidden, position_ids, attention_mask, grad, prompts)), metadata=pack(span)
    )
    grads = await _unary_stream_call(p2p, peer_id, "rpc_backward", request, timeout)
    if len(grads) != (2 if prompts is not None else 1):
        raise RemotePeerError(peer_id, f"answered a backward call with {len(grads)} tensors")
    return grads[0], (grads[1] if prompts is not None else None)


async def call_info(p2p, peer_id: str, timeout: float) -> PeerInfo:
    """The peer's live state (rpc_info); also a round-trip probe. Raises RemotePeerError on failure."""
    async def call():
        response = await _stub(p2p, peer_id).rpc_info(runtime_pb2.ExpertRequest())
        return unpack(check_response(peer_id, response).metadata, PeerInfo)

    return await call_peer(peer_id, call(), timeout, f"no answer to a probe within {timeout} s", "probe failed: ")


class InferenceStream:
    """One open inference session with one peer (one hop of a route), on a direct TCP connection at `direct_address`
    if given (where the peer said it serves them, see RemoteSequential.probe; swarmlm.experts.direct), else on a
    raw p2p stream: each message is written as it is sent
    (hivemind's protobuf stream framing, one write, no writer task) and answers are read as they come; the peer
    reads the same framing on both (SpanHandler._serve_inference)."""

    def __init__(self, peer_id: str, span: SpanRequest, direct_address: Optional[str] = None):
        self.peer_id, self.direct_address = peer_id, direct_address
        self.span = span.model_copy(update=dict(session_id=secrets.token_hex(16)))  # lets other peers push steps here
        self.push_target = PushTarget(peer_id=peer_id, session_id=self.span.session_id)
        self.direct = False  # whether the session runs on a direct connection
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._opened = False
        self._last_step_id = 0  # of step()

    async def open(self, p2p: P2P, direct: bool = True) -> None:
        """Sends the session request, over the peer's direct address if it has one and `direct` (falling back to
        p2p if that fails); its answer is read with the first step (no extra round trip)."""
        if not (direct and await self.open_direct()):
            await self.open_p2p(p2p)

    async def open_direct(self) -> bool:
        """Opens the session on the peer's direct address; False (logged) if it has none or that fails."""
        if self.direct_address is None:
            return False
        try:
            self._reader, self._writer = await connect(self.direct_address, self.peer_id, "inference")
        except Exception as e:
            logger.info(f"No direct connection to {self.peer_id} at {self.direct_address} "
                        f"({type(e).__name__}: {e}); using p2p")
            return False
        self.direct = True
        self._write(stream_frame(runtime_pb2.ExpertRequest(metadata=pack(self.span))))
        return True

    async def open_p2p(self, p2p: P2P) -> None:
        """Opens the session on a p2p stream; RemotePeerError if that fails."""
        try:
            _, self._reader, self._writer = await p2p.call_binary_stream_handler(
                PeerID.from_base58(self.peer_id), SpanService._get_handle_name(None, "rpc_inference"))
        except Exception as e:
            raise RemotePeerError(self.peer_id, f"cannot open a session: {type(e).__name__}: {e}") from e
        self._write(stream_frame(runtime_pb2.ExpertRequest(metadata=pack(self.span))))

    def _write(self, frame: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise RemotePeerError(self.peer_id, "the session's stream is closed")
        self._writer.write(frame)

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
        request = runtime_pb2.ExpertRequest(
            tensors=serialize_all(_inputs(hidden, position_ids, mask_chunk, prompts=prompts)),
            metadata=pack(InferenceStep(position=position, prompt_tokens=prompt_tokens, step_id=step_id, push_to=push_to or [])),
        )
        self._write(stream_frame(request))

    async def receive(self, step_id: int, timeout: float) -> tuple[torch.Tensor, bool]:
        """-> (the output of step `step_id`, whether the peer pushed it on); answers of other steps (left
        over from a step that was sent twice after a failure) are skipped."""
        try:
            async with asyncio.timeout(timeout):  # no task per read, unlike wait_for (this is on every token's path)
                await self._writer.drain()  # returns at once unless much is still unsent
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
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self._reader)
        except asyncio.IncompleteReadError:
            raise RemotePeerError(self.peer_id, "closed the session") from None
        if error is not None:
            raise RemotePeerError(self.peer_id, f"session failed: {error.message}")
        return check_response(self.peer_id, response)

    def close(self) -> None:
        """Ends the session: the peer sees the end of our stream (and frees the session's cache)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(END_OF_STREAM_FRAME)
            self._writer.close()


class ForeignStream:
    """An InferenceStream that lives on another event loop (the client's shared one, where p2p streams run),
    driven from a session's own loop (see InferenceSession): each call is handed over to that loop."""

    HANDOVER_TIMEOUT = 30.0  # seconds for the other loop to take a step (it is stopped only when the client closes)

    def __init__(self, stream: InferenceStream, loop: asyncio.AbstractEventLoop):
        self.stream, self.loop = stream, loop
        self.peer_id, self.span, self.push_target = stream.peer_id, stream.span, stream.push_target
        self.direct = False

    @property
    def opened(self) -> bool:
        return self.stream.opened

    async def _there(self, coro: Awaitable[T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def open_p2p(self, p2p: P2P) -> None:
        await self._there(self.stream.open_p2p(p2p))

    def send(self, *args, **kwargs) -> None:
        async def send():
            self.stream.send(*args, **kwargs)

        try:  # raises what send raises (a closed stream)
            asyncio.run_coroutine_threadsafe(send(), self.loop).result(self.HANDOVER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise RemotePeerError(self.peer_id, "the client's network thread did not take the step (is the client "
                                                "closed?)") from None

    async def receive(self, step_id: int, timeout: float) -> tuple[torch.Tensor, bool]:
        return await self._there(self.stream.receive(step_id, timeout))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stream.close)
