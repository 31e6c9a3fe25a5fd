"""A peer moving its span (automatic balancing) never hides a block from clients, checked on every
announcement of a move against an in-memory registry (one entry per block and peer, like the DHT);
and shutdown's OFFLINE is the last thing a peer announces, even in the middle of a move."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import swarmlm.peer.server as server
from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import ModelRecord
from swarmlm.peer.cache_budget import CacheBudget
from swarmlm.peer.config import PeerConfig
from swarmlm.peer.server import Peer

NUM_BLOCKS = 8
ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE


class Registry:
    """The DHT's span records as the peers see them: per block, the latest record of each peer. Every
    write is logged with the registry's state right after it."""

    def __init__(self):
        self.blocks: list[dict[str, ServerRecord]] = [{} for _ in range(NUM_BLOCKS)]
        self.log: list[tuple[ServerRecord, list[int], list[dict[str, ServerRecord]]]] = []
        self.lock = threading.Lock()

    def declare_span(self, dht, model, record, expiration, validator, wait=True, blocks=None):
        with self.lock:
            blocks = list(range(record.start, record.end) if blocks is None else blocks)
            for block in blocks:
                self.blocks[block][record.peer_id] = record
            self.log.append((record, blocks, self.snapshot()))

    def fetch(self, dht, model, num_blocks, latest=True):
        with self.lock:
            return [list(block.values()) for block in self.blocks]

    def snapshot(self) -> list[dict[str, ServerRecord]]:
        return [dict(block) for block in self.blocks]

    def add(self, peer: str, start: int, end: int, state=ONLINE):
        self.declare_span(None, "m", _record(peer, state, start, end), 0, None)


def _record(peer, state, start, end) -> ServerRecord:
    return ServerRecord(peer_id=peer, state=state, start=start, end=end, throughput=10.0, free_cache_tokens=100,
                        max_cache_tokens=100, version="0", torch_dtype="float32", movable=True)


def states(snapshot, peer: str) -> list:
    """The peer's announced state per block (None where it has no entry)."""
    return [block[peer].state if peer in block else None for block in snapshot]


def uncovered(snapshot, blocks) -> list[int]:
    """Blocks among `blocks` that no ONLINE peer announces (a client could not route through them)."""
    return [b for b in blocks if not any(r.state == ONLINE for r in snapshot[b].values())]


@pytest.fixture
def registry(monkeypatch):
    registry = Registry()
    monkeypatch.setattr(server, "declare_span", registry.declare_span)
    monkeypatch.setattr(server, "fetch_block_records", registry.fetch)
    monkeypatch.setattr(server, "declare_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(server, "count_dht_peers", lambda *args, **kwargs: 0)
    monkeypatch.setattr(server, "shutdown_dht", lambda dht: None)
    return registry


def mover(peer_id: str, start: int, end: int, load) -> Peer:
    """A started movable peer serving [start, end) without any I/O; `load(start, end, reuse)` stands in for
    loading a span's weights."""
    peer = Peer(PeerConfig(model="m", num_blocks=end - start, new_swarm=True, update_period=30.0))
    span = SimpleNamespace(start=start, end=end)
    peer.dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer_id), is_alive=lambda: True)
    peer.identity = SimpleNamespace(signer=None)  # what start_dht sets; the fake registry needs no signatures
    peer.model_name, peer.model_record = "m", ModelRecord(num_blocks=NUM_BLOCKS, family="llama")
    peer.span, peer.throughput, peer.budget = span, 10.0, CacheBudget(100)
    peer.handler = SimpleNamespace(span=span, busy=False, stop_accepting=lambda: None, shutdown=lambda: None)
    peer._load_span = lambda start, end, reuse=None: load(start, end, reuse)
    peer._announce(ONLINE)
    return peer


def test_a_move_keeps_every_block_online_at_every_step(registry):
    """Spans (0,4) and (2,6): p1 moves to (4,8). Blocks 4:6 are only p1's: they stay ONLINE (its old layers
    serve them) while 6:8 load as JOINING; 2:4 go OFFLINE for p1 only once p0 still serves them."""
    registry.add("p0", 0, 4)
    during_load = []

    def load(start, end, reuse):
        assert reuse is peer.span  # the kept layers come from the old span
        during_load.append(registry.snapshot())
        return SimpleNamespace(start=start, end=end)

    peer = mover("p1", 2, 6, load)
    writes_before = len(registry.log)
    peer._rebalance()

    assert (peer.span.start, peer.span.end, peer.handler.span.end, peer.moves) == (4, 8, 8, 1)
    snapshots = [snapshot for _, _, snapshot in registry.log[writes_before:]] + during_load
    for snapshot in snapshots:
        assert uncovered(snapshot, range(0, 6)) == [], states(snapshot, "p1")
    [loading] = during_load
    assert states(loading, "p1") == [None, None, ONLINE, ONLINE, ONLINE, ONLINE, JOINING, JOINING]
    assert {loading[b]["p1"].end for b in range(2, 6)} == {6}  # ONLINE entries describe the span still served
    assert states(registry.snapshot(), "p1") == [None, None, OFFLINE, OFFLINE, ONLINE, ONLINE, ONLINE, ONLINE]
    assert {registry.blocks[b]["p1"].end for b in range(4, 8)} == {8}
    # what each write touched: the added blocks while loading, the dropped ones once loaded, then the new span
    touched = [(record.state, blocks) for record, blocks, _ in registry.log[writes_before:]]
    assert touched == [(ONLINE, [2, 3, 4, 5]), (JOINING, [6, 7]), (OFFLINE, [2, 3]), (ONLINE, [4, 5, 6, 7])]
    assert uncovered(registry.snapshot(), range(NUM_BLOCKS)) == []


def test_a_move_is_called_off_if_the_blocks_it_would_drop_lost_their_other_peer(registry):
    """p0 leaves while p1 loads: dropping 2:4 now would uncover them, so p1 stays where it is."""
    registry.add("p0", 0, 4)

    def load(start, end, reuse):
        registry.add("p0", 0, 4, OFFLINE)
        return SimpleNamespace(start=start, end=end)

    peer = mover("p1", 2, 6, load)
    peer._rebalance()
    assert (peer.span.start, peer.span.end, peer.moves) == (2, 6, 0)
    assert states(registry.snapshot(), "p1") == [None, None, ONLINE, ONLINE, ONLINE, ONLINE, OFFLINE, OFFLINE]
    assert uncovered(registry.snapshot(), range(2, 6)) == []


def test_shutdown_during_a_move_announces_offline_last(registry):
    """SIGTERM while a move loads: the announcer stops, OFFLINE covers the served span and the blocks that
    were loading, and nothing is announced after it."""
    registry.add("p0", 0, 4)
    loading, release = threading.Event(), threading.Event()

    def load(start, end, reuse):
        loading.set()
        release.wait(30)
        return SimpleNamespace(start=start, end=end)

    peer = mover("p1", 2, 6, load)
    peer._announcer = threading.Thread(target=peer._rebalance)
    peer._announcer.start()
    try:
        assert loading.wait(30)
        peer.shutdown(drain_timeout=1.0)
        assert not peer._announcer.is_alive()
    finally:
        release.set()
    peer._announce(ONLINE)  # e.g. a late free-cache change: ignored once the peer has left
    assert states(registry.snapshot(), "p1") == [None, None] + [OFFLINE] * 6
    record, blocks, _ = registry.log[-1]
    assert record.state == OFFLINE and blocks == [6, 7]
    assert (peer.span.start, peer.span.end) == (2, 6)
