"""The client's routing and fault-tolerance logic, without processes: route costs (latency, cache,
partial spans, spreading by throughput), bans (doubling, cap, cleared by a success), retries
(backoff, bounded attempts, the error named), and streams closed when a session fails to open."""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import pytest
import torch

import swarmlm.client.routing as routing
import swarmlm.client.session as session_module
import swarmlm.client.swarm as swarm_module
from swarmlm.client.config import ClientConfig
from swarmlm.client.metrics import ClientMetrics
from swarmlm.client.peer_stats import PeerBans, PeerLatencies, PeerSpeeds
from swarmlm.client.routing import RouteHop, SequenceManager
from swarmlm.client.session import InferenceSession, _Hop
from swarmlm.client.swarm import Attempts, RemoteSequential
from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.errors import MissingBlocksError, RemotePeerError, SwarmError

NUM_BLOCKS = 8


def record(peer: str, start: int, end: int, throughput: float = 1000.0, free: int = 10_000,
           state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer_id=peer, state=state, start=start, end=end, throughput=throughput,
                        free_cache_tokens=free, max_cache_tokens=10_000, version="0", torch_dtype="float32")


def manager_for(*records: ServerRecord, rtt: dict[str, float] | None = None) -> SequenceManager:
    """A SequenceManager over fixed records (never reads a DHT); `rtt` sets measured round trips."""
    manager = SequenceManager(None, "m", NUM_BLOCKS, refresh_period=1e9)
    manager._records = [[r for r in records if r.start <= block < r.end] for block in range(NUM_BLOCKS)]
    manager._updated_at = time.monotonic()
    manager.refresh = lambda force=False: None
    for peer, seconds in (rtt or {}).items():
        manager.latencies.update(peer, seconds)
    return manager


def hops(route: list[RouteHop]) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route]


# ---- routing ------------------------------------------------------------------------------------------


def test_inference_routes_take_the_lowest_round_trip():
    manager = manager_for(record("a", 0, 8), record("b", 0, 8), rtt={"a": 0.050, "b": 0.001})
    assert hops(manager.make_route()) == [("b", 0, 8)]
    manager = manager_for(record("a", 0, 8), record("b", 0, 8), rtt={"a": 0.001, "b": 0.050})
    assert hops(manager.make_route()) == [("a", 0, 8)]


def test_a_peer_without_room_for_the_session_is_avoided():
    manager = manager_for(record("a", 0, 8), record("b", 0, 8, free=50), rtt={"a": 0.050, "b": 0.001})
    assert hops(manager.make_route(cache_tokens=50)) == [("b", 0, 8)]  # fits exactly
    assert hops(manager.make_route(cache_tokens=100)) == [("a", 0, 8)]  # b would answer "busy"


def test_routes_use_part_of_a_span_and_prefer_fewer_hops():
    # overlapping spans 0:6 and 4:8: the faster peer computes the shared blocks 4:6
    fast_first = manager_for(record("a", 0, 6, throughput=1000), record("b", 4, 8, throughput=100))
    assert hops(fast_first.make_route()) == [("a", 0, 6), ("b", 6, 8)]
    fast_second = manager_for(record("a", 0, 6, throughput=100), record("b", 4, 8, throughput=1000))
    assert hops(fast_second.make_route()) == [("a", 0, 4), ("b", 4, 8)]
    # a sub-range of the model may start and end inside spans
    assert hops(fast_second.make_route(1, 5)) == [("a", 1, 4), ("b", 4, 5)]
    # one peer serving everything saves a round trip over two equally fast halves
    whole = manager_for(record("a", 0, 4), record("b", 4, 8), record("c", 0, 8), rtt={"a": 0.01, "b": 0.01, "c": 0.01})
    assert hops(whole.make_route()) == [("c", 0, 8)]


def test_forward_backward_routes_spread_over_replicas_by_throughput():
    manager = manager_for(record("a", 0, 8, throughput=300), record("b", 0, 8, throughput=100),
                          rtt={"a": 0.001, "b": 0.001})
    random.seed(0)
    chosen = [manager.make_route(mode="throughput")[0].peer_id for _ in range(2000)]
    assert abs(chosen.count("a") / len(chosen) - 0.75) < 0.04  # 300 / (300 + 100)
    assert hops(manager.make_route(mode="latency")) == [("a", 0, 8)]  # inference: always the faster one


