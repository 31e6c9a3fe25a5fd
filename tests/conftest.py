"""Shared fixtures: one embedded model per test session, one live swarm per module that needs it."""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

# settings from the environment (SWARMLM_<FLAG>, see swarmlm.settings) would change every node the tests start
for _name in [name for name in os.environ if name.startswith("SWARMLM_") and name != "SWARMLM_HOME"]:
    del os.environ[_name]
# all processes of the test session share one SWARMLM_HOME, so the embedded model is built once
os.environ.setdefault("SWARMLM_HOME", tempfile.mkdtemp(prefix="swarmlm-test-home-"))
torch.set_num_threads(1)

from swarmlm.local_swarm import local_swarm  # noqa: E402
from swarmlm.models.embedded import DEFAULT_MODEL, ensure_embedded_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path():
    return ensure_embedded_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def swarm(tiny_model_path):
    """dht + two peers serving blocks 0:3 and 3:8 of the default model (each serving /metrics)."""
    with local_swarm(DEFAULT_MODEL, ["0:3", "3:8"], "--metrics-port", "0") as (dht, peers):
        yield dht, peers


@pytest.fixture(scope="module")
def local_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@contextlib.contextmanager
def client_model(initial_peers: list[str], **client_kwargs):
    """The default model's distributed client joined through `initial_peers` (ClientConfig fields in
    `client_kwargs`), closed on exit."""
    from swarmlm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=initial_peers, **client_kwargs)
    try:
        yield model
    finally:
        model.close()


def direct_caller(model, peer_id: str) -> tuple[str, str]:
    """(the client `model`'s peer id, the ticket `peer_id` gives it for direct connections): what a dialer shows in
    its hello (swarmlm.transport.direct); asked for over p2p, in the peer's info answer (the client's dialer keeps
    it)."""
    from swarmlm.client.rpc import call_info

    remote = model.remote
    info = remote.loop.run(call_info(remote.dialer, peer_id, 30))
    assert info.direct_ticket is not None, f"{peer_id} serves no direct connections"
    remote.dialer.learn(peer_id, info.direct_ticket)  # as the client's probe does
    return remote.dialer.peer_id, info.direct_ticket


@pytest.fixture(scope="module")
def dist_model(swarm):
    with client_model(swarm[0].maddrs) as model:
        yield model
