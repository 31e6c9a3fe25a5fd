"""Lying peers against a real local swarm: a peer whose answers are well shaped, finite and wrong (or NaN) is
caught, banned for the client (the honest peer is not), and generate() still returns the local model's tokens.

The swarm: an honest peer serving every block, announcing itself slow, and per test a liar (tests/liar_peer.py:
the real peer with its block outputs replaced) announcing itself very fast, so routes go through the liar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from conftest import client_model
from metrics_scrape import scrape, value
from swarmlm.errors import VerificationError
from swarmlm.local_swarm import start_dht, start_peer
from swarmlm.models.embedded import DEFAULT_MODEL

LIAR = str(Path(__file__).with_name("liar_peer.py"))
PROMPT = "A swarm of strangers"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def honest_swarm(tiny_model_path):
    with start_dht() as dht, start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput", "1") as honest:
        yield dht, honest


@pytest.fixture
def liar(request, honest_swarm):
    dht, _ = honest_swarm
    with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput", "1e9",
                    program=(LIAR, request.param)) as peer:
        peer.name = request.param
        yield peer


@pytest.fixture(scope="module")
def expected(local_model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    return ids, local_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


class Collector(BaseStreamer):
    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens += value.flatten().tolist()

    def end(self):
        self.ended = True


@pytest.mark.parametrize("liar", ["identity", "noise", "offset", "late:6", "fraction:0.3", "nan"], indirect=True)
def test_a_lying_peer_is_caught_and_the_output_is_the_local_models(honest_swarm, liar, expected):
    _, honest = honest_swarm
    ids, reference = expected
    with client_model(honest_swarm[0].maddrs, metrics_port=0) as model:
        streamer = Collector()
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        assert torch.equal(output, reference)
        assert streamer.tokens == reference[0].tolist() and streamer.ended  # the streamer saw no wrong token
        assert liar.peer_id in model.remote.bans.convicted
        assert honest.peer_id not in model.remote.bans.banned()
        samples = scrape(model.remote.metrics_url)  # what an operator sees
        assert value(samples, "swarmlm_client_peer_bans_total", reason="wrong_output") == 1
        if liar.name != "nan":  # a NaN answer is refused at once, without an audit
            assert value(samples, "swarmlm_client_audits_total", outcome="mismatch") >= 1
            assert value(samples, "swarmlm_client_reruns_total") >= 1
            assert value(samples, "swarmlm_client_audited_tokens_total") > 0
        again = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)  # the liar stays out of routes
        assert torch.equal(again, reference)


@pytest.mark.parametrize("liar", ["offset"], indirect=True)
def test_seeded_sampling_survives_a_rerun(honest_swarm, liar, local_model, expected):
    """The rerun after a rollback starts from the caller's random state, so a seeded sample is the local one."""
    ids, _ = expected
    torch.manual_seed(7)
    reference = local_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20)
    with client_model(honest_swarm[0].maddrs) as model:
        torch.manual_seed(7)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20), reference)
        assert liar.peer_id in model.remote.bans.convicted


@pytest.mark.parametrize("liar", ["identity"], indirect=True)
def test_without_verification_the_liar_wins(honest_swarm, liar, expected):
    """The control: the attack is real, and verification is what defeats it."""
    ids, reference = expected
    with client_model(honest_swarm[0].maddrs, verify="off") as model:
        assert not torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), reference)


@pytest.mark.parametrize("liar", ["noise"], indirect=True)  # (5% off would vanish in the final norm)
def test_an_audited_forward_pass_catches_the_liar_and_gives_the_local_logits(honest_swarm, liar, local_model,
                                                                             tokenizer):
    """model(...) (a stateless forward pass, as in training) audited every time (verify_rate=1): the liar is
    caught, the pass runs again without it, and the logits are the local model's; with verify_rate=0 (the
    control) the liar's numbers come through."""
    batch = tokenizer(["A swarm of strangers", "Lies"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = local_model(**batch).logits
    with client_model(honest_swarm[0].maddrs, verify_rate=0.0) as model, torch.no_grad():
        assert (model(**batch).logits - reference).abs().max() > 1e-2
    with client_model(honest_swarm[0].maddrs, verify_rate=1.0) as model, torch.no_grad():
        logits = model(**batch).logits
        assert liar.peer_id in model.remote.bans.convicted
    assert (logits - reference).abs().max() < 1e-3


def test_required_verification_fails_loudly_where_nothing_can_verify(honest_swarm, expected):
    ids, _ = expected
    with client_model(honest_swarm[0].maddrs, verify="required", verify_locally=False) as model:
        with pytest.raises(VerificationError, match="not verified"):
            model.generate(ids, max_new_tokens=4, do_sample=False)


def test_a_single_honest_peer_is_verified_with_local_blocks(honest_swarm, expected):
    ids, reference = expected
    with client_model(honest_swarm[0].maddrs) as model:
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), reference)
        auditor = model.remote.auditor
        assert auditor.checks >= 1 and auditor.mismatches == 0 and auditor.unverified == 0


def test_first_mismatch_finds_the_first_wrong_token_and_non_finite_ones():
    from swarmlm.client.verification import first_mismatch

    computed = torch.randn(2, 5, 8)
    claimed = computed + 1e-5 * torch.randn_like(computed)  # kernel noise
    assert first_mismatch(claimed, computed, 2e-2) is None
    claimed[1, 3] *= 1.05
    index, error = first_mismatch(claimed, computed, 2e-2)
    assert index == 3 and error == pytest.approx(0.05, rel=1e-3)
    claimed[0, 1, 0] = float("nan")
    assert first_mismatch(claimed, computed, 2e-2)[0] == 1


def test_a_convicted_peer_stays_banned():
    from swarmlm.client.peer_stats import PeerBans

    bans = PeerBans(base=1.0, max_duration=2.0, clock=lambda: 0.0)
    bans.convict("liar")
    bans.clear("liar")  # a success elsewhere does not pardon it
    assert "liar" in bans.banned() and bans.ban("liar") == float("inf")


def test_the_verified_streamer_releases_verified_tokens_once():
    from types import SimpleNamespace

    from swarmlm.client.verification import VerifiedStreamer

    session, inner = SimpleNamespace(verified=0, prefix_tokens=0), Collector()
    streamer = VerifiedStreamer(inner, session)
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt: tokens 0..2
    streamer.put(torch.tensor([8]))  # token 3, sampled from the logits at 2
    assert inner.tokens == []
    session.verified = 3  # positions 0..2 verified: the prompt and token 3 may go
    streamer.put(torch.tensor([9]))  # token 4 (logits at 3: not verified)
    assert inner.tokens == [5, 6, 7, 8]
    streamer.restart()  # a rerun repeats the released items first, then new ones
    streamer.put(torch.tensor([[5, 6, 7]]))
    streamer.put(torch.tensor([8]))
    streamer.put(torch.tensor([10]))
    streamer.end()
    assert inner.tokens == [5, 6, 7, 8] and not inner.ended
    streamer.finish()
    assert inner.tokens == [5, 6, 7, 8, 10] and inner.ended
