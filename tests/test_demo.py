"""`swarmlm demo` as a new user runs it (`make demo`): a whole local swarm, a route through its peers, the local text."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

PROMPT = "The Python language reference says that"


@pytest.mark.canary
def test_demo_prints_a_route_of_its_peers_and_the_local_models_text(local_model, tokenizer):
    done = subprocess.run([sys.executable, "-m", "swarmlm.cli", "demo", "--max-new-tokens", "12", "--prompt", PROMPT],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, f"demo exited {done.returncode}\nstdout:\n{out}\nstderr:\n{done.stderr[-4000:]}"
    # "  peer  blocks 0:4  /ip4/127.0.0.1/tcp/PORT/p2p/PEERID" for each peer it started
    started = {m.group(3): (int(m.group(1)), int(m.group(2)))
               for m in re.finditer(r"^  peer  blocks (\d+):(\d+)  /\S+/p2p/(\w+)$", out, re.MULTILINE)}
    assert len(started) == 2, out
    route_text = out.split("\nRoute:\n", 1)[1].split("\n\n", 1)[0]
    # "  PEERID -> blocks A:B  (transport)" for each hop, in order
    hops = [(m.group(1), int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^  (\w+) -> blocks (\d+):(\d+)  \((?:direct|p2p)\)$", route_text, re.MULTILINE)]
    assert len(hops) == len(route_text.strip().splitlines()) == 2, route_text
    assert [(start, end) for _, start, end in hops] == [(0, 4), (4, 8)]
    assert all(started[peer_id] == (start, end) for peer_id, start, end in hops), (started, hops)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        local = local_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert f"Generated: {tokenizer.decode(local[0, ids.shape[1]:], skip_special_tokens=True)!r}" in out
    assert "Check: identical to the local transformers model with the same weights" in out
    assert re.search(r"^12 tokens in [\d.]+ s", out, re.MULTILINE), out
