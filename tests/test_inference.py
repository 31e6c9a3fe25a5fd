"""The distributed model against the local transformers model with the same weights (the oracle)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from metrics_scrape import metrics_url, scrape, scrape_until, value

PROMPTS = ["Python supports several kinds of", "A class definition"]


def test_forward_logits_match_local(dist_model, local_model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left-padded
    with torch.no_grad():
        remote = dist_model(**batch).logits
        local = local_model(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(remote[mask], local[mask], atol=1e-3, rtol=0)


def test_greedy_generation_token_identical(dist_model, local_model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    remote = dist_model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    local = local_model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert remote.shape[1] == ids.shape[1] + 24
    assert remote.tolist() == local.tolist()


def _served(samples: dict, kind: str) -> tuple[float, float]:
    """(calls or steps answered, tokens processed) of `kind` in one scrape of a peer's metrics."""
    return (value(samples, "swarmlm_request_duration_seconds_count", kind=kind),
            value(samples, "swarmlm_processed_tokens_total", kind=kind))


@pytest.mark.canary
def test_generate_makes_one_prefill_then_one_token_session_steps(swarm, dist_model, local_model, tokenizer):
    """generate() of N new tokens costs every peer of the route one prefill of the prompt and N - 1 one-token
    steps of its session, and no stateless forward call: if a transformers release stops handing the session's
    cache to the model (as the `past_key_values` -> `cache` rename of 5.24 did), this fails instead of generation
    quietly re-sending the whole prefix at every token."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    prompt, n = ids.shape[1], 10
    urls = [metrics_url(peer) for peer in swarm[1]]
    before = [scrape(url) for url in urls]
    remote = dist_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert remote.tolist() == local_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False).tolist()
    for url, old in zip(urls, before):
        # a peer counts a step when it has sent the answer: wait until it counted the last one
        new = scrape_until(url, lambda s: _served(s, "inference")[0] >= _served(old, "inference")[0] + n)
        steps, tokens = (a - b for a, b in zip(_served(new, "inference"), _served(old, "inference")))
        assert (steps, tokens) == (n, prompt + n - 1), url
        assert _served(new, "forward") == _served(old, "forward"), url
    for peer in swarm[1]:  # the peers' side of transformers' renames
        assert "deprecat" not in peer.stderr.lower(), peer.stderr


def test_steps_go_from_peer_to_peer_and_match_the_client_relayed_ones(dist_model, local_model, tokenizer):
    """With peer_push, the first peer sends each decoding step straight to the second (the client only reads
    both answers); the tokens equal those of a client-relayed session and of the local model."""
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    local = local_model.generate(ids, **kwargs)
    for push in (True, False):
        dist_model.remote.config.peer_push = push
        try:
            with dist_model.inference_session(max_length=ids.shape[1] + 24) as session:
                remote = dist_model.generate(ids, session=session, **kwargs)
        finally:
            dist_model.remote.config.peer_push = True
        assert remote.tolist() == local.tolist()
        assert session.transports == ["direct", "direct"]  # the loopback default (p2p: test_monitoring.py)
        if push:  # the push stream to the next peer opens during the first pushed step, then every step goes on it
            assert len(session.route) == 2 and session.pushed_steps >= 24 - 3, session.pushed_steps
        else:
            assert session.pushed_steps == 0


def test_left_padded_batch_identical(dist_model, local_model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the test needs padding"
    remote = dist_model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    local = local_model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert remote.tolist() == local.tolist()


def test_seeded_sampling_identical(dist_model, local_model, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=True, temperature=1.5, top_k=50)
    torch.manual_seed(1234)
    remote = dist_model.generate(ids, **kwargs)
    torch.manual_seed(1234)
    local = local_model.generate(ids, **kwargs)
    assert remote.tolist() == local.tolist()


def test_session_split_over_generate_calls(dist_model, local_model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    local = local_model.generate(ids, max_new_tokens=21, min_new_tokens=21, do_sample=False)
    with dist_model.inference_session(max_length=ids.shape[1] + 21) as session:
        first = dist_model.generate(ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, session=session)
        assert first.tolist() == local[:, : ids.shape[1] + 7].tolist()
        dist_model.generate(None, max_new_tokens=7, min_new_tokens=7, do_sample=False, session=session)
        last = dist_model.generate(None, max_new_tokens=7, min_new_tokens=7, do_sample=False, session=session)
        assert session.position == ids.shape[1] + 20  # the last token is generated, not yet fed
    assert last.tolist() == local.tolist()


def test_session_continues_with_new_user_tokens(dist_model, local_model, tokenizer):
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    extra = tokenizer(" and more", return_tensors="pt")["input_ids"]
    with dist_model.inference_session(max_length=64) as session:
        first = dist_model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, session=session)
        second = dist_model.generate(extra, max_new_tokens=5, min_new_tokens=5, do_sample=False, session=session)
    local_first = local_model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    local_second = local_model.generate(torch.cat([local_first, extra], 1), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert first.tolist() == local_first.tolist()
    assert second.tolist() == local_second.tolist()


def test_gradients_flow_to_client_parameters(dist_model, local_model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def grads(model):
        model.zero_grad(set_to_none=True)
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        return loss.detach(), embeds.grad, model.lm_head.weight.grad.clone()

    with torch.enable_grad():
        remote_loss, remote_embed_grad, remote_head_grad = grads(dist_model)
        local_loss, local_embed_grad, local_head_grad = grads(local_model)
    torch.testing.assert_close(remote_loss, local_loss, atol=1e-5, rtol=0)
    rel = (remote_embed_grad - local_embed_grad).norm() / local_embed_grad.norm()
    assert rel < 1e-3, f"input-embedding gradient relative error {rel:.2e}"
    torch.testing.assert_close(remote_head_grad, local_head_grad, atol=1e-5, rtol=1e-3)
    dist_model.zero_grad(set_to_none=True)
    local_model.zero_grad(set_to_none=True)


def test_a_banned_sole_server_is_still_used(dist_model, local_model, tokenizer):
    """A ban routes around a peer; when no other peer serves its blocks (one transient stream error of the
    only server of a span), the client uses it anyway instead of failing with missing blocks."""
    remote = dist_model.remote
    for peer_id in remote.manager.candidates():
        remote.bans.ban(peer_id)
    try:
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(dist_model(ids).logits, local_model(ids).logits, atol=1e-3, rtol=0)
    finally:
        for peer_id in remote.manager.candidates():
            remote.bans.clear(peer_id)


def test_a_lost_push_costs_the_push_timeout_then_the_client_sends_the_step(dist_model, local_model, tokenizer,
                                                                         monkeypatch):
    """Pushes into the second hop are lost (they name a session that does not exist there, so the peer drops
    them): the first lost one is noticed after push_timeout, the client sends that step itself and stops
    pushing into the hop; the tokens equal the local model's, with no failover and no request timeout."""
    from swarmlm.client.rpc import InferenceStream
    from swarmlm.experts.protocol import PushTarget

    opened = InferenceStream.__init__

    def lost_pushes(self, peer_id, span, direct_address=None, push_from=None):
        opened(self, peer_id, span, direct_address, push_from)
        self.push_target = PushTarget(peer_id=peer_id, session_id="f" * 32)  # not this session's id

    monkeypatch.setattr(InferenceStream, "__init__", lost_pushes)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    local = local_model.generate(ids, **kwargs)
    config = dist_model.remote.config
    monkeypatch.setattr(config, "push_timeout", 0.5)
    with dist_model.inference_session(max_length=ids.shape[1] + 12) as session:
        started = time.perf_counter()
        remote = dist_model.generate(ids, session=session, **kwargs)
        seconds = time.perf_counter() - started
    assert remote.tolist() == local.tolist()
    assert len(session.route) == 2 and session.lost_pushes == 1 and session.pushed_steps == 1
    assert session.failovers == 0
    assert seconds < config.request_timeout, seconds


