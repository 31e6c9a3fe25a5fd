"""What verification costs and what it catches, on a local swarm of the embedded default model.

Starts a DHT node and two honest peers serving all 8 blocks (replicas: each can verify the other), then times
greedy generate() through the swarm with verification off, with only the audit before generate() returns
(verify_rate 0), and with the default sampled audits (verify_rate 0.1), alternating the three (the median of
--repeats runs each, tokens/s and the ratio to verification off).

Then a liar joins (tests/liar_peer.py, fraction:F: 5% off in a fraction F of its answers, announcing itself fast)
and each run counts whether the liar was caught and whether the output equals the local model. With the final audit
every corrupted answer beyond the tolerance is caught before generate() returns (probability 1 per corrupted
token); the sampled audits only change how soon (in expectation 1/verify_rate steps after its first lie).

Run:
    python benchmarks/bench_verification.py [--new-tokens 32] [--repeats 5] [--fraction 0.1] [--liar-runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from nodes import Node  # benchmarks/ is on sys.path when a benchmark runs as a script
from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.models.embedded import DEFAULT_MODEL, ensure_embedded_model, swarmlm_home

LIAR = str(Path(__file__).resolve().parent.parent / "tests" / "liar_peer.py")
MODES = {"off": dict(verify="off"), "final audit": dict(verify_rate=0.0), "sampled 0.1": dict(verify_rate=0.1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--liar-runs", type=int, default=5)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()))
    path = ensure_embedded_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Verification of strangers", return_tensors="pt")["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-verify-") as logs:
        logs = Path(logs)
        nodes = []
        try:
            dht = Node(["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], logs / "dht.log", env)
            nodes.append(dht)
            maddrs = dht.wait_ready().maddrs
            common = ["--model", DEFAULT_MODEL, "--blocks", "0:8", "--initial-peers", *maddrs, "--num-threads", "1"]
            for i in range(2):
                nodes.append(Node(["peer", *common, "--throughput", "1000"], logs / f"peer{i}.log", env))
            for node in nodes[1:]:
                node.wait_ready()
            clients = {mode: AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=maddrs,
                                                                               **kwargs)
                       for mode, kwargs in MODES.items()}
            times = {mode: [] for mode in MODES}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for mode, client in clients.items():
                    started = time.perf_counter()
                    output = client.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
                    if repeat:
                        times[mode].append(time.perf_counter() - started)
                    if not torch.equal(output, reference):
                        print(f"MISMATCH with verification {mode}", flush=True)
                        return 1
            base = args.new_tokens / statistics.median(times["off"])
            print(f"{'verification':<14} {'tokens/s':>9} {'ratio':>6}")
            for mode in MODES:
                speed = args.new_tokens / statistics.median(times[mode])
                print(f"{mode:<14} {speed:9.1f} {speed / base:6.2f}", flush=True)
            for client in clients.values():
                client.close()

            liar = Node(["peer", *common, "--throughput", "1e9"], logs / "liar.log", env,
                        program=(LIAR, f"fraction:{args.fraction}"))
            nodes.append(liar)
            liar.wait_ready()
            caught = exact = 0
            for _ in range(args.liar_runs):
                with_liar = AutoDistributedModelForCausalLM.from_pretrained(DEFAULT_MODEL, initial_peers=maddrs)
                try:
                    output = with_liar.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
                    exact += torch.equal(output, reference)
                    caught += liar.peer_id in with_liar.remote.bans.convicted
                finally:
                    with_liar.close()
            print(f"liar corrupting {args.fraction:.0%} of its answers: caught in {caught}/{args.liar_runs} runs, "
                  f"output equal to the local model in {exact}/{args.liar_runs}", flush=True)
        finally:
            for node in reversed(nodes):
                node.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
