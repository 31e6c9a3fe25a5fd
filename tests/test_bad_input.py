"""A peer answers malformed requests with a clear error and keeps serving."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from bad_frames import BAD_FRAMES, answer_to_frame
from hivemind.proto import runtime_pb2

from swarmlm.client.rpc import InferenceStream, call_forward
from swarmlm.errors import RemotePeerError
from swarmlm.experts.protocol import (
    FORWARD, INFERENCE, PUSH, InferenceStep, SpanRequest, StepResult, check_response, pack, serialize, unpack,
)
from swarmlm.models.embedded import DEFAULT_MODEL

HIDDEN = 128


@pytest.fixture(scope="module")
def client(dist_model):
    """The distributed model's network side, and the peer serving blocks 0:3."""
    remote = dist_model.remote
    first_peer = remote.manager.make_route()[0].peer_id
    return remote, first_peer


def _forward(client, span: SpanRequest, *tensors: torch.Tensor) -> torch.Tensor:
    remote, peer = client
    hidden, position_ids, *mask = tensors
    return remote.loop.run(call_forward(remote.dialer, peer, span, hidden, position_ids, mask[0] if mask else None, 30))


def _raw(client, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
    remote, peer = client

    async def call():
        async with remote.dialer.answers(peer, FORWARD, request, runtime_pb2.ExpertResponse) as responses:
            async for response in responses:
                return check_response(peer, response)

    return remote.loop.run(call())


def _valid(client) -> torch.Tensor:
    """A valid request succeeds: the peer is still serving."""
    out = _forward(client, SpanRequest(model=DEFAULT_MODEL, start=0, end=3), torch.randn(1, 4, HIDDEN),
                   torch.arange(4)[None])
    assert out.shape == (1, 4, HIDDEN) and torch.isfinite(out).all()
    return out


SPAN = SpanRequest(model=DEFAULT_MODEL, start=0, end=3)
PROMPTED = SpanRequest(model=DEFAULT_MODEL, start=0, end=3, prompt_tokens=2)
POS = torch.arange(4)[None]


@pytest.mark.parametrize(
    "span, tensors, message",
    [
        (SPAN, (torch.randn(1, 4, HIDDEN + 1), POS), "hidden_states must be"),
        (SPAN, (torch.randn(4, HIDDEN), POS), "hidden_states must be"),
        (SPAN, (torch.randint(0, 5, (1, 4, HIDDEN)), POS), "float"),
        (SPAN, (torch.full((1, 4, HIDDEN), float("nan")), POS), "finite"),
        (SPAN, (torch.randn(1, 4, HIDDEN), torch.arange(3)[None]), "position_ids must be"),
        (SPAN, (torch.randn(1, 4, HIDDEN), POS + 10**6), "position_ids must lie"),
        (SPAN, (torch.randn(1, 4, HIDDEN), POS, torch.ones(1, 5)), "attention_mask"),
        (SPAN, (torch.randn(1, 4, HIDDEN), POS, torch.full((1, 4), 7)), "only 0 and 1"),
        (SpanRequest(model="no-such-model", start=0, end=3), (torch.randn(1, 4, HIDDEN), POS), "serves model"),
        (SpanRequest(model=DEFAULT_MODEL, start=2, end=6), (torch.randn(1, 4, HIDDEN), POS), "not served here"),
        (SPAN, (torch.randn(1, 20000, HIDDEN), torch.arange(20000)[None]), "exceed the limit"),
        (SPAN, (torch.randn(65, 1, HIDDEN), torch.zeros(65, 1, dtype=torch.long)), "outside limits"),
    ],
)
def test_invalid_tensors_get_clear_errors(client, span, tensors, message):
    with pytest.raises(RemotePeerError, match=message) as info:
        _forward(client, span, *tensors)
    assert info.value.code == "bad_request"
    _valid(client)


@pytest.mark.parametrize(
    "request_",
    [
        runtime_pb2.ExpertRequest(metadata=b"\xff\x00garbage"),
        runtime_pb2.ExpertRequest(metadata=msgpack.packb([1, 2, 3])),
        runtime_pb2.ExpertRequest(metadata=msgpack.packb({"model": DEFAULT_MODEL, "start": "0", "end": 3})),
        runtime_pb2.ExpertRequest(metadata=pack(SPAN)),  # no tensors
        runtime_pb2.ExpertRequest(
            metadata=pack(SPAN),
            tensors=[runtime_pb2.Tensor(buffer=b"\x00" * 10, size=[1, 4, HIDDEN], dtype="float32"),
                     serialize(POS)],
        ),
        runtime_pb2.ExpertRequest(
            metadata=pack(SPAN),
            tensors=[runtime_pb2.Tensor(buffer=b"", size=[10**6, 10**6, HIDDEN], dtype="float32"), serialize(POS)],
        ),
        runtime_pb2.ExpertRequest(
            metadata=pack(SPAN),
            tensors=[runtime_pb2.Tensor(buffer=b"abcd", size=[1], dtype="complex_nonsense"), serialize(POS)],
        ),
        # deep prompts: wrong shape, more prompt tokens than the sequence, NaN, announced but missing
        runtime_pb2.ExpertRequest(metadata=pack(PROMPTED), tensors=[
            serialize(torch.randn(1, 4, HIDDEN)), serialize(POS), serialize(torch.randn(3, 2, HIDDEN + 1))]),
        runtime_pb2.ExpertRequest(metadata=pack(SpanRequest(model=DEFAULT_MODEL, start=0, end=3, prompt_tokens=5)),
                                  tensors=[serialize(torch.randn(1, 4, HIDDEN)), serialize(POS),
                                           serialize(torch.randn(3, 5, HIDDEN))]),
        runtime_pb2.ExpertRequest(metadata=pack(PROMPTED), tensors=[
            serialize(torch.randn(1, 4, HIDDEN)), serialize(POS), serialize(torch.full((3, 2, HIDDEN), float("nan")))]),
        runtime_pb2.ExpertRequest(metadata=pack(PROMPTED), tensors=[serialize(torch.randn(1, 4, HIDDEN))]),
        # deep prompts for more blocks x tokens than max_request_tokens: refused before the tensor is read
        runtime_pb2.ExpertRequest(metadata=pack(SpanRequest(model=DEFAULT_MODEL, start=0, end=3, prompt_tokens=6000)),
                                  tensors=[serialize(torch.randn(1, 4, HIDDEN)), serialize(POS),
                                           serialize(torch.randn(1, 1, HIDDEN))]),
    ],
)
def test_garbage_requests_get_clear_errors(client, request_):
    with pytest.raises(RemotePeerError) as info:
        _raw(client, request_)
    assert info.value.code == "bad_request", str(info.value)
    _valid(client)


def _open_session(client, batch: int, max_length: int = 2048) -> torch.Tensor:
    """Opens a session on blocks 0:3 and runs one token per sequence through it."""
    remote, peer = client
    span = SpanRequest(model=DEFAULT_MODEL, start=0, end=3, max_length=max_length, batch_size=batch)
    stream = InferenceStream(peer, span)

    async def run():
        await stream.open(remote.dialer)
        try:
            return await stream.step(0, torch.randn(batch, 1, HIDDEN), torch.zeros(batch, 1, dtype=torch.long), None, 30)
        finally:
            stream.close()

    return remote.loop.run(run())


def test_session_beyond_peer_limits_is_refused(client):
    with pytest.raises(RemotePeerError, match="exceeds this peer's limits"):
        _open_session(client, batch=65)
    _valid(client)


def test_session_over_free_cache_says_busy(client):
    with pytest.raises(RemotePeerError, match="not enough KV cache: ") as info:  # 9 x 2048 > 16384 tokens
        _open_session(client, batch=9)
    assert info.value.code == "busy"
    with pytest.raises(RemotePeerError, match="not enough KV cache for one source") as info:  # 8 x 2048 fits the
        _open_session(client, batch=8)  # budget, not the half of it one source may hold
    assert info.value.code == "busy"
    assert _open_session(client, batch=4).shape == (4, 1, HIDDEN)  # 4 x 2048 = 8192 fits the source's share
    _valid(client)


def test_inference_step_beyond_max_length_and_wrong_position(client):
    remote, peer = client

    async def run(position, seq):
        stream = InferenceStream(peer, SpanRequest(model=DEFAULT_MODEL, start=0, end=3, max_length=8, batch_size=1))
        await stream.open(remote.dialer)
        try:
            return await stream.step(position, torch.randn(1, seq, HIDDEN), torch.arange(seq)[None], None, 30)
        finally:
            stream.close()

    with pytest.raises(RemotePeerError, match="beyond its max_length"):
        remote.loop.run(run(0, 9))
    with pytest.raises(RemotePeerError, match="session holds 0 tokens"):
        remote.loop.run(run(5, 1))
    assert remote.loop.run(run(0, 8)).shape == (1, 8, HIDDEN)
    _valid(client)


def test_bfloat16_hidden_states_are_accepted(client):
    """hivemind serializes bfloat16 as float32 bytes; the peer's size check knows it and computes in its dtype."""
    hidden = torch.randn(1, 4, HIDDEN).bfloat16()
    out = _forward(client, SPAN, hidden, POS)
    torch.testing.assert_close(out, _forward(client, SPAN, hidden.float(), POS), atol=0, rtol=0)


def test_sub_span_requests_match_full_span(client):
    """A route may use part of a peer's span: blocks 0:1 then 1:3 equal 0:3."""
    hidden = torch.randn(1, 4, HIDDEN)
    full = _forward(client, SPAN, hidden, POS)
    part = _forward(client, SpanRequest(model=DEFAULT_MODEL, start=0, end=1), hidden, POS)
    part = _forward(client, SpanRequest(model=DEFAULT_MODEL, start=1, end=3), part, POS)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=0)


