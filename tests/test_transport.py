"""The transport seam: our frames are hivemind's protobuf-stream frames, channels and calls work over p2p and
direct TCP, size limits hold, and the admission hook refuses callers before any handler runs.

Pins the hivemind API that swarmlm.transport.p2p relies on (the only module that talks to hivemind's P2P)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from swarmlm.errors import RequestError
from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.transport import Dialer, RefusedError, Server, framing
from swarmlm.transport import p2p as p2p_adapter


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


class _Writer:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def test_our_frames_are_the_frames_of_hivemind_protobuf_streams():
    message = runtime_pb2.ExpertRequest(metadata=b"meta" * 100)

    async def check():
        writer = _Writer()
        await P2P.send_protobuf(message, writer)  # hivemind's framing
        assert framing.encode(message) == writer.data
        end = _Writer()
        await P2P.send_protobuf(P2P.END_OF_STREAM, end)
        assert framing.END_OF_STREAM_FRAME == end.data
        read, error = await P2P.receive_protobuf(runtime_pb2.ExpertRequest, _reader(framing.encode(message)))
        assert read == message and error is None
        assert await framing.read_message(_reader(writer.data), runtime_pb2.ExpertRequest, 2**20) == message
        assert await framing.read_message(_reader(end.data), runtime_pb2.ExpertRequest, 2**20) is None

    asyncio.run(check())


def test_frames_over_the_limit_or_broken_are_refused_and_an_error_frame_says_why():
    async def check():
        big = framing.encode(runtime_pb2.ExpertRequest(metadata=b"x" * 1000))
        with pytest.raises(RequestError, match="exceeds the limit of 100"):
            await framing.read_message(_reader(big), runtime_pb2.ExpertRequest, 100)
        with pytest.raises(RequestError, match="unknown stream frame marker"):
            await framing.read_message(_reader(b"\x07" + bytes(8)), runtime_pb2.ExpertRequest, 100)
        error = _Writer()
        await P2P.send_protobuf(type(P2P.END_OF_STREAM)(message="it broke"), error)
        with pytest.raises(RequestError, match="it broke"):
            await framing.read_message(_reader(error.data), runtime_pb2.ExpertRequest, 100)
        assert await framing.read_message(_reader(big[:5]), runtime_pb2.ExpertRequest, 2**20) is None  # cut short

    asyncio.run(check())


def test_the_hivemind_p2p_api_the_adapter_uses_is_there():
    for name in ("add_protobuf_handler", "remove_protobuf_handler", "call_protobuf_handler", "iterate_protobuf_handler",
                 "add_binary_stream_handler", "remove_binary_stream_handler", "call_binary_stream_handler"):
        assert inspect.iscoroutinefunction(getattr(P2P, name)), name
    assert {"stream_input", "stream_output", "balanced"} <= set(inspect.signature(P2P.add_protobuf_handler).parameters)
    assert (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, P2P.HEADER_LEN, P2P.BYTEORDER) == (b"\x00", b"\x01", 8, "big")
    assert p2p_adapter.handle_name("inference") == "swarmlm.SpanService.rpc_inference"  # what peers always served


@pytest.fixture(scope="module")
def two_nodes():
    """Two P2P instances on loopback (no NAT port mapping), the second knowing the first; one event loop."""
    loop = asyncio.new_event_loop()

    async def start():
        a = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, nat_port_map=False)
        b = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, nat_port_map=False,
                             initial_peers=await a.get_visible_maddrs())
        return a, b

    a, b = loop.run_until_complete(start())
    yield loop, a, b
    async def stop():
        await asyncio.gather(a.shutdown(), b.shutdown())

    loop.run_until_complete(stop())
    loop.close()


def test_channels_and_calls_over_p2p_and_direct_and_the_admission_hook(two_nodes):
    loop, a, b = two_nodes
    refused_methods = {"secret"}

    async def echo(channel):  # answers each message with its metadata reversed, until the stream ends
        while (message := await channel.receive(runtime_pb2.ExpertRequest, 2**20)) is not None:
            channel.send(runtime_pb2.ExpertResponse(metadata=message.metadata[::-1]))
        channel.close()

    async def info(request, context):
        return runtime_pb2.ExpertResponse(metadata=p2p_adapter.caller_of(context).encode())

    async def double(channel):  # a call as peers serve forward: one request in, its answer out, then the end
        request = await channel.receive(runtime_pb2.ExpertRequest, 2**20)
        channel.send(runtime_pb2.ExpertResponse(metadata=request.metadata * 2))
        while await channel.receive(runtime_pb2.ExpertRequest, 2**20) is not None:
            pass
        channel.close()

    called = []

    async def secret(channel):
        called.append(channel.peer)

    async def run():
        server = Server(a, admit=lambda peer, kind, method: "not you" if method in refused_methods else None)
        await server.serve(channels={"echo": echo, "secret": secret, "double": double},
                           unary={"info": (info, runtime_pb2.ExpertRequest),
                                  "hidden": (info, runtime_pb2.ExpertRequest)})
        address = await server.serve_direct("127.0.0.1", 0, "127.0.0.1")
        dialer, peer = Dialer(b), p2p_adapter.own_id(a)
        assert await dialer.open_direct(peer, "echo", address) is None  # no ticket yet: the dialer does not try
        dialer.learn(peer, server.direct_ticket(dialer.peer_id))  # as an info answer over p2p hands it out
        results = {}
        for channel in (await dialer.open_p2p(peer, "echo"), await dialer.open(peer, "echo", address)):
            channel.send(runtime_pb2.ExpertRequest(metadata=b"abc"))
            results[channel.kind] = (await channel.receive(runtime_pb2.ExpertResponse, 2**20)).metadata
            assert channel.peer == peer
            channel.end()
        assert results == {"p2p": b"cba", "direct": b"cba"}
        answer = await dialer.call(peer, "info", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
        assert answer.metadata.decode() == p2p_adapter.own_id(b)  # the caller, as libp2p proved it
        async with dialer.answers(peer, "double", runtime_pb2.ExpertRequest(metadata=b"ab"),
                                  runtime_pb2.ExpertResponse) as answers:
            assert (await answers.__anext__()).metadata == b"abab"  # read what is needed, then leave the block
        for channel in (await dialer.open_p2p(peer, "secret"), await dialer.open(peer, "secret", address)):
            assert await channel.receive(runtime_pb2.ExpertResponse, 2**20) is None  # closed, handler never ran
        refused_methods.add("hidden")
        with pytest.raises(Exception, match="not you"):
            await dialer.call(peer, "hidden", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
        assert called == [] and server.channels.refused["admission"] == 3
        dialer.learn("QmSomeoneElse", "0" * 32)
        wrong = await dialer.open_direct("QmSomeoneElse", "echo", address)  # the listener is not that peer
        assert wrong is None
        await server.stop()

    loop.run_until_complete(asyncio.wait_for(run(), 60))


def test_a_private_server_serves_members_only(two_nodes):
    """With a swarm key, every channel (p2p or direct) and call starts with the caller's membership proof: a member's
    Dialer is served as usual, one without the key or with another is refused before any handler runs."""
    loop, a, b = two_nodes
    key = SwarmKey(b"k" * 32)
    served = []

    async def echo(channel):
        served.append(channel.kind)
        while (message := await channel.receive(runtime_pb2.ExpertRequest, 2**20)) is not None:
            channel.send(runtime_pb2.ExpertResponse(metadata=message.metadata[::-1]))
        channel.close()

    async def info(request, context):
        return runtime_pb2.ExpertResponse(metadata=b"hello")

    async def run():
        server = Server(a, swarm_key=key)
        await server.serve(channels={"echo": echo}, unary={"info": (info, runtime_pb2.ExpertRequest)})
        address = await server.serve_direct("127.0.0.1", 0, "127.0.0.1")
        peer = p2p_adapter.own_id(a)
        for dialer_key, member in ((key, True), (None, False), (SwarmKey(b"o" * 32), False)):
            dialer = Dialer(b, swarm_key=dialer_key)
            dialer.learn(peer, server.direct_ticket(dialer.peer_id))
            for channel in (await dialer.open_p2p(peer, "echo"), await dialer.open(peer, "echo", address)):
                channel.send(runtime_pb2.ExpertRequest(metadata=b"abc"))
                answer = await channel.receive(runtime_pb2.ExpertResponse, 2**20)
                assert (answer.metadata if answer is not None else None) == (b"cba" if member else None)
                channel.end()
            if member:
                answer = await dialer.call(peer, "info", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
                assert answer.metadata == b"hello"
            else:
                with pytest.raises(Exception, match="not a member"):
                    await dialer.call(peer, "info", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse)
        assert sorted(served) == ["direct", "p2p"] and server.channels.refused["admission"] == 6
        await server.stop()

    loop.run_until_complete(asyncio.wait_for(run(), 60))
    assert issubclass(RefusedError, PermissionError)
