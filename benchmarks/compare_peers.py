"""Compares two versions of the peer code on greedy generation speed, in one run on one machine.

Separate runs of bench_generation.py differ by up to 2 ms/token on a shared machine, more than most
single changes save. This script starts two swarms side by side (a DHT node and peers 0:4 and 4:8 each,
as bench_generation.py does): swarm A's processes import `swarmlm` from checkout A, swarm B's from
checkout B (PYTHONPATH). One client (this checkout's code) then generates through A, through B and with
the local model in rounds, alternating which swarm goes first (the first of a round runs about 0.2 ms/token
faster), and reports each side's median ms/token, overhead over local, and the paired difference B - A
per round, with the number of rounds B won. It also checks that A, B and local produce the same tokens.
Both versions must speak the same protocol as this checkout's client.

Run (from a checkout; A and B are directories that hold a `swarmlm` package, e.g. `git worktree add`):
    python benchmarks/compare_peers.py --a ../swarmlm-before --b . [--model tiny] [--rounds 10] [--p2p a|b|both]
The peers listen on loopback, so they serve direct connections by default; `--p2p` starts a side's peers with
--no-direct (`--a . --b . --p2p a` compares p2p with direct connections on the same code). A checkout from before
direct connections were the loopback default runs p2p without the flag (and does not know it).
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
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from bench_generation import MODELS, PROMPT_TOKENS, model_dir, start_swarm  # benchmarks/ is on sys.path
from nodes import Node
from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.models.embedded import swarmlm_home


def checkout(path: str) -> Path:
    root = Path(path).resolve()
    if not (root / "swarmlm" / "__init__.py").exists():
        raise argparse.ArgumentTypeError(f"{root} holds no swarmlm package")
    return root


def ms_per_token(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(input_ids, **kwargs)
    return (time.perf_counter() - start) / new_tokens * 1000, output[0].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=checkout, required=True, help="checkout whose peer code swarm A runs")
    parser.add_argument("--b", type=checkout, required=True, help="checkout whose peer code swarm B runs")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--peer-threads", type=int, default=1)
    parser.add_argument("--p2p", default="", choices=["", "a", "b", "both"],
                        help="whose peers serve no direct connections (e.g. --a . --b . --p2p a: p2p against direct)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    path = model_dir(args.model)
    input_ids = torch.randint(3, 2048, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    nodes: list[Node] = []
    swarms = {}
    times: dict[str, list[float]] = {"A": [], "B": [], "local": []}
    tokens = {}
    with tempfile.TemporaryDirectory(prefix="swarmlm-compare-") as log_dir:
        try:
            for side, root in (("A", args.a), ("B", args.b)):
                env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()),
                           PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
                p2p = args.p2p in (side.lower(), "both")
                dht_maddrs = start_swarm(nodes, path, Path(log_dir) / side, env, args.peer_threads, p2p=p2p)
                swarms[side] = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=dht_maddrs,
                                                                               verify="off")  # peer code only
                print(f"swarm {side} ready (peer code from {root}{', p2p only' if p2p else ''})",
                      flush=True)
            local = AutoModelForCausalLM.from_pretrained(path).eval()
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for side in ("A", "B", "local") if round_ % 2 == 0 else ("B", "A", "local"):
                    ms, tokens[side] = ms_per_token(local if side == "local" else swarms[side], input_ids,
                                                    args.new_tokens)
                    if round_ > 0:
                        times[side].append(ms)
        finally:
            for swarm in swarms.values():
                swarm.close()
            for node in reversed(nodes):
                node.terminate()

    print(f"\n{args.model} model, {args.rounds} rounds of {args.new_tokens} greedy tokens; ms/token (median):")
    local_ms = statistics.median(times["local"])
    for side in ("A", "B"):
        overhead = statistics.median(s - l for s, l in zip(times[side], times["local"]))
        print(f"  {side}: {statistics.median(times[side]):.2f} (overhead over local {overhead:.2f})")
    print(f"  local: {local_ms:.2f}")
    diffs = [b - a for a, b in zip(times["A"], times["B"])]
    print(f"B - A per round: median {statistics.median(diffs):+.2f} ms/token; B faster in "
          f"{sum(d < 0 for d in diffs)} of {len(diffs)} rounds")
    same = tokens["A"] == tokens["B"] == tokens["local"]
    print(f"tokens match: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
