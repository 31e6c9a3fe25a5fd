"""An event loop running in a background thread, for sync code that drives async hivemind P2P."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, Awaitable, Optional


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()


class LoopThread:
    """Owns an event loop in a daemon thread; `run(coro)` executes a coroutine there and waits."""

    def __init__(self, name: str):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def alive(self) -> bool:
        """Whether the loop's thread still runs it."""
        return self._thread.is_alive() and self.loop.is_running()

    def submit(self, coro: Awaitable) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable, timeout: Optional[float] = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Cancels the tasks still on the loop (e.g. a p2p client's readers) and waits for them, at most `grace` s,
        so none is destroyed pending; then stops the loop and its thread."""
        if self.loop.is_running():
            try:
                self.run(_cancel_other_tasks(), timeout=grace)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
