"""`@metered(kind)`: measures a peer's streaming RPC from the messages it receives and sends.

Put it on a `SpanHandler` method (an async generator from `ExpertRequest`s to `ExpertResponse`s, called
as `method(requests, context, *more)`) whose object has a `metrics` attribute (a PeerMetrics). It records:
- payload bytes of every message received and sent;
- for every answer that carries tensors (a served forward/backward request or inference step):
  the tokens of the request it answers (batch x seq of its hidden states, the first tensor) and
  the seconds between receiving that request and sending the answer;
- when the call ends, its outcome: the code of the error answer it sent (bad_request, busy, or
  error for anything else), "ok" if it answered without an error, "error" if it raised or was
  cut off before answering anything.
The handler's own logic, timeouts and error answers are unchanged; it only sees a re-yielded stream.
"""

from __future__ import annotations

import functools
import time
from contextlib import aclosing
from typing import AsyncIterator, Optional

from hivemind.proto import runtime_pb2

from swarmlm.errors import RemotePeerError
from swarmlm.experts.protocol import check_response
from swarmlm.monitoring.metrics import PeerMetrics

_OUTCOME_OF_CODE = {"bad_request": "bad_request", "busy": "busy"}  # any other error code counts as "error"


def metered(kind: str):
    """Decorates an rpc_* async generator method; see the module docstring."""

    def decorate(method):
        @functools.wraps(method)
        async def wrapper(self, requests, context, *args):
            tap = _Tap(self.metrics, kind)
            try:
                async with aclosing(method(self, tap.received(requests), context, *args)) as responses:
                    async for response in responses:
                        tap.sent(response)
                        yield response
            except Exception:  # not cancellation: the caller leaving is judged by what was answered
                tap.failed = True
                raise
            finally:
                self.metrics.request_finished(kind, tap.outcome())

        return wrapper

    return decorate


class _Tap:
    """The state of one metered call: the request awaiting its answer, and what was answered."""

    def __init__(self, metrics: PeerMetrics, kind: str):
        self.metrics, self.kind = metrics, kind
        self.pending: Optional[tuple[float, runtime_pb2.ExpertRequest]] = None  # (received at, request)
        self.answered = False
        self.error_code: Optional[str] = None
        self.failed = False

    async def received(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        async for request in requests:
            self.metrics.bytes_received(self.kind, request.ByteSize())
            self.pending = (time.perf_counter(), request)
            yield request

    def sent(self, response: runtime_pb2.ExpertResponse) -> None:
        self.metrics.bytes_sent(self.kind, response.ByteSize())
        self.answered = True
        pending, self.pending = self.pending, None
        code = _error_code(response)
        if code is not None:
            self.error_code = code
        elif response.tensors and pending is not None:
            received_at, request = pending
            self.metrics.step_served(self.kind, _tokens(request), time.perf_counter() - received_at)

    def outcome(self) -> str:
        if self.error_code is not None:
            return _OUTCOME_OF_CODE.get(self.error_code, "error")
        return "ok" if self.answered and not self.failed else "error"


def _error_code(response: runtime_pb2.ExpertResponse) -> Optional[str]:
    try:
        check_response("", response)
    except RemotePeerError as e:
        return e.code or "internal"
    return None


def _tokens(request: runtime_pb2.ExpertRequest) -> int:
    """batch x seq of the request's hidden states (validated by the handler before it answered)."""
    batch, seq = request.tensors[0].size[:2]
    return batch * seq
