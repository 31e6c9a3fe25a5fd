"""Which peers a request goes through: a chain of spans that covers the requested blocks."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import hivemind

from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.client.peer_stats import PeerLatencies, PeerSpeeds
from swarmlm.errors import MissingBlocksError

logger = logging.getLogger(__name__)

CACHE_PENALTY = 10.0  # seconds added to a hop whose peer lacks free KV cache for the session
DEFAULT_RTT = 0.005  # seconds assumed for a peer whose round trip was never measured
UNMEASURED_CAP = 4.0  # a peer not measured yet counts at most this many times as fast as the fastest one measured


@dataclass(frozen=True)
class RouteHop:
    peer_id: str  # base58 peer id
    start: int  # first block this hop computes (inclusive)
    end: int  # last block (exclusive); may be a part of the peer's span
    direct_address: Optional[str] = None  # where the peer serves direct connections, if it does (from its rpc_info)


class SequenceManager:
    """Keeps the swarm's span records for one model fresh and builds routes from them."""

    def __init__(self, dht: hivemind.DHT, model: str, num_blocks: int, refresh_period: float, hint: str = ""):
        self.dht, self.model, self.num_blocks = dht, model, num_blocks
        self.refresh_period, self.hint = refresh_period, hint
        self.latencies = PeerLatencies()
        self.speeds = PeerSpeeds()
        self.direct_addresses: dict[str, str] = {}  # peer id -> its direct-connection address, from its own rpc_info
        # answer (p2p authenticates the peer; records are not trusted with addresses: anyone can write one)
        self.default_rtt = DEFAULT_RTT
        self.accepts: Callable[[ServerRecord], bool] = lambda record: True  # records routes may use (a client's
        # WeightsCheck: the peer serves this model's config and weights)
        self._records: list[list[ServerRecord]] = [[] for _ in range(num_blocks)]
        self._updated_at = -float("inf")
        self._lock = threading.Lock()

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._updated_at < self.refresh_period:
                return
            records = fetch_block_records(self.dht, self.model, self.num_blocks)
            self._records = [[r for r in block if self.accepts(r)] for block in records]
            self._updated_at = time.monotonic()

    def block_records(self) -> list[list[ServerRecord]]:
        self.refresh()
        return self._records

    def make_route(self, start: int = 0, end: int | None = None, avoid: frozenset[str] = frozenset(), *,
                   mode: str = "latency", cache_tokens: int = 0, exclude: frozenset[str] = frozenset()) -> list[RouteHop]:
        """The cheapest chain of hops covering blocks [start, end), by `route_cost`.

        mode="latency" (inference): least expected step time. mode="throughput" (forward/backward):
        each peer's compute time is scaled by a random Exp(1) factor, so among equal routes a peer is
        picked with probability proportional to its throughput and load spreads over replicas.
        Peers in `avoid` (recently failed) are used only if the others leave a gap: avoiding a peer must
        not lose blocks. Peers in `exclude` are never used. Raises MissingBlocksError if the ONLINE peers leave a gap
        (re-reading the DHT first).
        """
        end = self.num_blocks if end is None else end
        route = self._cheapest(start, end, avoid | exclude, mode, cache_tokens)
        if route is None:
            self.refresh(force=True)
            route = self._cheapest(start, end, avoid | exclude, mode, cache_tokens)
        if route is None and avoid - exclude:
            logger.info(f"Blocks {start}:{end}: only recently failed peers cover them; trying those again")
            route = self._cheapest(start, end, exclude, mode, cache_tokens)
        if route is None:
            raise MissingBlocksError(self.model, self._missing(start, end, exclude), self.hint)
        return route

    def covers(self, start: int, end: int, exclude: frozenset[str]) -> bool:
        """Whether ONLINE peers outside `exclude` cover blocks [start, end), in the records last read (no DHT read:
        the event loop may call it)."""
        return self._cheapest(start, end, exclude, "latency", 0, self._records) is not None

    def candidates(self, start: int = 0, end: int | None = None, exclude: frozenset[str] = frozenset()) -> set[str]:
        """ONLINE peers serving any of blocks [start, end)."""
        end = self.num_blocks if end is None else end
        records = self.block_records()
        return {r.peer_id for block in range(start, end) for r in records[block]
                if r.state == ServerState.ONLINE and r.peer_id not in exclude}

    def announcing(self, spans: list[tuple[int, int]]) -> set[str]:
        """Peers that announce (ONLINE or JOINING) any block of `spans` in the records last read (no DHT read)."""
        records = self._records
        return {r.peer_id for start, end in spans for block in range(start, end) for r in records[block]
                if r.state != ServerState.OFFLINE}

    def _cheapest(self, start: int, end: int, exclude: frozenset[str], mode: str, cache_tokens: int, records=None):
        records = self.block_records() if records is None else records
        serving = [{r.peer_id: r for r in records[block] if r.state == ServerState.ONLINE and r.peer_id not in exclude}
                   for block in range(self.num_blocks)]
        noise = {}
        if mode == "throughput":
            noise = {peer: random.expovariate(1.0) for block in serving[start:end] for peer in block}
        cost = [math.inf] * (end + 1)
        cost[start], previous = 0.0, [None] * (end + 1)
        for a in range(start, end):
            if cost[a] == math.inf:
                continue
            for peer_id, record in serving[a].items():
                reach = a
                while reach < end and peer_id in serving[reach]:
                    reach += 1
                for b in range(a + 1, reach + 1):
                    hop_cost = cost[a] + self.route_cost(record, b - a, cache_tokens, noise.get(peer_id, 1.0))
                    if hop_cost < cost[b]:
                        cost[b], previous[b] = hop_cost, RouteHop(peer_id, a, b, self.direct_addresses.get(peer_id))
        if cost[end] == math.inf:
            return None
        route, block = [], end
        while block > start:
            route.append(previous[block])
            block = previous[block].start
        return route[::-1]

    def throughput(self, record: ServerRecord) -> float:
        """The per-block throughput routes count on for `record`'s peer: what the client measured (never more than
        the peer announced); for a peer not measured yet, its announcement, but at most UNMEASURED_CAP times the
        fastest measured peer, so an announcement of 1e9 tokens/s buys one try, not the route."""
        measured = self.speeds.get(record.peer_id)
        if measured is not None:
            return min(record.throughput, measured)
        best = self.speeds.best()
        return record.throughput if best is None else min(record.throughput, UNMEASURED_CAP * best)

    def route_cost(self, record: ServerRecord, num_blocks: int, cache_tokens: int, compute_scale: float = 1.0) -> float:
        """Expected seconds for one token step through `num_blocks` blocks of `record`'s peer:
        round trip + compute at its `throughput` (measured where the client has measured it), plus a penalty when
        its free KV cache is smaller than the session needs (it would likely answer "busy")."""
        rtt = self.latencies.get(record.peer_id, self.default_rtt)
        compute = num_blocks * compute_scale / max(self.throughput(record), 1e-3)
        penalty = CACHE_PENALTY if cache_tokens > record.free_cache_tokens else 0.0
        return rtt + compute + penalty

    def _missing(self, start: int, end: int, exclude: frozenset[str] = frozenset()) -> list[tuple[int, int]]:
        """The runs of blocks in [start, end) that no ONLINE peer outside `exclude` serves."""
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
