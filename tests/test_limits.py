"""A peer's channel limits hold under a flood from one source, and honest clients are still served.

One peer (blocks 0:8, direct connections, at most 4 open channels per source): idle inference sessions opened
over direct TCP from 127.0.0.1 (each after a valid hello) fill that source's share; the next one is refused
with a clear "busy" error; a client over p2p (another source) generates the local model's tokens meanwhile;
once the flood ends, its channels are freed and a direct session is served again."""

from __future__ import annotations

import asyncio

import pytest
from conftest import client_model, direct_caller
from metrics_scrape import metrics_url, scrape_until, value
from swarmlm.local_swarm import local_swarm

from swarmlm.errors import RemotePeerError
from swarmlm.experts.protocol import check_response
from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.transport import framing
from swarmlm.transport.direct import connect
from swarmlm.transport.limits import ChannelCounts, ChannelLimits
from hivemind.proto import runtime_pb2

PER_SOURCE = 4
OPEN, REFUSED = "swarmlm_open_connections", "swarmlm_refused_connections_total"


def test_channel_counts_refuse_per_source_then_in_total_and_release():
    counts = ChannelCounts(ChannelLimits(per_source=2, total=3))
    assert counts.acquire("a") is None and counts.acquire("a") is None
    assert "too many connections from a (2 open" in counts.acquire("a")
    assert counts.acquire("b") is None
    assert "this peer's limit" in counts.acquire("c")
    counts.release("a")
    assert counts.acquire("c") is None and counts.total == 3
    assert dict(counts.refused) == {"per_source": 1, "total": 1}
    with pytest.raises(ValueError):
        ChannelLimits(per_source=5, total=4)


@pytest.fixture(scope="module")
def limited_peer(tiny_model_path):
    with local_swarm(DEFAULT_MODEL, ["0:8"], "--max-connections-per-source", str(PER_SOURCE),
                     "--metrics-port", "0") as (dht, peers):
        yield dht, peers[0]


def _direct_address(node) -> str:
    return next(line.split()[1] for line in node.stdout_lines if line.startswith("DIRECT "))


def test_a_flood_of_idle_sessions_from_one_source_is_capped_and_others_are_served(limited_peer, local_model,
                                                                                    tokenizer):
    dht, peer = limited_peer
    url, address = metrics_url(peer), _direct_address(peer)
    with client_model(dht.maddrs) as model:  # a caller with a ticket (a direct connection needs one)
        caller = direct_caller(model, peer.peer_id)
    loop = asyncio.new_event_loop()
    flood = [loop.run_until_complete(connect(address, peer.peer_id, "inference", *caller)) for _ in range(PER_SOURCE)]
    try:
        scrape_until(url, lambda s: value(s, OPEN) == PER_SOURCE)
        reader, writer = loop.run_until_complete(connect(address, peer.peer_id, "inference", *caller))  # one too many
        answer = loop.run_until_complete(asyncio.wait_for(
            framing.read_message(reader, runtime_pb2.ExpertResponse, 2**20), 30))
        writer.close()
        with pytest.raises(RemotePeerError) as refused:
            check_response(peer.peer_id, answer)
        assert refused.value.code == "busy" and "too many connections from ip:127.0.0.1" in str(refused.value)
        samples = scrape_until(url, lambda s: value(s, REFUSED, reason="per_source") >= 1)
        assert value(samples, OPEN) == PER_SOURCE

        ids = tokenizer("def fibonacci(n):", return_tensors="pt")["input_ids"]
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with client_model(dht.maddrs, direct_connections=False) as model:  # p2p: its own source, its own share
            assert model.generate(ids, **kwargs).tolist() == local_model.generate(ids, **kwargs).tolist()
    finally:
        for _, flood_writer in flood:
            flood_writer.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    scrape_until(url, lambda s: value(s, OPEN) == 0)
    with client_model(dht.maddrs) as model:  # direct again, from the source that flooded
        with model.inference_session(max_length=ids.shape[1] + 8) as session:
            assert model.generate(ids, session=session, **kwargs).tolist() == local_model.generate(ids, **kwargs).tolist()
            assert session.transports == ["direct"]