def test_avoided_peers_are_used_only_to_close_a_gap(monkeypatch):
    manager = manager_for(record("a", 0, 8), record("b", 0, 4), rtt={"a": 0.001, "b": 0.001})
    assert hops(manager.make_route(avoid=frozenset({"a"}), cache_tokens=0)) == [("a", 0, 8)]  # b leaves 4:8 open
    assert hops(manager.make_route(0, 4, avoid=frozenset({"a"}))) == [("b", 0, 4)]
    manager = manager_for(record("a", 0, 4), record("b", 4, 6), record("c", 6, 8, state=ServerState.JOINING))
    monkeypatch.setattr(routing, "fetch_block_records", lambda *args, **kwargs: manager._records)
    del manager.refresh  # the forced re-read goes to the (patched) DHT
    with pytest.raises(MissingBlocksError, match="no peer serves blocks 6:8 of model m"):
        manager.make_route()
    assert manager.announcing([(6, 8)]) == {"c"}  # JOINING counts as announcing, not as serving


# ---- bans ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bans_double_per_failure_in_a_row_up_to_the_cap_and_a_success_clears_them():
    clock = Clock()
    bans = PeerBans(5.0, 30.0, clock=clock)
    assert [bans.ban("p") for _ in range(5)] == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert bans.banned() == {"p"} and bans.failures("p") == 5
    clock.now += 29.9
    assert bans.banned() == {"p"}
    clock.now += 0.2
    assert bans.banned() == frozenset()
    assert bans.ban("p") == 30.0  # the failures are still in a row: no success in between
    bans.clear("p")
    assert bans.banned() == frozenset() and bans.failures("p") == 0
    assert bans.ban("p") == 5.0  # a success starts over
    bans.clear("never-failed")  # a peer without a record: nothing to do
    assert bans.banned() == {"p"}


# ---- retries -------------------------------------------------------------------------------------------


def remote_stub(max_retries=5, retry_backoff=0.5, max_backoff=1.5, announcing=frozenset()):
    return SimpleNamespace(
        config=ClientConfig(max_retries=max_retries, retry_backoff=retry_backoff, max_backoff=max_backoff),
        bans=PeerBans(5.0, 120.0, clock=Clock()),
        manager=SimpleNamespace(announcing=lambda spans: set(announcing)),
    )


@pytest.fixture
def sleeps(monkeypatch):
    """asyncio.sleep records its delay and returns at once."""
    delays = []

    async def sleep(delay, *args, **kwargs):
        delays.append(delay)

    monkeypatch.setattr(swarm_module.asyncio, "sleep", sleep)
    return delays


def test_retries_back_off_exponentially_and_give_up_with_the_last_error(sleeps):
    remote = remote_stub(max_retries=5)

    async def fail_repeatedly():
        attempts = Attempts(remote, "forward through blocks 0:8")
        for i in range(5):
            await attempts.failed(RemotePeerError("p", f"boom {i}"), "p")
        await attempts.failed(RemotePeerError("q", "the last one"), "q")

    with pytest.raises(SwarmError, match=r"^forward through blocks 0:8 failed after 6 attempts; "
                                         r"last error: peer q: the last one$") as raised:
        asyncio.run(fail_repeatedly())
    assert isinstance(raised.value.__cause__, RemotePeerError)
    assert sleeps == [0.5, 1.0, 1.5, 1.5]  # none after the 1st failure, then doubling, capped at max_backoff
    assert remote.bans.failures("p") == 5 and remote.bans.banned() == {"p", "q"}


def test_missing_blocks_are_retried_only_if_a_banned_peer_announces_them(sleeps):
    missing = MissingBlocksError("m", [(4, 8)])
    nobody = remote_stub()
    nobody.bans.ban("elsewhere")  # a ban on a peer that does not serve 4:8 does not help

    async def one_failure(remote):
        attempts = Attempts(remote, "inference step at position 0")
        await attempts.failed(missing)
        return attempts.failures

    with pytest.raises(MissingBlocksError):
        asyncio.run(one_failure(nobody))
    banned_server = remote_stub(announcing={"b"})
    banned_server.bans.ban("b")
    assert asyncio.run(one_failure(banned_server)) == 1  # counted and retried
    unbanned_server = remote_stub(announcing={"b"})
    with pytest.raises(MissingBlocksError):
        asyncio.run(one_failure(unbanned_server))


def test_a_successful_forward_clears_the_peers_ban_record(monkeypatch):
    remote = RemoteSequential.__new__(RemoteSequential)
    remote.model, remote.num_blocks, remote.config = "m", NUM_BLOCKS, ClientConfig()
    remote.bans = PeerBans(5.0, 120.0)

    async def make_route(start, end, **kwargs):
        return [RouteHop("a", start, end)]

    async def call_forward(dialer, peer_id, request, hidden, *args):
        return hidden + 1

    remote.make_route = make_route
    remote.dialer = None
    monkeypatch.setattr(swarm_module, "call_forward", call_forward)
    remote.bans.ban("a")
    remote.bans.ban("a")
    output, _ = asyncio.run(remote.forward_blocks(torch.zeros(1, 2, 4), None, None, 0, NUM_BLOCKS))
    assert torch.equal(output, torch.ones(1, 2, 4))
    assert remote.bans.failures("a") == 0 and remote.bans.banned() == frozenset()