def test_a_step_below_the_cached_length_rewinds_the_session(client):
    remote, peer = client
    prompt, token = torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)

    async def run():
        stream = InferenceStream(peer, SpanRequest(model=DEFAULT_MODEL, start=0, end=3, max_length=8, batch_size=1))
        await stream.open(remote.dialer)
        try:
            await stream.step(0, prompt, torch.arange(4)[None], None, 30)
            first = await stream.step(4, token, torch.tensor([[4]]), None, 30)
            await stream.step(5, torch.randn(1, 2, HIDDEN), torch.tensor([[5, 6]]), None, 30)
            again = await stream.step(4, token, torch.tensor([[4]]), None, 30)  # back to 4 cached tokens
            return first, again
        finally:
            stream.close()

    first, again = remote.loop.run(run())
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)


def test_bad_pushed_steps_are_dropped_and_the_session_goes_on(client):
    """rpc_push: garbage metadata, steps for sessions that are not open here, a second push of a step already
    served and a push that fails validation are dropped; an open session and the peer keep serving, and valid
    pushes into the session are answered on its client's stream."""
    remote, peer = client
    span = SpanRequest(model=DEFAULT_MODEL, start=0, end=3, max_length=8, batch_size=1)

    async def run():
        stream = InferenceStream(peer, span, push_from=remote.dialer.peer_id)  # this client pushes, as a peer would
        await stream.open(remote.dialer)
        prompt = await stream.step(0, torch.randn(1, 4, HIDDEN), torch.arange(4)[None], None, 30)
        token = torch.randn(1, 1, HIDDEN)
        garbage = [
            runtime_pb2.ExpertRequest(metadata=b"\xc1 not msgpack"),
            runtime_pb2.ExpertRequest(metadata=pack(InferenceStep(position=4, session_id="0" * 32))),
            runtime_pb2.ExpertRequest(metadata=pack(InferenceStep(position=4))),  # no session id
        ]
        def push(step_id: int, position: int) -> runtime_pb2.ExpertRequest:
            return runtime_pb2.ExpertRequest(
                tensors=[serialize(token), serialize(torch.tensor([[position]]))],
                metadata=pack(InferenceStep(position=position, step_id=step_id, session_id=stream.span.session_id)),
            )

        served, done = asyncio.Event(), asyncio.Event()

        channel = await remote.dialer.open_p2p(peer, PUSH)

        async def pushes():
            for message in [*garbage, push(77, 4)]:
                channel.send(message)
            await served.wait()
            channel.send(push(77, 4))  # stale: step 77 was served; dropped, not answered
            bad = push(78, 5)
            bad.tensors[0].CopyFrom(serialize(torch.randn(1, 1, HIDDEN + 1)))
            channel.send(bad)  # invalid: dropped, not answered, and the session goes on
            channel.send(push(78, 5))
            await done.wait()
            channel.end()

        pusher = asyncio.create_task(pushes())
        try:
            output, _ = await stream.receive(77, 30)  # the pushed step, answered to the session's client
            served.set()
            next_answer = unpack((await stream._next()).metadata, StepResult)
            assert (next_answer.step_id, next_answer.position) == (78, 6), next_answer
        finally:
            done.set()
        await pusher
        again = await stream.step(4, token, torch.tensor([[4]]), None, 30)  # rewinds to 4 tokens, same step
        stream.close()
        return prompt, output, again

    prompt, output, again = remote.loop.run(run())
    assert prompt.shape == (1, 4, HIDDEN) and output.shape == (1, 1, HIDDEN)
    torch.testing.assert_close(output, again)
    _valid(client)


@pytest.mark.parametrize("method", [INFERENCE, FORWARD])
@pytest.mark.parametrize("frame, message", BAD_FRAMES)
def test_a_stream_with_bad_framing_gets_a_clear_error(client, method, frame, message):
    """Inference sessions and forward calls (like backward and state) read raw frames under a size limit: a frame
    that announces 1 TB is refused from its header, before any of it is read, and so are a bad marker and bytes
    that are no protobuf, each with a bad_request error; the peer keeps serving (the same over direct
    connections: test_direct.py)."""
    remote, peer = client

    async def call():
        channel = await remote.dialer.open_p2p(peer, method)
        return await answer_to_frame(peer, channel.reader, channel.writer, frame)

    with pytest.raises(RemotePeerError) as info:
        remote.loop.run(call())
    assert info.value.code == "bad_request" and message in str(info.value), str(info.value)
    _valid(client)
