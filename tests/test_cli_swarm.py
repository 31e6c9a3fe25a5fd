"""The CLI end to end: `swarmlm generate`, graceful leave, automatic block choice, missing blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from swarmlm.local_swarm import local_swarm, start_peer

from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.dht.records import ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.errors import MissingBlocksError
from swarmlm.models.embedded import DEFAULT_MODEL


@pytest.mark.canary
def test_generate_command_streams_the_local_models_text(swarm, local_model, tokenizer):
    dht, _ = swarm
    prompt = "The import statement"
    result = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "generate", "--model", DEFAULT_MODEL, "--initial-peers", dht.maddrs[0],
         "--prompt", prompt, "--max-new-tokens", "12"],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    ids = tokenizer(prompt, return_tensors="pt")
    expected = local_model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(expected[0]) in result.stdout
    assert "deprecat" not in result.stderr.lower(), result.stderr  # the client's side of transformers' renames


def test_sigterm_announces_offline_before_exit(swarm, dist_model):
    dht, _ = swarm
    with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:2") as extra:
        peer_id = extra.peer_id
        states = {r.peer_id: r.state for r in fetch_block_records(dist_model.remote.dht, DEFAULT_MODEL, 8)[0]}
        assert states.get(peer_id) == ServerState.ONLINE
        assert extra.terminate(signal.SIGTERM) == 0
        assert "Task was destroyed" not in extra.stderr  # its event loops end cleanly, no task left pending
    states = {r.peer_id: r.state for r in fetch_block_records(dist_model.remote.dht, DEFAULT_MODEL, 8)[0]}
    assert states[peer_id] == ServerState.OFFLINE
    dist_model.remote.manager.refresh(force=True)
    assert peer_id not in {hop.peer_id for hop in dist_model.remote.manager.make_route()}


def test_missing_blocks_error_then_num_blocks_fills_the_gap(tiny_model_path, local_model):
    with local_swarm(DEFAULT_MODEL, ["0:3"]) as (dht, _):
        model = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=dht.maddrs)
        try:
            with pytest.raises(MissingBlocksError, match=r"no peer serves blocks 3:8 of model swarmlm-tiny-llama; "
                                                         r"start one with: swarmlm peer"):
                model(torch.tensor([[5, 6, 7]]))
            with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--num-blocks", "5") as filler:
                assert filler.ready_line.startswith("READY blocks 3:8")
                ids = torch.tensor([[5, 6, 7, 8]])
                assert model.generate(ids, max_new_tokens=6, min_new_tokens=6).tolist() == \
                    local_model.generate(ids, max_new_tokens=6, min_new_tokens=6).tolist()
        finally:
            model.close()
