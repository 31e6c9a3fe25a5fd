"""Greedy generation speed through a local swarm versus the same model run locally.

For each model size this starts a DHT node and two peers (blocks 0:4 and 4:8) as subprocesses
on 127.0.0.1, then times `generate(do_sample=False)` at batch 1 through the swarm and through
`transformers.AutoModelForCausalLM` with the same weights, in the same process. Swarm and local runs
alternate (the machine's speed drifts during a run; both sides see the same drift). Each side gets one
warm-up run, then the median of `--repeats` runs is reported as tokens/s (new tokens over the wall time
of the whole generate() call, prompt prefill included), together with the ratio
swarm/local (and the lowest and highest ratio of one alternating pair: the run's noise) and the per-token
overhead of the swarm in ms: (1/swarm - 1/local) * 1000. It also checks that both produce the same tokens.
To compare two versions of the peer code, use compare_peers.py: separate runs of this script differ by
up to 2 ms/token on a shared machine.

`--device cuda --torch-dtype bfloat16` runs the peers' blocks and the local baseline model on that
device and dtype (the swarm client itself, embeddings and LM head, stays on the CPU in float32);
on CUDA every timed run is bracketed by torch.cuda.synchronize().

Models (Llama, fp32, 8 layers, vocab 32000, deterministic random weights) are written once to
$SWARMLM_HOME/bench/ and reused:
    tiny:  hidden 256,  intermediate 688,  8 heads
    large: hidden 1024, intermediate 2752, 16 heads

Run:
    python benchmarks/bench_generation.py [--models tiny,large] [--new-tokens 64] [--repeats 5]
        [--peer-threads 1] [--client-threads 1] [--device cpu] [--torch-dtype float32] [--p2p]
The peers listen on loopback, so they serve direct connections (plain TCP) by default and the client steps on
them; `--p2p` starts them with --no-direct, so that every message goes through the p2p daemons.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from nodes import Node  # benchmarks/ is on sys.path when a benchmark runs as a script
from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.models.embedded import ModelSpec, create_model_dir, swarmlm_home

_COMMON = dict(num_hidden_layers=8, vocab_size=32000, max_position_embeddings=2048, initializer_range=0.02,
               tie_word_embeddings=False)
MODELS = {
    "tiny": dict(_COMMON, hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8),
    "large": dict(_COMMON, hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16),
}
SPANS = ("0:4", "4:8")
PROMPT_TOKENS = 16


@dataclass
class Result:
    model: str
    swarm_tps: float
    local_tps: float
    match: bool
    pair_ratios: tuple[float, ...] = ()  # swarm/local of each alternating pair (shows the run's noise)

    @property
    def ratio(self) -> float:
        return self.swarm_tps / self.local_tps

    @property
    def overhead_ms(self) -> float:
        return (1 / self.swarm_tps - 1 / self.local_tps) * 1000


def model_dir(name: str) -> Path:
    path = swarmlm_home() / "bench" / f"bench-llama-{name}"
    if not (path / "config.json").exists():
        print(f"[{name}] creating the model at {path} (one time)", flush=True)
    return create_model_dir(path, ModelSpec("llama", MODELS[name]), max_shard_size="200MB")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model, input_ids: torch.Tensor, new_tokens: int,
                  device: torch.device = torch.device("cpu")) -> tuple[float, torch.Tensor]:
    """Tokens/s of one greedy run (prompt prefill included) and the generated ids. `device`: where the
    model computes (on CUDA, queued kernels are waited for around the timed run)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    start = time.perf_counter()
    output = model.generate(input_ids, **kwargs)
    _sync(device)
    return (output.shape[1] - input_ids.shape[1]) / (time.perf_counter() - start), output