# ---- inference sessions ---------------------------------------------------------------------------


class FakeStream:
    """An InferenceStream whose open fails for peers in `FakeStream.failing`; steps add 1 (never pushed on)."""

    failing: set[str] = set()
    closed: list[str] = []

    def __init__(self, peer_id, span, direct_address=None, push_from=None):
        self.peer_id, self.opened, self.push_target, self.direct = peer_id, False, None, False
        self._sent: dict[int, torch.Tensor] = {}

    async def open(self, dialer, direct=True):
        await asyncio.sleep(0)
        if self.peer_id in self.failing:
            raise RemotePeerError(self.peer_id, "cannot open a session: connection refused")

    def send(self, step_id, position, hidden, position_ids, mask, prompts=None, push_to=None):
        self._sent[step_id] = hidden

    async def receive(self, step_id, timeout):
        self.opened = True
        return self._sent.pop(step_id) + 1, False

    def close(self):
        self.closed.append(self.peer_id)


def session_stub(monkeypatch, route: list[RouteHop]) -> InferenceSession:
    async def make_route(start, end, **kwargs):
        return route

    remote = SimpleNamespace(make_route=make_route, span_request=lambda hop, **kwargs: None, dialer=None, loop=None,
                             num_blocks=NUM_BLOCKS, config=ClientConfig(), bans=PeerBans(5.0, 120.0),
                             manager=SimpleNamespace(latencies=PeerLatencies(), speeds=PeerSpeeds()),
                             metrics=ClientMetrics())
    remote.attempts = lambda what: Attempts(remote, what)
    monkeypatch.setattr(session_module, "InferenceStream", FakeStream)
    monkeypatch.setattr(FakeStream, "closed", [])
    session = InferenceSession(remote, max_length=16)
    session._batch = 1
    return session


def test_streams_that_opened_are_closed_when_another_hop_fails_to_open(monkeypatch):
    session = session_stub(monkeypatch, [RouteHop("a", 0, 4), RouteHop("b", 4, 6), RouteHop("c", 6, 8)])
    monkeypatch.setattr(FakeStream, "failing", {"b"})
    with pytest.raises(RemotePeerError, match="peer b: cannot open a session"):
        asyncio.run(session._open(0, NUM_BLOCKS))
    assert sorted(FakeStream.closed) == ["a", "b", "c"]  # a and c would hold their KV reservation otherwise
    monkeypatch.setattr(FakeStream, "failing", set())
    FakeStream.closed.clear()
    assert [h.route.peer_id for h in asyncio.run(session._open(0, NUM_BLOCKS))] == ["a", "b", "c"]
    assert FakeStream.closed == []


def test_a_successful_inference_step_clears_the_peers_ban_record(monkeypatch):
    session = session_stub(monkeypatch, [])
    session._hops = [_Hop(RouteHop("a", 0, 4), FakeStream("a", None)), _Hop(RouteHop("b", 4, 8), FakeStream("b", None))]
    session.remote.bans.ban("b")
    session.remote.bans.ban("b")
    hidden = torch.zeros(1, 3, 4)
    output = asyncio.run(session._step(hidden, torch.arange(3)[None], None))
    assert torch.equal(output, hidden + 2)
    assert session.remote.bans.failures("b") == 0 and session.failovers == 0


def test_a_pushed_step_is_overdue_after_a_multiple_of_the_hops_usual_answer_time(monkeypatch):
    """push_timeout at least; 4x the moving average of the hop's answers (the prefill's at first), scaled up
    for steps of more than 8 tokens."""
    session = session_stub(monkeypatch, [])
    hop = _Hop(RouteHop("b", 4, 8), FakeStream("b", None))
    assert session._push_wait(hop, 1) == session.remote.config.push_timeout == 1.0  # nothing observed yet
    hop.observe_answer(2.0)  # a slow prefill
    assert session._push_wait(hop, 1) == 8.0
    for _ in range(40):
        hop.observe_answer(0.01)  # fast decoding steps
    assert session._push_wait(hop, 1) == 1.0 and session._push_wait(hop, 8) == 1.0
    for _ in range(40):
        hop.observe_answer(0.5)
    assert session._push_wait(hop, 1) == pytest.approx(2.0, rel=1e-3)
    assert session._push_wait(hop, 32) == pytest.approx(8.0, rel=1e-3)  # 32 tokens: 4x longer
