"""Direct connections (plain TCP beside the p2p daemons; on by default for loopback peers, `--direct` elsewhere):
used by clients and by pushing peers, refused on a bad hello, and replaced by p2p wherever they are off or fail.

One swarm: peers 0:3 and 3:5 serve direct connections, peer 5:8 does not (`--no-direct`), so a route uses both
transports for the client, 0:3 pushes into 3:5 directly and 3:5 pushes into 5:8 over p2p. (Sessions whose route is
direct only, which step on their own event loop, run in the other test modules' swarms.)"""

from __future__ import annotations

import asyncio

import pytest
import torch
from bad_frames import BAD_FRAMES, answer_to_frame
from conftest import client_model, direct_caller
from metrics_scrape import metrics_url, scrape, value
from swarmlm.local_swarm import local_swarm, start_peer

from swarmlm.client.rpc import InferenceStream
from swarmlm.errors import RemotePeerError
from swarmlm.transport.direct import HELLO, connect
from swarmlm.experts.protocol import SpanRequest
from swarmlm.models.embedded import DEFAULT_MODEL

HIDDEN = 128
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def mixed_swarm(tiny_model_path):
    """dht, [direct peers 0:3 (with /metrics) and 3:5], the p2p-only peer 5:8."""
    with local_swarm(DEFAULT_MODEL, ["0:3"], "--metrics-port", "0") as (dht, peers):  # direct: the loopback default
        with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "3:5", "--direct") as second, \
                start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "5:8", "--no-direct") as plain:
            yield dht, [peers[0], second], plain


@pytest.fixture(scope="module")
def model(mixed_swarm):
    with client_model(mixed_swarm[0].maddrs) as model:
        yield model


def _direct_line(node) -> str | None:
    return next((line.split()[1] for line in node.stdout_lines if line.startswith("DIRECT ")), None)


def test_a_direct_peer_says_where_over_p2p_and_others_serve_none(mixed_swarm, model):
    """The client learns direct addresses from each peer's rpc_info answer (over p2p, which authenticates the
    peer), never from DHT records, which anyone can write."""
    _, (first, second), plain = mixed_swarm
    for node in (first, second):
        assert (_direct_line(node) or "").startswith("127.0.0.1:"), node.stdout_lines
    assert _direct_line(plain) is None
    remote = model.remote
    route = remote.loop.run(remote.make_route(0, remote.num_blocks, mode="latency"))  # probes the peers
    assert {hop.peer_id: hop.direct_address for hop in route} == {
        first.peer_id: _direct_line(first), second.peer_id: _direct_line(second), plain.peer_id: None}


def test_a_route_over_both_transports_generates_the_local_tokens(mixed_swarm, model, local_model, tokenizer):
    """The client reaches 0:3 and 3:5 directly and 5:8 over p2p; 0:3 pushes its steps into 3:5 directly (both serve
    direct connections) and 3:5 into 5:8 over p2p. With the client's direct connections off, every hop uses p2p
    (the peers still push to each other directly). Tokens equal the local model's."""
    _, (first, _), _ = mixed_swarm
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    local = local_model.generate(ids, **kwargs)
    config = model.remote.config
    for direct, transports in ((True, ["direct", "direct", "p2p"]), (False, ["p2p", "p2p", "p2p"])):
        before = scrape(metrics_url(first))
        config.direct_connections = direct
        try:
            with model.inference_session(max_length=ids.shape[1] + 20) as session:
                remote = model.generate(ids, session=session, **kwargs)
        finally:
            config.direct_connections = True
        assert remote.tolist() == local.tolist()
        assert session.transports == transports
        assert session.pushed_steps >= 2 * (20 - 3) and session.lost_pushes == 0, (session.pushed_steps,
                                                                                   session.lost_pushes)
        after = scrape(metrics_url(first))
        pushed = {t: value(after, "swarmlm_pushed_steps_total", transport=t)
                  - value(before, "swarmlm_pushed_steps_total", transport=t) for t in ("direct", "p2p")}
        assert pushed["p2p"] == 0 and pushed["direct"] >= 20 - 3, pushed  # 0:3 -> 3:5


