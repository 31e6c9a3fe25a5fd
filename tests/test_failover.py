"""Peers die mid-request (SIGKILL, no goodbye): the client fails over and the results still match
the local model exactly; a peer that leaves gracefully (SIGTERM) finishes what it runs and refuses
new work. Every killed or departed peer is restarted (new peer id) before the next test."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import client_model
from swarmlm.local_swarm import local_swarm, start_peer
from swarmlm.models.embedded import DEFAULT_MODEL

SPANS = ["0:4", "0:4", "4:8", "4:8", "2:6"]  # every block has at least 2 peers; 2:6 overlaps both halves
PEER_ARGS = ("--throughput", "1000", "--update-period", "5")  # equal throughput: routes follow RTT and hop count
NEW_TOKENS = 24


class Replicas:
    """The module's peers by peer id; kills them and restarts the killed ones with the same span."""

    def __init__(self, dht_maddr: str, peers):
        self.dht_maddr = dht_maddr
        self.peers = {_peer_id(p): (p, span) for p, span in zip(peers, SPANS)}
        self.killed: list[str] = []

    def kill(self, peer_id: str) -> str:
        self.peers[peer_id][0].terminate(signal.SIGKILL)
        self.killed.append(peer_id)
        return peer_id

    def kill_serving(self, route, block: int) -> str:
        return self.kill(next(hop.peer_id for hop in route if hop.start <= block < hop.end))

    def leave(self, peer_id: str):
        """Sends SIGTERM (graceful leave) without waiting; returns the peer's process."""
        process = self.peers[peer_id][0]
        process.proc.send_signal(signal.SIGTERM)
        self.killed.append(peer_id)
        return process

    def heal(self) -> None:
        departed = [self.peers.pop(peer_id) for peer_id in self.killed]
        self.killed.clear()
        for process, _ in departed:
            process.terminate()  # a peer still leaving gets its SIGTERM grace, then SIGKILL
        spans = [span for _, span in departed]
        fresh = [start_peer(DEFAULT_MODEL, self.dht_maddr, "--blocks", span, *PEER_ARGS) for span in spans]
        for process, span in zip(fresh, spans):
            process.wait_ready()
            self.peers[_peer_id(process)] = (process, span)

    def close(self) -> None:
        for process, _ in self.peers.values():
            process.terminate()


def _peer_id(process) -> str:
    return process.maddrs[0].rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def replicas(tiny_model_path):
    with local_swarm(DEFAULT_MODEL, SPANS, *PEER_ARGS) as (dht, peers):
        replicas = Replicas(dht.maddrs[0], peers)
        try:
            yield replicas
        finally:
            replicas.close()


@pytest.fixture(scope="module")
def client(replicas):
    with client_model([replicas.dht_maddr], request_timeout=15.0) as model:
        yield model


@pytest.fixture(autouse=True)
def healed(replicas):
    replicas.heal()
    yield replicas


class KillAtStep(LogitsProcessor):
    """Kills the peer serving `block` when generate() has produced `step` tokens (0 = after the prefill)."""

    def __init__(self, replicas: Replicas, session, step: int, block: int):
        self.replicas, self.session, self.step, self.block = replicas, session, step, block
        self.calls, self.victim = 0, None

    def __call__(self, input_ids, scores):
        if self.calls == self.step:
            self.victim = self.replicas.kill_serving(self.session.route, self.block)
        self.calls += 1
        return scores


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer("The import statement", return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def expected(local_model, prompt_ids):
    return local_model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("step,block", [(0, 1), pytest.param(NEW_TOKENS // 2, 6, marks=pytest.mark.canary),
                                        (NEW_TOKENS - 2, 1)],
                         ids=["first-step", "middle", "last-step"])
def test_generation_survives_a_killed_peer(client, replicas, prompt_ids, expected, step, block):
    with client.inference_session(max_length=prompt_ids.shape[1] + NEW_TOKENS) as session:
        killer = KillAtStep(replicas, session, step, block)
        output = client.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 session=session, logits_processor=LogitsProcessorList([killer]))
        assert killer.victim is not None
        assert killer.victim not in {hop.peer_id for hop in session.route}
        assert session.failovers >= 1
    assert output.tolist() == expected.tolist()


def test_generation_survives_a_peer_killed_before_the_prefill(client, replicas, prompt_ids, expected):
    with client.inference_session(max_length=prompt_ids.shape[1] + NEW_TOKENS) as session:
        open_route, victims = session._open, []

        async def open_then_kill(start, end, previous=None):
            hops = await open_route(start, end, previous)
            if not victims:  # the chosen peer dies after the session was requested, before any step
                victims.append(replicas.kill_serving([hop.route for hop in hops], 5))
            return hops

        session._open = open_then_kill
        output = client.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 session=session)
        assert victims and session.failovers >= 1
    assert output.tolist() == expected.tolist()


def test_forward_and_backward_survive_a_peer_killed_between_them(client, local_model, replicas, tokenizer):
    batch = tokenizer(["Python supports several kinds of", "A class definition"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    remote, forward_routes = client.remote, []
    run_chain = remote.run_chain

    def recording_run_chain(*args):
        output, hops = run_chain(*args)
        forward_routes.append([hop for hop, _ in hops])
        return output, hops

    def grads(model, after_forward=lambda: None):
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels).loss
        after_forward()
        loss.backward()
        return loss.detach(), embeds.grad

    remote.run_chain = recording_run_chain
    try:
        with torch.enable_grad():
            remote_loss, remote_grad = grads(client, lambda: replicas.kill_serving(forward_routes[-1], 6))
            local_loss, local_grad = grads(local_model)
    finally:
        del remote.run_chain
    assert len(replicas.killed) == 1
    torch.testing.assert_close(remote_loss, local_loss, atol=1e-5, rtol=0)
    rel = (remote_grad - local_grad).norm() / local_grad.norm()
    assert rel < 1e-3, f"input-embedding gradient relative error {rel:.2e}"


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout} s")
        time.sleep(0.05)


