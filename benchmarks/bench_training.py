"""Collaborative training throughput on one machine, and all-reduce speed over loopback.

1. Trainers: starts N = 1, 2, 3 `swarmlm train` processes on 127.0.0.1 (the embedded tiny Llama with
   --num-layers layers, the built-in corpus, disjoint shards, --min-peers N so they start together,
   --threads torch threads each, 8 held-out samples evaluated per epoch). Swarm-wide samples/s =
   target_batch_size x epochs / wall time between the first trainer's reports of epoch --warmup-epochs
   and of the last epoch (averaging included). Also a plain local loop (same model, batch, AdamW and
   threads, no swarm) as the reference; ratios are against 1 trainer and against that local loop.
2. All-reduce: two hivemind DecentralizedAverager peers (each with its own DHT node and p2p daemon) average
   a --allreduce-mb MB float32 tensor; timed from the moment both have formed the group (matchmaking
   excluded) to both results, median of --repeats. Compared with a plain torch copy of the same tensor.

Run:
    python benchmarks/bench_training.py [--trainers 1,2,3] [--num-layers 2] [--seq-len 128] [--batch-size 8]
        [--target-batch-size 512] [--epochs 5] [--warmup-epochs 1] [--threads 1] [--allreduce-mb 100]
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

from nodes import Node
from swarmlm.models.embedded import DEFAULT_MODEL, swarmlm_home

STARTUP_TIMEOUT = 300.0


class Trainer(Node):
    """A `swarmlm train` subprocess; records when each EPOCH line arrives."""

    def __init__(self, args: list[str], log_path: Path, env: dict):
        super().__init__(["train", *args], log_path, env)
        self.epoch_times: dict[int, float] = {}

    def line_arrived(self, arrived: float, line: str) -> None:
        super().line_arrived(arrived, line)
        if line.startswith("EPOCH"):
            self.epoch_times[int(line.split()[1])] = arrived


def swarm_samples_per_second(num_trainers: int, args, env: dict, log_dir: Path) -> float:
    common = ["--run-id", f"bench-{num_trainers}-{os.getpid()}", "--model", DEFAULT_MODEL,
              "--num-layers", str(args.num_layers), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--target-batch-size", str(args.target_batch_size),
              "--epochs", str(args.epochs), "--matchmaking-time", str(args.matchmaking_time),
              "--averaging-timeout", "30", "--num-threads", str(args.threads), "--num-shards", str(num_trainers),
              "--min-peers", str(num_trainers), "--max-val-samples", "8", "--no-progress", "--log-level", "warning"]
    trainers: list[Trainer] = []
    try:
        first = Trainer(common + ["--shard-index", "0", "--new-swarm"], log_dir / f"n{num_trainers}-0.log", env)
        trainers.append(first)
        first.wait_for("READY", STARTUP_TIMEOUT)
        for i in range(1, num_trainers):
            trainers.append(Trainer(common + ["--shard-index", str(i), "--initial-peers", *first.maddrs],
                                    log_dir / f"n{num_trainers}-{i}.log", env))
        for trainer in trainers:
            trainer.wait_for("DONE", STARTUP_TIMEOUT + 60 * args.epochs)
    finally:
        for trainer in trainers:
            trainer.terminate()
    times = first.epoch_times
    start = min(e for e in times if e >= args.warmup_epochs)
    end = max(times)
    return args.target_batch_size * (end - start) / (times[end] - times[start])


def local_samples_per_second(args) -> float:
    """The same model, batch and optimizer without any swarm: forward + backward + AdamW step."""
    from swarmlm.training.model import build_model

    model = build_model(DEFAULT_MODEL, seed=0, num_layers=args.num_layers).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(3, 2048, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    steps = max(3, args.target_batch_size // args.batch_size)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * args.batch_size / (time.perf_counter() - start)


def allreduce_seconds(megabytes: int, repeats: int) -> list[float]:
    """Wall time of one all-reduce of `megabytes` MB between two averagers on loopback (matchmaking excluded)."""
    import hivemind
    from hivemind.averaging.control import AveragingStage

    from swarmlm.dht.node import create_dht, shutdown_dht

    numel = megabytes * 2 ** 20 // 4
    first_dht = create_dht([], ["/ip4/127.0.0.1/tcp/0"])
    second_dht = create_dht([str(m) for m in first_dht.get_visible_maddrs()], ["/ip4/127.0.0.1/tcp/0"])
    averagers = [hivemind.DecentralizedAverager([torch.full((numel,), float(i))], dht, prefix="bench_allreduce",
                                                target_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0,
                                                start=True)
                 for i, dht in enumerate((first_dht, second_dht))]
    timings = []
    try:
        for _ in range(repeats):
            controls = [averager.step(wait=False, require_trigger=True, timeout=120) for averager in averagers]
            while any(c.stage != AveragingStage.AWAITING_TRIGGER for c in controls):
                if any(c.done() for c in controls):
                    raise RuntimeError(f"matchmaking failed: {[c.exception() for c in controls if c.done()]}")
                time.sleep(0.01)
            start = time.perf_counter()
            for control in controls:
                control.allow_allreduce()
            for control in controls:
                control.result()
            timings.append(time.perf_counter() - start)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in (second_dht, first_dht):
            shutdown_dht(dht)
    return timings


def copy_seconds(megabytes: int, repeats: int = 10) -> float:
    source = torch.ones(megabytes * 2 ** 20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default="1,2,3", help="comma-separated swarm sizes")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--target-batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="epochs left out of the measurement")
    parser.add_argument("--matchmaking-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each trainer and of the local loop")
    parser.add_argument("--allreduce-mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(n) for n in args.trainers.split(",") if n.strip()]
    env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()))
    print(f"{os.cpu_count()} CPUs | tiny llama, {args.num_layers} layers, seq {args.seq_len}, batch {args.batch_size}, "
          f"target batch {args.target_batch_size}, {args.epochs} epochs ({args.warmup_epochs} warm-up), "
          f"{args.threads} thread(s) per trainer", flush=True)

    torch.set_num_threads(args.threads)
    local = local_samples_per_second(args)
    print(f"local loop (no swarm): {local:.1f} samples/s", flush=True)
    swarm = {}
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-train-") as log_dir:
        for n in sizes:
            swarm[n] = swarm_samples_per_second(n, args, env, Path(log_dir))
            print(f"{n} trainer(s): {swarm[n]:.1f} samples/s swarm-wide", flush=True)

    torch.set_num_threads(1)
    allreduce = allreduce_seconds(args.allreduce_mb, args.repeats)
    copy = copy_seconds(args.allreduce_mb)

    print(f"\n{'trainers':<10}{'samples/s':>11}{'vs 1 trainer':>14}{'vs local loop':>15}")
    for n in sizes:
        base = swarm.get(1)
        print(f"{n:<10}{swarm[n]:>11.1f}{(swarm[n] / base if base else float('nan')):>14.2f}{swarm[n] / local:>15.2f}")
    median = statistics.median(allreduce)
    print(f"\nall-reduce of {args.allreduce_mb} MB, 2 peers on loopback: median {median * 1000:.0f} ms "
          f"({args.allreduce_mb / median:.0f} MB/s; runs {', '.join(f'{t * 1000:.0f}' for t in allreduce)} ms)")
    print(f"torch copy of {args.allreduce_mb} MB: {copy * 1000:.1f} ms ({args.allreduce_mb / copy:.0f} MB/s)")
    print(f"all-reduce speed as a fraction of a local copy: {copy / median:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