def start_swarm(nodes: list[Node], path: Path, log_prefix: Path, env: dict, peer_threads: int = 1,
                device: str = "cpu", torch_dtype: str = "float32", p2p: bool = False) -> list[str]:
    """Starts a DHT node and one peer per span of SPANS on `path` (appended to `nodes` as they start, so the
    caller can stop them whatever happens); returns the DHT's multiaddrs once every peer is ready."""
    dht = Node(["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], Path(f"{log_prefix}-dht.log"), env)
    nodes.append(dht)
    dht_maddrs = dht.wait_ready().maddrs
    peers = [Node(["peer", "--model", str(path), "--blocks", span, "--initial-peers", *dht_maddrs,
                   "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--num-threads", str(peer_threads),
                   "--device", device, "--torch-dtype", torch_dtype, *(["--no-direct"] if p2p else [])],
                  Path(f"{log_prefix}-peer{i}.log"), env)
             for i, span in enumerate(SPANS)]  # they load in parallel
    nodes += peers
    for peer in peers:
        peer.wait_ready()
    return dht_maddrs


def bench_model(name: str, args: argparse.Namespace, env: dict, log_dir: Path) -> Result:
    path = model_dir(name)
    input_ids = torch.randint(3, 2048, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    device = torch.device(args.device)
    nodes: list[Node] = []
    swarm = local = None
    try:
        dht_maddrs = start_swarm(nodes, path, log_dir / name, env, args.peer_threads, args.device, args.torch_dtype,
                                 args.p2p)
        print(f"[{name}] swarm ready: dht + peers {', '.join(SPANS)}", flush=True)

        # raw swarm speed: verification off (bench_verification.py measures what it costs)
        swarm = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=dht_maddrs, verify="off")
        local = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.torch_dtype)).to(device).eval()
        # swarm and local runs alternate, so that both see the same machine (its speed drifts over a run)
        speeds: dict[str, list[float]] = {"swarm": [], "local": []}
        for i in range(args.repeats + 1):  # the first round warms up
            swarm_tps, swarm_ids = time_generate(swarm, input_ids, args.new_tokens)
            with torch.inference_mode():
                local_tps, local_ids = time_generate(local, input_ids.to(device), args.new_tokens, device)
            if i > 0:
                speeds["swarm"].append(swarm_tps)
                speeds["local"].append(local_tps)
    finally:
        if swarm is not None:
            swarm.close()
        for node in reversed(nodes):
            node.terminate()
        del local
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = Result(name, statistics.median(speeds["swarm"]), statistics.median(speeds["local"]),
                    torch.equal(swarm_ids.cpu(), local_ids.cpu()),
                    tuple(s / l for s, l in zip(speeds["swarm"], speeds["local"])))
    print(f"[{name}] swarm {result.swarm_tps:.1f} tok/s | local {result.local_tps:.1f} tok/s | "
          f"ratio {result.ratio:.3f} (pairs {min(result.pair_ratios):.3f}-{max(result.pair_ratios):.3f}) | "
          f"overhead {result.overhead_ms:.2f} ms/token | "
          f"tokens match: {'yes' if result.match else 'NO'}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,large", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-threads", type=int, default=1, help="--num-threads of each peer")
    parser.add_argument("--client-threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--device", default="cpu", help="torch device of the peers' blocks and of the local "
                        "baseline, e.g. cuda or cuda:0 (the swarm client stays on the CPU)")
    parser.add_argument("--torch-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the peers' blocks and of the local baseline")
    parser.add_argument("--p2p", action="store_true", help="peers serve no direct connections (--no-direct): "
                        "the client and the pushing peers reach them through the p2p daemons")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")

    torch.set_num_threads(args.client_threads)
    hf_logging.disable_progress_bar()
    env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()))
    print(f"batch 1, prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens, greedy, median of "
          f"{args.repeats} after 1 warm-up; peer threads {args.peer_threads}, client threads {args.client_threads}"
          + (f"; device {args.device}, dtype {args.torch_dtype}" if (args.device, args.torch_dtype) != ("cpu", "float32")
             else "") + ("; p2p only (--no-direct)" if args.p2p else "; direct connections (loopback default)"))
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-") as log_dir:
        results = [bench_model(name, args, env, Path(log_dir)) for name in names]

    print(f"\n{'model':<8}{'swarm tok/s':>13}{'local tok/s':>13}{'ratio':>8}{'overhead ms/tok':>17}{'match':>7}")
    for r in results:
        print(f"{r.model:<8}{r.swarm_tps:>13.1f}{r.local_tps:>13.1f}{r.ratio:>8.3f}{r.overhead_ms:>17.2f}"
              f"{'yes' if r.match else 'NO':>7}")
    return 0 if all(r.match for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
