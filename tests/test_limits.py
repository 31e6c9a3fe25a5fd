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
from swarmlm.experts.protocol import SpanRequest, check_response, pack
from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.transport import framing
from swarmlm.transport.direct import connect
from swarmlm.transport.limits import ChannelCounts, ChannelLimits
from hivemind.proto import runtime_pb2

PER_SOURCE = 4
OPEN_TIMEOUT = 2.0
SMALL_SESSION = SpanRequest(model=DEFAULT_MODEL, start=0, end=8, max_length=8, batch_size=1)
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
                     "--metrics-port", "0", "--open-timeout", str(OPEN_TIMEOUT)) as (dht, peers):
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
    for _, writer in flood:  # each opens a small session, then sends nothing (an idle session stays session_timeout)
        writer.write(framing.encode(runtime_pb2.ExpertRequest(metadata=pack(SMALL_SESSION))))
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


def _answer(loop, address, peer, caller, request=None) -> runtime_pb2.ExpertResponse:
    """Opens a direct inference channel, sends `request` (if any) and reads the first answer."""
    reader, writer = loop.run_until_complete(connect(address, peer.peer_id, "inference", *caller))
    if request is not None:
        writer.write(framing.encode(runtime_pb2.ExpertRequest(metadata=pack(request))))
    try:
        return loop.run_until_complete(asyncio.wait_for(
            framing.read_message(reader, runtime_pb2.ExpertResponse, 2**20), 30))
    finally:
        writer.close()


def test_a_connection_that_opens_no_session_is_closed_after_the_open_timeout(limited_peer):
    dht, peer = limited_peer
    with client_model(dht.maddrs) as model:
        caller = direct_caller(model, peer.peer_id)
    loop = asyncio.new_event_loop()
    try:
        answer = _answer(loop, _direct_address(peer), peer, caller)  # says hello, then nothing
    finally:
        loop.close()
    with pytest.raises(RemotePeerError, match=f"no request within {OPEN_TIMEOUT}"):
        check_response(peer.peer_id, answer)
    scrape_until(metrics_url(peer), lambda s: value(s, OPEN) == 0)


def test_one_source_may_reserve_half_of_the_kv_cache(limited_peer):
    """The peer's budget is 16384 tokens (the default), so one source may hold 8192: a direct session of 4 x 2048
    fits, a second one from the same address is refused as busy, and a session of another source (this client's
    peer id, over p2p) still opens."""
    from swarmlm.client.rpc import InferenceStream

    dht, peer = limited_peer
    big = SpanRequest(model=DEFAULT_MODEL, start=0, end=8, max_length=2048, batch_size=4)
    with client_model(dht.maddrs) as model:
        remote, address = model.remote, _direct_address(peer)
        direct_caller(model, peer.peer_id)

        async def sessions():
            first, second, other = (InferenceStream(peer.peer_id, big, address),
                                    InferenceStream(peer.peer_id, big.model_copy(update=dict(batch_size=1)), address),
                                    InferenceStream(peer.peer_id, big.model_copy(update=dict(batch_size=1))))
            try:
                await first.open(remote.dialer)
                await first._next()  # accepted
                assert first.direct
                await second.open(remote.dialer)
                with pytest.raises(RemotePeerError, match="not enough KV cache for one source") as refused:
                    check_response(peer.peer_id, await second._next())
                assert refused.value.code == "busy"
                await other.open_p2p(remote.dialer)
                check_response(peer.peer_id, await other._next())  # another source: accepted
            finally:
                for stream in (first, second, other):
                    stream.close()

        remote.loop.run(sessions(), timeout=60)