def test_an_answer_of_the_wrong_shape_counts_as_a_peer_failure(dist_model, local_model, tokenizer, monkeypatch):
    """A peer's answer to a step that is not [batch, tokens, hidden] (here: one answer cut short) fails that hop:
    the client replays its history into a fresh session and the tokens still equal the local model's."""
    from swarmlm.client.rpc import InferenceStream

    receive, answers = InferenceStream.receive, []

    async def one_bad_answer(self, step_id, timeout):
        output, pushed = await receive(self, step_id, timeout)
        answers.append(step_id)
        return (output[:, :, :-1] if len(answers) == 7 else output), pushed

    monkeypatch.setattr(InferenceStream, "receive", one_bad_answer)
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with dist_model.inference_session(max_length=ids.shape[1] + 10) as session:
        remote = dist_model.generate(ids, session=session, **kwargs)
    assert remote.tolist() == local_model.generate(ids, **kwargs).tolist()
    assert session.failovers == 1


def _free_cache_tokens(model) -> dict[str, int]:
    from swarmlm.client.rpc import call_info

    remote = model.remote
    return {peer_id: remote.loop.run(call_info(remote.dialer, peer_id, 10.0)).free_cache_tokens
            for peer_id in remote.manager.candidates()}


def test_a_direct_route_steps_on_the_callers_thread(dist_model, local_model, tokenizer, monkeypatch):
    """Both peers serve direct connections (the loopback default), so a session steps on its own event loop in the
    caller's thread. Called from a thread that already runs an event loop (a notebook's), a new session steps on the
    client's network thread instead, and a session begun elsewhere steps in a helper thread. Tokens equal the local
    model's every time, and closed sessions free the peers' caches."""
    from swarmlm.client.rpc import InferenceStream

    receive, threads = InferenceStream.receive, []

    async def noting_the_thread(self, step_id, timeout):
        threads.append(threading.current_thread().name)
        return await receive(self, step_id, timeout)

    monkeypatch.setattr(InferenceStream, "receive", noting_the_thread)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    local = local_model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    free = _free_cache_tokens(dist_model)

    assert dist_model.generate(ids, **kwargs).tolist() == local[:, :ids.shape[1] + 8].tolist()
    assert set(threads) == {threading.current_thread().name}

    async def in_a_notebook(session=None):
        return dist_model.generate(None if session else ids, session=session, **kwargs)

    threads.clear()
    assert asyncio.run(in_a_notebook()).tolist() == local[:, :ids.shape[1] + 8].tolist()
    assert set(threads) == {"swarmlm-client-rpc"}

    with dist_model.inference_session(max_length=ids.shape[1] + 16) as session:
        dist_model.generate(ids, session=session, **kwargs)
        threads.clear()
        assert asyncio.run(in_a_notebook(session)).tolist() == local.tolist()
        assert len(set(threads)) == 1 and threads[0].startswith("swarmlm-session"), threads

    deadline = time.monotonic() + 30
    while _free_cache_tokens(dist_model) != free:  # the peers see the sessions' streams end
        assert time.monotonic() < deadline, (_free_cache_tokens(dist_model), free)
        time.sleep(0.05)


