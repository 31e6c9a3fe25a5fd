"""Routes follow the speed the client measured, not what peers announce.

Two peers serve every block: an honest one (announcing the throughput it measured at start) and a liar about speed
(tests/liar_peer.py slow:0.1: honest numbers, 0.1 s late with every answer) announcing 1e9 tokens/s. The
announcement buys the liar one session; after that the client has measured it and routes through the honest peer,
and a peer not measured yet counts at most UNMEASURED_CAP times as fast as the fastest one measured."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import client_model
from swarmlm.local_swarm import start_dht, start_peer

from swarmlm.client.routing import UNMEASURED_CAP, SequenceManager
from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.models.embedded import DEFAULT_MODEL

LIAR = str(Path(__file__).with_name("liar_peer.py"))


@pytest.fixture(scope="module")
def swarm_with_a_slow_boaster(tiny_model_path):
    with start_dht() as dht, start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8") as honest, \
            start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput", "1e9",
                       program=(LIAR, "slow:0.1")) as slow:
        yield dht, honest, slow


def test_an_announced_speed_buys_one_try_and_measured_speeds_choose_the_route(swarm_with_a_slow_boaster, tokenizer,
                                                                             local_model):
    dht, honest, slow = swarm_with_a_slow_boaster
    ids = tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    reference = local_model.generate(ids, **kwargs).tolist()
    routes = []
    with client_model(dht.maddrs) as model:
        for _ in range(3):
            with model.inference_session(max_length=ids.shape[1] + 4) as session:
                assert model.generate(ids, session=session, **kwargs).tolist() == reference
            routes.append([peer for peer, _, _ in session.describe_route()])
        manager = model.remote.manager
        records = {r.peer_id: r for r in manager.block_records()[0]}
        assert records[slow.peer_id].throughput == 1e9  # what it announces
        # what it does: 8 blocks in more than 0.1 s (80 tokens/s per block; the probed round trip it is measured
        # net of may be off by some milliseconds)
        assert manager.throughput(records[slow.peer_id]) < 2 * 8 / 0.1
        assert manager.speeds.get(honest.peer_id) > manager.speeds.get(slow.peer_id)
    assert routes == [[slow.peer_id], [honest.peer_id], [honest.peer_id]], routes


def _record(peer: str, throughput: float) -> ServerRecord:
    return ServerRecord(peer_id=peer, state=ServerState.ONLINE, start=0, end=4, throughput=throughput,
                        free_cache_tokens=1000, max_cache_tokens=1000, version="0", torch_dtype="float32")


def test_measured_speeds_bound_what_is_announced():
    manager = SequenceManager(dht=None, model="m", num_blocks=4, refresh_period=60)
    boaster, honest = _record("boaster", 1e9), _record("honest", 100.0)
    assert manager.throughput(boaster) == 1e9  # nothing measured yet: announcements are all there is
    manager.speeds.observe("honest", tokens=1, blocks=4, seconds=0.02)  # 200 tokens/s per block
    assert manager.throughput(honest) == 100.0  # never more than announced
    assert manager.throughput(boaster) == UNMEASURED_CAP * 200.0  # unmeasured: at most 4x the fastest measured
    manager.speeds.observe("boaster", tokens=1, blocks=4, seconds=1.0)
    assert manager.throughput(boaster) == 4.0
    assert manager.route_cost(boaster, 4, 0) > manager.route_cost(honest, 4, 0)


def test_old_measurements_are_forgotten_so_a_slow_peer_gets_another_try():
    from swarmlm.client.peer_stats import PeerSpeeds

    now = [0.0]
    speeds = PeerSpeeds(max_age=600.0, clock=lambda: now[0])
    speeds.observe("slow", tokens=1, blocks=4, seconds=1.0)
    speeds.observe("fast", tokens=1, blocks=4, seconds=0.01)
    now[0] = 500.0
    speeds.observe("fast", tokens=1, blocks=4, seconds=0.01)
    assert speeds.get("slow") == 4.0 and speeds.best() == pytest.approx(400.0)
    now[0] = 700.0  # "slow" was last measured 700 s ago: unmeasured again (capped by "fast", measured 200 s ago)
    assert speeds.get("slow") is None and speeds.best() == pytest.approx(400.0)