def test_knowing_a_session_id_is_not_enough_to_push_steps_into_it(mixed_swarm, model):
    """A session at 3:5 takes pushed steps from the peer its client named (0:3's peer) only. Another caller that
    knows the session id (here the client itself, over a direct push connection with its valid ticket, then over
    p2p) pushes a step of garbage: the peer drops it (and says so in its log), and the session's next step answers
    exactly what a session that no one pushed into answers for the same inputs."""
    from hivemind.proto import runtime_pb2
    from swarmlm.client.rpc import _inputs
    from swarmlm.experts.protocol import PUSH, InferenceStep, pack, serialize_all

    _, (first, second), _ = mixed_swarm
    remote = model.remote
    direct_caller(model, second.peer_id)  # the client learns its ticket
    span = SpanRequest(model=DEFAULT_MODEL, start=3, end=5, max_length=4, batch_size=1)
    hidden, positions = torch.randn(1, 2, HIDDEN), torch.arange(2).view(1, 2)

    async def two_steps(push_from, intruder: bool) -> torch.Tensor:
        stream = InferenceStream(second.peer_id, span, _direct_line(second), push_from=push_from)
        await stream.open(remote.dialer)
        try:
            await stream.step(0, hidden[:, :1], positions[:, :1], None, 30)
            if intruder:
                for seen, opened in enumerate((remote.dialer.open_direct(second.peer_id, PUSH, _direct_line(second)),
                                               remote.dialer.open_p2p(second.peer_id, PUSH)), start=1):
                    channel = await opened
                    assert channel is not None
                    channel.send(runtime_pb2.ExpertRequest(
                        tensors=serialize_all(_inputs(torch.full((1, 1, HIDDEN), 1e3), positions[:, 1:], None)),
                        metadata=pack(InferenceStep(position=1, step_id=2, session_id=stream.span.session_id))))
                    await asyncio.get_running_loop().run_in_executor(None, _wait_for_log, second,
                                                                     f"Dropped a step pushed by {remote.dialer.peer_id}", seen)
                    channel.close()
            return await stream.step(1, hidden[:, 1:], positions[:, 1:], None, 30)
        finally:
            stream.close()

    attacked = remote.loop.run(two_steps(first.peer_id, intruder=True))
    untouched = remote.loop.run(two_steps(None, intruder=False))
    assert torch.equal(attacked, untouched)