def test_an_interrupted_direct_step_ends_its_session(dist_model, tokenizer, monkeypatch):
    """Ctrl-C while a session steps on its own loop (the answer is late here) cancels the step and closes the
    session: further steps say so, and the peers free its caches."""
    import os
    import signal

    import pytest

    from swarmlm.client.rpc import InferenceStream
    from swarmlm.errors import SwarmError

    receive, waiting = InferenceStream.receive, threading.Event()

    async def late_answer(self, step_id, timeout):
        if step_id == 3:
            waiting.set()
            await asyncio.sleep(60)
        return await receive(self, step_id, timeout)

    monkeypatch.setattr(InferenceStream, "receive", late_answer)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    free = _free_cache_tokens(dist_model)
    interrupt = threading.Thread(target=lambda: waiting.wait(30) and os.kill(os.getpid(), signal.SIGINT))
    interrupt.start()
    with dist_model.inference_session(max_length=ids.shape[1] + 8) as session:
        with pytest.raises(KeyboardInterrupt):
            dist_model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, session=session)
        interrupt.join()
        assert session.closed and waiting.is_set()
        with pytest.raises(SwarmError, match="closed"):
            dist_model.generate(ids, max_new_tokens=2, session=session)
    deadline = time.monotonic() + 30
    while _free_cache_tokens(dist_model) != free:
        assert time.monotonic() < deadline, (_free_cache_tokens(dist_model), free)
        time.sleep(0.05)
