"""Limits on the channels a node keeps open for others: per source and in total.

A source is who opened a channel (Channel.source): a peer id for p2p (proven by libp2p), the IP address for a
direct connection (its caller's peer id is proven by a ticket, but one machine can make peer ids at will). Every open channel (an inference
session, another peer's push stream) holds a file descriptor and buffers, so one source must not take them all:
`ChannelCounts.acquire` refuses a channel beyond `per_source` from its source or beyond `total` overall, with
the reason, and counts each refusal. `raise_open_files_limit` lifts the process's soft limit of open files to
its hard one, so that channel limits, not the operating system, are what a flood meets.
"""

from __future__ import annotations

import logging
import resource
from collections import Counter
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

REFUSAL_REASONS = ("per_source", "total", "admission")


@dataclass(frozen=True)
class ChannelLimits:
    per_source: int = 256  # open channels from one source (peer id, or IP address of direct connections)
    total: int = 4096  # open channels from everyone

    def __post_init__(self):
        if not 1 <= self.per_source <= self.total:
            raise ValueError(f"channel limits need 1 <= per_source <= total, got {self.per_source}, {self.total}")


class ChannelCounts:
    """Open channels per source; one event loop uses it (no lock)."""

    def __init__(self, limits: ChannelLimits):
        self.limits = limits
        self.by_source: Counter[str] = Counter()
        self.total = 0
        self.refused: Counter[str] = Counter()  # reason -> refusals

    def acquire(self, source: str) -> Optional[str]:
        """Counts a new channel of `source`; or returns why it is refused (and counts nothing)."""
        if self.by_source[source] >= self.limits.per_source:
            self.refused["per_source"] += 1
            return f"too many connections from {source} ({self.limits.per_source} open, the limit per source)"
        if self.total >= self.limits.total:
            self.refused["total"] += 1
            return f"too many connections ({self.limits.total} open, this peer's limit)"
        self.by_source[source] += 1
        self.total += 1
        return None

    def release(self, source: str) -> None:
        self.by_source[source] -= 1
        if self.by_source[source] <= 0:
            del self.by_source[source]
        self.total -= 1


def raise_open_files_limit() -> int:
    """Lifts this process's soft limit of open files to its hard limit (where allowed); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.debug(f"Kept the open-files limit at {soft}: {e}")
    return soft