def _wait_for_log(node, text: str, count: int, timeout: float = 30.0) -> None:
    """Waits until `text` is in `node`'s log (stderr) `count` times."""
    import time

    deadline = time.monotonic() + timeout
    while node.stderr.count(text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not logged {count} times; log:\n{node.stderr[-3000:]}")
        time.sleep(0.05)


def _session_step(model, peer: str, address: str | None, blocks=(0, 3)) -> tuple[bool, torch.Tensor]:
    """Opens a session on `blocks` of `peer` (direct at `address` if given) and runs one token: (direct, output)."""
    remote = model.remote
    span = SpanRequest(model=DEFAULT_MODEL, start=blocks[0], end=blocks[1], max_length=4, batch_size=1)
    stream = InferenceStream(peer, span, address)

    async def run():
        await stream.open(remote.dialer)
        try:
            return stream.direct, await stream.step(0, torch.randn(1, 1, HIDDEN), torch.zeros(1, 1, dtype=torch.long),
                                                    None, 30)
        finally:
            stream.close()

    return remote.loop.run(run())


def _serves_direct_sessions(model, node) -> bool:
    """Whether a new session on `node`'s blocks 0:3 opens on its direct address and answers a step."""
    used_direct, output = _session_step(model, node.peer_id, _direct_line(node))
    return used_direct and output.shape == (1, 1, HIDDEN)


def test_a_direct_address_that_fails_is_replaced_by_p2p(mixed_swarm, model):
    """A closed port, a service that is no swarmlm peer (the DHT node's libp2p port) and another peer's direct
    address (it refuses a hello for someone else): the session opens over p2p and works."""
    dht, (direct, _), plain = mixed_swarm
    libp2p_port = dht.maddrs[0].split("/tcp/")[1].split("/")[0]
    for address in ("127.0.0.1:1", f"127.0.0.1:{libp2p_port}"):
        used_direct, output = _session_step(model, direct.peer_id, address)
        assert not used_direct and output.shape == (1, 1, HIDDEN)
    used_direct, output = _session_step(model, plain.peer_id, _direct_line(direct), blocks=(5, 8))
    assert not used_direct and output.shape == (1, 1, HIDDEN)
    assert _serves_direct_sessions(model, direct)  # its own peer's address: direct


@pytest.mark.parametrize("hello", [
    b"GET / HTTP/1.1\r\n\r\n",
    HELLO + b" inference 12D3KooWNotThisPeer {caller} {ticket}\n",
    HELLO + b" nosuchmethod {peer} {caller} {ticket}\n",
    HELLO + b" inference {peer} {caller} {ticket} extra\n",
    HELLO + b" inference {peer}\n",  # no caller, no ticket: the hello of version 1
    b"swarmlm-direct/1 inference {peer}\n",
    HELLO + b" inference {peer} {caller} " + b"0" * 32 + b"\n",  # a made-up ticket
    HELLO + b" inference {peer} {other} {ticket}\n",  # the client's ticket, shown for another peer id
    HELLO + b" push {peer} {caller}\n",
    HELLO + b" " + b"x" * 300 + b"\n",
    b"\xff\xfe garbage without an end of line",
])
def test_a_bad_hello_is_refused_and_the_peer_keeps_serving(mixed_swarm, model, hello):
    """The listener closes a connection whose hello is not one for this peer, a known method and a caller with the
    ticket this peer issued to that caller (over p2p); it answers nothing on it (no greeting), and the next direct
    session works. Knowing the port and the peer id is not enough."""
    _, (direct, second), _ = mixed_swarm
    host, port = _direct_line(direct).split(":")
    caller, ticket = direct_caller(model, direct.peer_id)
    for name, word in ((b"{peer}", direct.peer_id), (b"{caller}", caller), (b"{ticket}", ticket),
                       (b"{other}", second.peer_id)):
        hello = hello.replace(name, word.encode())

    async def say_hello() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(hello)
            if not hello.endswith(b"\n"):
                writer.write_eof()  # the connection ends before a line does
            return await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()

    assert model.remote.loop.run(say_hello()) == b""
    assert _serves_direct_sessions(model, direct)


@pytest.mark.parametrize("frame, message", BAD_FRAMES)
def test_a_direct_session_with_bad_framing_gets_a_clear_error(mixed_swarm, model, frame, message):
    _, (direct, _), _ = mixed_swarm
    caller = direct_caller(model, direct.peer_id)

    async def call():
        reader, writer = await connect(_direct_line(direct), direct.peer_id, "inference", *caller)
        return await answer_to_frame(direct.peer_id, reader, writer, frame)

    with pytest.raises(RemotePeerError) as info:
        model.remote.loop.run(call())
    assert info.value.code == "bad_request" and message in str(info.value), str(info.value)
    assert _serves_direct_sessions(model, direct)


def test_garbage_on_a_direct_push_connection_closes_it_and_the_peer_keeps_serving(mixed_swarm, model):
    _, (direct, _), _ = mixed_swarm
    caller = direct_caller(model, direct.peer_id)

    async def push_garbage() -> bytes:
        reader, writer = await connect(_direct_line(direct), direct.peer_id, "push", *caller)
        try:
            writer.write(b"\x07" + b"\x00" * 16)  # an unknown frame marker
            return await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()

    assert model.remote.loop.run(push_garbage()) == b""
    assert _serves_direct_sessions(model, direct)


def test_direct_connections_need_an_address_others_reach():
    from swarmlm.peer.config import PeerConfig

    def config(*maddrs, **kwargs) -> PeerConfig:
        return PeerConfig(model=DEFAULT_MODEL, blocks=(0, 1), new_swarm=True, host_maddrs=list(maddrs), **kwargs)

    assert config("/ip4/127.0.0.1/tcp/0").serves_direct  # loopback only: on by default
    assert not config("/ip4/127.0.0.1/tcp/0", direct=False).serves_direct
    assert not config("/ip4/0.0.0.0/tcp/0").serves_direct  # reachable from other machines: opt-in
    assert not config("/ip4/192.168.1.5/tcp/0").serves_direct
    assert not config("/ip4/127.0.0.1/tcp/0", announce_maddrs=["/ip4/203.0.113.7/tcp/31337"]).serves_direct
    assert not config("/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0").serves_direct  # direct connections are IPv4 only
    assert config("/ip4/127.0.0.1/tcp/0", direct=True).serves_direct
    config("/ip4/0.0.0.0/tcp/0", direct=True, announce_maddrs=["/ip4/192.168.1.5/tcp/31337"])
    with pytest.raises(ValueError, match="--announce-maddrs"):
        config("/ip4/0.0.0.0/tcp/0", direct=True)
    with pytest.raises(ValueError, match="/ip4"):
        config("/ip6/::1/tcp/0", direct=True)
    with pytest.raises(ValueError, match="direct_port"):
        config("/ip4/127.0.0.1/tcp/0", direct_port=70000)
