"""A peer watches its own parts, so it never lingers half alive.

`Watchdog(checks, period, on_failure)` runs each check every `period` seconds in a daemon thread; a check returns
None while its part works, or what is wrong. The first failure is reported once to `on_failure("part: what")`
and the watchdog stops: the peer then leaves (announces OFFLINE where it still can) and `swarmlm peer` exits with
status 1, so a supervisor (systemd, a container's restart policy) starts it again. A check that raises counts as
a failure of its part.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:
    from swarmlm.peer.server import Peer

logger = logging.getLogger(__name__)

Check = Callable[[], Optional[str]]


class Watchdog:
    def __init__(self, checks: Mapping[str, Check], period: float, on_failure: Callable[[str], None]):
        self.checks, self.period, self.on_failure = dict(checks), period, on_failure
        self.failure: Optional[str] = None  # the first failure, once one happened
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmlm-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> Optional[str]:
        """Runs every check; "part: what is wrong" for the first that fails, else None."""
        for part, check in self.checks.items():
            try:
                problem = check()
            except Exception as e:
                problem = f"its check failed ({type(e).__name__}: {e})"
            if problem is not None:
                return f"{part}: {problem}"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            failure = self.check_once()
            if failure is not None and not self._stop.is_set():
                self.failure = failure
                logger.error(f"A part of this peer died, so the peer stops (exit status 1): {failure}")
                self.on_failure(failure)
                return


def peer_checks(peer: "Peer") -> dict[str, Check]:
    """The checks of a started peer's parts: its DHT process, its RPC loop, what its transport server depends on
    (the p2p daemon, the direct listener; checked on the RPC loop), and its announcements (none went through for
    3 update periods, or the announcer thread ended)."""
    loop = peer._loop

    def on_loop(check) -> Check:
        return lambda: loop.run(check(), timeout=30) if loop.alive else "the RPC loop stopped"

    def announcements() -> Optional[str]:
        if not peer._announcer.is_alive():
            return "the announcer thread ended"
        late = time.monotonic() - peer.last_announced
        return f"none went through for {late:.0f} s" if late > 3 * peer.config.update_period + 30 else None

    return {"DHT process": lambda: None if peer.dht.is_alive() else f"it exited (code {peer.dht.exitcode})",
            "RPC loop": lambda: None if loop.alive else "its thread ended",
            **{part: on_loop(check) for part, check in peer.handler.server.health().items()},
            "announcements": announcements}
