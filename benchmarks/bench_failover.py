"""What a dying peer costs: generation with a replica killed mid-run, and the swarm re-covering a gap.

1. Failover. A DHT node and three peers on 127.0.0.1 (blocks 0:4, and 4:8 twice). Greedy
   generation of `--new-tokens` tokens through the swarm, timed per token, once undisturbed and
   once with the peer serving blocks 4:8 SIGKILLed halfway (no goodbye). Prints tokens/s of both
   runs and of the local model, the stall (the slowest step of the failed run minus the median
   step), and whether the tokens match the local model.
2. Re-covering. Three peers with `--num-blocks 4` (balance check every `--balance-period` s,
   announcements every `--update-period` s); the peer that alone serves some blocks is killed.
   Prints the seconds until the survivors cover every block again (the dead peer's record
   expires after 2 update periods, then a balance check moves a peer).

Run:
    python benchmarks/bench_failover.py [--model tiny] [--new-tokens 64] [--update-period 2] [--balance-period 2]
                                        [--cover-timeout 120]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from bench_generation import MODELS, PROMPT_TOKENS, model_dir
from nodes import Node
from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.dht.records import ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.models.embedded import swarmlm_home


class StepClock(LogitsProcessor):
    """Records the time of every generation step; optionally runs `action` once at step `at`."""

    def __init__(self, at: int | None = None, action=None):
        self.times, self.at, self.action = [time.perf_counter()], at, action

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.at is not None and len(self.times) - 2 == self.at:
            self.action()
        return scores

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def generate_timed(model, ids, new_tokens: int, clock: StepClock, session=None):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  logits_processor=LogitsProcessorList([clock]))
    if session is not None:
        kwargs["session"] = session
    start = time.perf_counter()
    output = model.generate(ids, **kwargs)
    return output, new_tokens / (time.perf_counter() - start)


def peer_args(path: Path, maddrs: list[str], *extra: str) -> list[str]:
    return ["peer", "--model", str(path), "--initial-peers", *maddrs, "--num-threads", "1", *extra]


def bench_failover(path: Path, args, env: dict, log_dir: Path) -> None:
    ids = torch.randint(3, 2048, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        local.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        expected, local_tps = generate_timed(local, ids, args.new_tokens, StepClock())

    nodes, client = [], None
    try:
        dht = Node(["dht"], log_dir / "dht.log", env)
        nodes.append(dht)
        maddrs = dht.wait_ready().maddrs
        peers = {}
        for i, span in enumerate(["0:4", "4:8", "4:8"]):
            node = Node(peer_args(path, maddrs, "--blocks", span, "--update-period", "5"), log_dir / f"peer{i}.log", env)
            nodes.append(node)
            peers[node] = span
        peer_ids = {node.wait_ready().maddrs[0].rsplit("/p2p/", 1)[1]: node for node in peers}
        client = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=maddrs)
        client.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up (routes, RTT probes)

        clean, clean_tps = generate_timed(client, ids, args.new_tokens, clean_clock := StepClock())
        with client.inference_session(max_length=PROMPT_TOKENS + args.new_tokens) as session:
            def kill_second_hop():
                victim = next(h.peer_id for h in session.route if h.start <= 4 < h.end)
                peer_ids[victim].proc.send_signal(signal.SIGKILL)
                peer_ids[victim].proc.wait()

            failed_clock = StepClock(at=args.new_tokens // 2, action=kill_second_hop)
            failed, failed_tps = generate_timed(client, ids, args.new_tokens, failed_clock, session=session)
            failovers = session.failovers
        steps = failed_clock.step_times()[1:]  # decoding steps (the first entry is the prefill)
        median = statistics.median(clean_clock.step_times()[1:])
        print(f"[failover] local {local_tps:.1f} tok/s | swarm {clean_tps:.1f} tok/s | swarm with a peer killed "
              f"at token {args.new_tokens // 2}: {failed_tps:.1f} tok/s ({failovers} failover)")
        print(f"[failover] stall: {1000 * (max(steps) - median):.1f} ms (slowest step {1000 * max(steps):.1f} ms, "
              f"median step {1000 * median:.2f} ms) | tokens match local: clean "
              f"{'yes' if torch.equal(clean, expected) else 'NO'}, with failure {'yes' if torch.equal(failed, expected) else 'NO'}")
    finally:
        if client is not None:
            client.close()
        for node in reversed(nodes):
            node.terminate()


def covered(dht, model: str, num_blocks: int, alive: set[str]) -> bool:
    records = fetch_block_records(dht, model, num_blocks)
    return all(any(r.state == ServerState.ONLINE and r.peer_id in alive for r in block) for block in records)


def wait_covered(dht, model: str, num_blocks: int, alive: set[str], timeout: float, what: str) -> None:
    """Polls the DHT until the `alive` peers cover every block; raises TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not covered(dht, model, num_blocks, alive):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the peers did not cover all {num_blocks} blocks within {timeout:.0f} s "
                               f"(see the peer logs; a slower machine may need a larger --cover-timeout)")
        time.sleep(0.1)


def bench_recover(path: Path, args, env: dict, log_dir: Path) -> None:
    nodes, client = [], None
    try:
        dht = Node(["dht"], log_dir / "dht2.log", env)
        nodes.append(dht)
        maddrs = dht.wait_ready().maddrs
        extra = ("--num-blocks", "4", "--update-period", str(args.update_period), "--balance-period",
                 str(args.balance_period), "--throughput", "1000")
        peers = {}
        for i in range(3):  # one after another, so each sees where the previous ones went
            node = Node(peer_args(path, maddrs, *extra), log_dir / f"movable{i}.log", env)
            nodes.append(node)
            peers[node.wait_ready().maddrs[0].rsplit("/p2p/", 1)[1]] = node
        client = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=maddrs)
        dht_view = client.remote.dht
        wait_covered(dht_view, client.remote.model, 8, set(peers), args.cover_timeout, "3 movable peers")
        records = fetch_block_records(dht_view, client.remote.model, 8)
        sole = next(r.peer_id for block in records for r in block
                    if [x.state for x in block].count(ServerState.ONLINE) == 1 and r.state == ServerState.ONLINE)
        killed_at = time.perf_counter()
        peers[sole].proc.send_signal(signal.SIGKILL)
        alive = set(peers) - {sole}
        wait_covered(dht_view, client.remote.model, 8, alive, args.cover_timeout, "after the kill")
        print(f"[re-cover] a gap left by a killed peer closed in {time.perf_counter() - killed_at:.1f} s "
              f"(update period {args.update_period} s: its record lives {2 * args.update_period:.0f} s; "
              f"balance period {args.balance_period} s)")
    finally:
        if client is not None:
            client.close()
        for node in reversed(nodes):
            node.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--update-period", type=float, default=2.0)
    parser.add_argument("--balance-period", type=float, default=2.0)
    parser.add_argument("--cover-timeout", type=float, default=120.0,
                        help="seconds to wait for the movable peers to cover every block before giving up")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    env = dict(os.environ, SWARMLM_HOME=str(swarmlm_home()))
    path = model_dir(args.model)
    with tempfile.TemporaryDirectory(prefix="swarmlm-bench-") as log_dir:
        bench_failover(path, args, env, Path(log_dir))
        bench_recover(path, args, env, Path(log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
