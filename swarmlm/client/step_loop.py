"""StepLoop: where one inference session's steps run. The one seam between the client's two event loops.

Why two: hivemind's P2P (its streams, the DHT's reads, probes) lives on the client's network thread
(`RemoteSequential.loop`), and a p2p stream cannot move to another loop. A step run there costs the calling
thread a hand-off to that thread and back, about 0.15 ms per token on a 2-core machine. A route whose hops are
all direct connections (plain TCP, swarmlm.transport.direct) needs none of P2P, so its session gets its own
event loop, run in the caller's thread, and skips the hand-off. Everything else about a session is the same on
both: `run` runs a step, `on_shared` reaches the network thread (routing), `open` opens a hop's stream (a p2p
one of an own-loop session is a ForeignStream: each call handed over to the network thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, TypeVar

import torch

from swarmlm.client.rpc import InferenceStream
from swarmlm.errors import RemotePeerError
from swarmlm.transport import Dialer
from swarmlm.utils.aio import LoopThread

T = TypeVar("T")


class StepLoop:
    def __init__(self, shared: LoopThread):
        self.shared = shared
        self.own: Optional[asyncio.AbstractEventLoop] = None  # set by use_own (an all-direct first route)

    @staticmethod
    def can_own() -> bool:
        """Whether this thread may run a loop of its own (it runs none already, as a notebook's would)."""
        return running_loop() is None

    def use_own(self) -> None:
        self.own = asyncio.new_event_loop()

    def run(self, coro: Awaitable[T], on_interrupt: Callable[[], None]) -> T:
        """Runs a step to its end: on the own loop in this thread if there is one, else on the network thread.
        If the own loop's step is interrupted (KeyboardInterrupt) its state is unknown: it is cancelled and
        `on_interrupt` (closing the session) runs."""
        if self.own is None:
            return self.shared.run(coro)
        task = self.own.create_task(coro)
        try:
            with torch.inference_mode(False):  # the history's tensors are written in place by later steps
                return run_until_complete(self.own, task)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    run_until_complete(self.own, task)
                on_interrupt()
            raise

    async def on_shared(self, coro: Awaitable[T]) -> T:
        """Awaits `coro` on the network thread (DHT reads, probes and p2p streams live there)."""
        if self.own is None:
            return await coro
        return await asyncio.wrap_future(self.shared.submit(coro))

    async def open(self, hop, dialer: Dialer, direct: bool) -> None:
        """Opens `hop.stream` (direct if it can and `direct`, else p2p). On the own loop a p2p stream is opened
        on the network thread and driven through a ForeignStream, which `hop.stream` holds before it opens (so
        that closing the hop after a failure closes it on the right loop)."""
        if self.own is None:
            return await hop.stream.open(dialer, direct)
        if direct and await hop.stream.open_direct(dialer):
            return
        hop.stream = ForeignStream(hop.stream, self.shared.loop)
        await hop.stream.open_p2p(dialer)

    def close(self, streams: list) -> None:
        """Closes the session's streams, each on its loop, then the own loop."""
        own, self.own = self.own, None
        for stream in streams:
            if own is None:
                self.shared.loop.call_soon_threadsafe(stream.close)
            else:
                stream.close()  # a ForeignStream hands it over to the network thread
        if own is not None:
            with contextlib.suppress(Exception):
                run_until_complete(own, _settle())  # the closed connections release their sockets
            own.close()


class ForeignStream:
    """An InferenceStream that lives on another event loop (the client's network thread, where p2p streams run),
    driven from a session's own loop: each call is handed over to that loop."""

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

    async def open_p2p(self, dialer: Dialer) -> None:
        await self._there(self.stream.open_p2p(dialer))

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


def running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run_until_complete(loop: asyncio.AbstractEventLoop, awaitable):
    """loop.run_until_complete(awaitable) in this thread, or in a helper thread where this one already runs an
    event loop (a notebook's, say), which would refuse to run another."""
    if running_loop() is None:
        return loop.run_until_complete(awaitable)
    with ThreadPoolExecutor(1, thread_name_prefix="swarmlm-session") as pool:
        return pool.submit(loop.run_until_complete, awaitable).result()


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)
