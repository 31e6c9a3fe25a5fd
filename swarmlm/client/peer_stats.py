"""What the client learns about peers as it uses them: round-trip times, measured speeds and bans."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional


class PeerLatencies:
    """Exponentially averaged round-trip time per peer, in seconds (from rpc_info probes)."""

    def __init__(self, smoothing: float = 0.3):
        self.smoothing = smoothing
        self._rtt: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, peer_id: str, rtt: float) -> None:
        with self._lock:
            old = self._rtt.get(peer_id)
            self._rtt[peer_id] = rtt if old is None else (1 - self.smoothing) * old + self.smoothing * rtt

    def get(self, peer_id: str, default: float) -> float:
        return self._rtt.get(peer_id, default)

    def known(self) -> set[str]:
        return set(self._rtt)

    def unknown(self, peer_ids: Iterable[str]) -> list[str]:
        return [p for p in peer_ids if p not in self._rtt]


class PeerSpeeds:
    """Exponentially averaged compute speed per peer, in tokens/s per block, as the client measured it (from the
    answer times of inference steps), so that routes are not built on what peers announce (anyone can announce
    anything). A measurement older than `max_age` seconds is forgotten, so a peer that was slow once (and so
    left out of routes) gets another try later."""

    def __init__(self, smoothing: float = 0.3, max_age: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.smoothing, self.max_age, self.clock = smoothing, max_age, clock
        self._speed: dict[str, tuple[float, float]] = {}  # peer id -> (speed, when last measured)
        self._lock = threading.Lock()

    def observe(self, peer_id: str, tokens: int, blocks: int, seconds: float) -> None:
        """`peer_id` took `seconds` (its compute, the round trip left out) for `tokens` tokens through `blocks`."""
        speed = tokens * blocks / max(seconds, 1e-6)
        with self._lock:
            old = self.get(peer_id)
            self._speed[peer_id] = (speed if old is None else (1 - self.smoothing) * old + self.smoothing * speed,
                                    self.clock())

    def get(self, peer_id: str) -> Optional[float]:
        """The peer's measured speed; None if it was never measured, or not for max_age seconds."""
        entry = self._speed.get(peer_id)
        return entry[0] if entry is not None and self.clock() - entry[1] <= self.max_age else None

    def best(self) -> Optional[float]:
        """The fastest speed measured within max_age (None before any)."""
        now = self.clock()
        with self._lock:
            return max((speed for speed, when in self._speed.values() if now - when <= self.max_age), default=None)


class PeerBans:
    """Peers that failed recently are left out of routes for a while.

    The n-th consecutive failure of a peer bans it for `base * 2 ** (n - 1)` seconds (at most
    `max_duration`); a success clears its record (`clear`, cheap enough for every inference step).
    """

    def __init__(self, base: float, max_duration: float, clock: Callable[[], float] = time.monotonic,
                 on_ban: Callable[[str], None] = lambda reason: None):
        self.base, self.max_duration, self.clock = base, max_duration, clock
        self.on_ban = on_ban  # called with "failure" or "wrong_output" (ClientMetrics.banned)
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self.convicted: set[str] = set()  # peers caught answering wrong numbers: banned for good
        self._lock = threading.Lock()

    def ban(self, peer_id: str) -> float:
        """Bans `peer_id`; returns the ban's duration in seconds."""
        with self._lock:
            if peer_id in self.convicted:
                return float("inf")
            failures = self._failures.get(peer_id, 0) + 1
            self._failures[peer_id] = failures
            duration = min(self.base * 2 ** (failures - 1), self.max_duration)
            self._until[peer_id] = self.clock() + duration
        self.on_ban("failure")
        return duration

    def convict(self, peer_id: str) -> None:
        """Bans `peer_id` for the rest of this client's life: it was caught answering wrong numbers."""
        with self._lock:
            new = peer_id not in self.convicted
            self.convicted.add(peer_id)
            self._until[peer_id] = float("inf")
            self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
        if new:
            self.on_ban("wrong_output")

    def clear(self, peer_id: str) -> None:
        """Forgets `peer_id`'s failures (it just served a request): its next failure bans it for `base` again.
        O(1) and lock-free for a peer without a record, the common case. A convicted peer stays banned."""
        if peer_id not in self._failures or peer_id in self.convicted:
            return
        with self._lock:
            self._failures.pop(peer_id, None)
            self._until.pop(peer_id, None)

    def failures(self, peer_id: str) -> int:
        """Failures in a row of `peer_id` (0 after a success)."""
        return self._failures.get(peer_id, 0)

    def banned(self) -> frozenset[str]:
        now = self.clock()
        with self._lock:
            return frozenset(p for p, until in self._until.items() if until > now)
