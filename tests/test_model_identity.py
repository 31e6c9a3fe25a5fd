"""A model is known by its config and weights, not only its name: peers serving another config or other weights
under the same name get no traffic from a client whose checkpoint tells them apart.

The swarm: an honest peer announcing itself slow, and two impostors under the default model's name announcing
1e9 tokens/s (so routes would go through them): one serves a copy whose block 2 was fine-tuned (other weights),
one a copy with another config (rms_norm_eps)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import client_model
from safetensors.torch import load_file, save_file
from swarmlm.local_swarm import start_dht, start_peer

from swarmlm.models.checkpoint import tensor_files
from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.models.fingerprint import BlockDigests, config_hash, span_weights_hash

PROMPT = "def fibonacci(n):"


def _copy(source, target, *, perturb: str | None = None, config_update: dict | None = None):
    shutil.copytree(source, target)
    if perturb is not None:
        shard = target / tensor_files(target)[perturb]
        tensors = load_file(shard)
        tensors[perturb] = tensors[perturb] * 1.01  # a small fine-tune of one matrix
        save_file(tensors, shard, metadata={"format": "pt"})
    if config_update:
        config = json.loads((target / "config.json").read_text())
        config.update(config_update)
        (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def swarm_with_impostors(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("impostors")
    fine_tuned = _copy(tiny_model_path, root / "fine-tuned", perturb="model.layers.2.self_attn.q_proj.weight")
    other_config = _copy(tiny_model_path, root / "other-config", config_update={"rms_norm_eps": 1e-3})
    impostor = ("--blocks", "0:8", "--throughput", "1e9", "--dht-prefix", DEFAULT_MODEL)
    with start_dht() as dht, \
            start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--throughput", "1") as honest, \
            start_peer(str(fine_tuned), dht.maddrs[0], *impostor) as weights_impostor, \
            start_peer(str(other_config), dht.maddrs[0], *impostor) as config_impostor:
        yield dht, honest, weights_impostor, config_impostor


def _generate(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with model.inference_session(max_length=ids.shape[1] + 6) as session:
        output = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, session=session)
    return output, [peer for peer, _, _ in session.describe_route()]


def test_impostors_under_the_same_name_get_no_traffic(swarm_with_impostors, local_model, tokenizer):
    dht, honest, _, _ = swarm_with_impostors
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reference = local_model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with client_model(dht.maddrs) as model:
        for _ in range(2):
            output, route = _generate(model, tokenizer)
            assert torch.equal(output, reference) and route == [honest.peer_id]
        assert model.remote.bans.convicted == set()  # nobody had to be caught: they were never used


def test_without_the_weights_check_only_the_config_impostor_is_left_out(swarm_with_impostors, tokenizer):
    """The control: a client that does not read its blocks' weights (or has none) tells configs apart only; with
    verification off too, the fine-tuned impostor wins the route."""
    dht, honest, weights_impostor, config_impostor = swarm_with_impostors
    with client_model(dht.maddrs, check_weights=False, verify="off") as model:
        _, route = _generate(model, tokenizer)
    assert route == [weights_impostor.peer_id]


def test_digests_follow_the_stored_weights_and_the_config(tiny_model_path, tmp_path):
    from transformers import AutoConfig

    from swarmlm.experts.families import family_for_config
    from swarmlm.models.checkpoint import load_tensors

    config = AutoConfig.from_pretrained(tiny_model_path)
    family = family_for_config(config)

    def span_hash(path, dtype=None):
        digests = BlockDigests(0)
        load_tensors(path, lambda name: family.block_tensor_name(name, 0, 8), dtype, on_read=digests)
        return span_weights_hash(config_hash(config), digests.blocks(), 0, 8)

    original = span_hash(tiny_model_path)
    assert original == span_hash(tiny_model_path, torch.bfloat16)  # hashed as stored, before the cast
    fine_tuned = _copy(tiny_model_path, tmp_path / "ft", perturb="model.layers.7.mlp.down_proj.weight")
    assert span_hash(fine_tuned) != original
    other = AutoConfig.from_pretrained(_copy(tiny_model_path, tmp_path / "cfg", config_update={"rms_norm_eps": 1e-2}))
    assert config_hash(other) != config_hash(config)
    renamed = AutoConfig.from_pretrained(tiny_model_path)
    renamed._name_or_path = "/somewhere/else"  # where a copy lives is not the model
    assert config_hash(renamed) == config_hash(config)
    assert span_weights_hash(config_hash(config), {0: b"x"}, 0, 2) is None  # a block not loaded: no hash
