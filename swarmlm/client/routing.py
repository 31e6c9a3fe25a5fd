"""Which peers a request goes through: a chain of spans that covers the requested blocks."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import hivemind

from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.errors import MissingBlocksError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteHop:
    peer_id: str  # base58 peer id
    start: int  # first block this hop computes (inclusive)
    end: int  # last block (exclusive); may be a part of the peer's span


class SequenceManager:
    """Keeps the swarm's span records for one model fresh and builds routes from them."""

    def __init__(self, dht: hivemind.DHT, model: str, num_blocks: int, refresh_period: float, hint: str = ""):
        self.dht, self.model, self.num_blocks = dht, model, num_blocks
        self.refresh_period, self.hint = refresh_period, hint
        self._records: list[list[ServerRecord]] = [[] for _ in range(num_blocks)]
        self._updated_at = -float("inf")
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._updated_at < self.refresh_period:
                return
            self._records = fetch_block_records(self.dht, self.model, self.num_blocks)
            self._updated_at = time.monotonic()

    def block_records(self) -> list[list[ServerRecord]]:
        self.refresh()
        return self._records

    def make_route(self, start: int = 0, end: int | None = None, exclude: frozenset[str] = frozenset()) -> list[RouteHop]:
        """A chain of hops covering blocks [start, end): at each block, the online peer reaching furthest."""
        end = self.num_blocks if end is None else end
        route = self._greedy(start, end, exclude)
        if route is None:
            self.refresh(force=True)
            route = self._greedy(start, end, exclude)
        if route is None:
            raise MissingBlocksError(self.model, self._missing(start, end, exclude), self.hint)
        return route

    def _greedy(self, start: int, end: int, exclude: frozenset[str]) -> list[RouteHop] | None:
        records = self.block_records()
        route, block = [], start
        while block < end:
            candidates = [r for r in records[block] if r.state == ServerState.ONLINE and r.peer_id not in exclude]
            if not candidates:
                return None
            best = max(candidates, key=lambda r: (min(r.end, end), r.throughput))
            route.append(RouteHop(best.peer_id, block, min(best.end, end)))
            block = min(best.end, end)
        return route

    def _missing(self, start: int, end: int, exclude: frozenset[str]) -> list[tuple[int, int]]:
        missing, run_start = [], None
        for block in range(start, end):
            served = any(r.state == ServerState.ONLINE and r.peer_id not in exclude for r in self._records[block])
            if not served and run_start is None:
                run_start = block
            if served and run_start is not None:
                missing.append((run_start, block))
                run_start = None
        if run_start is not None:
            missing.append((run_start, end))
        return missing