def test_a_leaving_peer_finishes_its_session_and_refuses_new_work(client, replicas, prompt_ids, expected):
    """SIGTERM halfway through a generation: the peer announces OFFLINE and refuses new sessions and
    forward calls with a clear error (a client sent there goes elsewhere), while the session it
    serves keeps stepping on it to the last token; it exits once that session is closed."""
    from swarmlm.client.rpc import InferenceStream, call_forward
    from swarmlm.dht.records import ServerState
    from swarmlm.dht.registry import fetch_block_records
    from swarmlm.errors import RemotePeerError

    remote, max_length = client.remote, prompt_ids.shape[1] + NEW_TOKENS
    leaving = {}

    class LeaveAtStep(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            if self.calls == NEW_TOKENS // 2:
                hop = session.route[0]
                leaving.update(hop=hop, process=replicas.leave(hop.peer_id))
                wait_until(lambda: {r.state for r in fetch_block_records(remote.dht, DEFAULT_MODEL, 8)[0]
                                    if r.peer_id == hop.peer_id} == {ServerState.OFFLINE}, 15, "OFFLINE announced")
            self.calls += 1
            return scores

    with client.inference_session(max_length=max_length) as session:
        output = client.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 session=session, logits_processor=LogitsProcessorList([LeaveAtStep()]))
        hop, process = leaving["hop"], leaving["process"]
        assert output.tolist() == expected.tolist()
        assert session.failovers == 0 and hop in session.route  # the running session finished on the leaving peer

        hidden = torch.zeros(1, 2, client.config.hidden_size)
        with pytest.raises(RemotePeerError, match="shutting down"):
            remote.loop.run(call_forward(remote.dialer, hop.peer_id, remote.span_request(hop), hidden,
                                         torch.arange(2)[None], None, 10.0))

        async def open_and_step(stream):
            await stream.open(remote.dialer)
            try:
                return await stream.step(0, hidden, torch.arange(2)[None], None, 10.0)
            finally:
                stream.close()

        stream = InferenceStream(hop.peer_id, remote.span_request(hop, max_length=8, batch_size=1))
        with pytest.raises(RemotePeerError, match="shutting down"):
            remote.loop.run(open_and_step(stream))

        # a new session sent to the leaving peer (by a client that has not seen its OFFLINE yet) goes elsewhere
        stale_route, make_route = list(session.route), remote.make_route

        async def stale_then_fresh(start, end, **kwargs):
            if stale_route:
                route, stale_route[:] = list(stale_route), []
                return route
            return await make_route(start, end, **kwargs)

        remote.make_route = stale_then_fresh
        try:
            with client.inference_session(max_length=max_length) as fresh:
                again = client.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False, session=fresh)
                assert fresh.failovers == 1 and hop.peer_id not in {h.peer_id for h in fresh.route}
        finally:
            del remote.make_route
        assert again.tolist() == expected.tolist()
        assert process.proc.poll() is None, "the peer must wait for the open session"
    assert process.proc.wait(timeout=30) == 0
    wait_until(lambda: "Peer stopped" in process.stderr, 10, "the peer's last log line")
    assert "still running" not in process.stderr  # it stopped because the session closed, not at its drain limit


def test_a_leaving_peer_answers_the_forward_call_it_is_running(client, replicas):
    """SIGTERM while a peer computes a long forward call: the call is still answered, with the same output as
    another replica of those blocks gives, and the peer exits with code 0 once it has answered."""
    from swarmlm.client.rpc import call_forward, call_info
    from swarmlm.experts.protocol import SpanRequest

    remote = client.remote
    leaving, other = [peer_id for peer_id, (_, span) in replicas.peers.items() if span == "0:4"][:2]
    span = SpanRequest(model=remote.model, start=0, end=4)
    hidden = torch.randn(8, 2048, client.config.hidden_size, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(2048).repeat(8, 1)  # 8 x 2048 tokens: the peer computes for a while

    def forward(peer_id: str):
        return call_forward(remote.dialer, peer_id, span, hidden, positions, None, 120.0)

    call = remote.loop.submit(forward(leaving))
    wait_until(lambda: call.done() or remote.loop.run(call_info(remote.dialer, leaving, 5.0)).active_calls > 0, 60,
               "the forward call running on the peer")
    assert not call.done(), "the forward call ended before the peer was asked to leave: make it longer"
    process = replicas.leave(leaving)
    output = call.result(timeout=120)
    assert process.proc.wait(timeout=60) == 0
    wait_until(lambda: "Peer stopped" in process.stderr, 10, "the peer's last log line")
    assert "still running" not in process.stderr  # it stopped because the call was answered, not at its drain limit
    torch.testing.assert_close(output, remote.loop.run(forward(other)), atol=1e-4, rtol=0)


def test_a_clear_error_when_every_replica_is_gone(client, replicas, prompt_ids):
    """With no live peer left for some blocks, the client gives up after bounded retries."""
    from swarmlm.errors import SwarmError

    for peer_id, (_, span) in list(replicas.peers.items()):
        if span in ("4:8", "2:6"):
            replicas.kill(peer_id)
    with pytest.raises(SwarmError, match="failed after .* attempts"):
        client.generate(prompt_ids, max_new_tokens=4, do_sample=False)
