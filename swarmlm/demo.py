"""`swarmlm demo`: a whole local swarm on the embedded model, no downloads.

Starts a bootstrap DHT node and N peers as separate processes on 127.0.0.1 (each hosting part of
the blocks), generates through them with the Python client, prints the text, the route (peer -> blocks) and
tokens/s, checks the text against the local transformers model with the same weights, and shuts
everything down. Exits 1 if the route does not cover every block or the text differs.
"""

from __future__ import annotations

import sys
import time

import torch

from swarmlm.local_swarm import NodeProcess, start_dht, start_peer, stop_all


def _spans(num_blocks: int, num_peers: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / num_peers) for i in range(num_peers + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def run_demo(num_peers: int = 2, max_new_tokens: int = 32, prompt: str = "", model: str = "") -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from swarmlm.client.model import AutoDistributedModelForCausalLM
    from swarmlm.models.checkpoint import resolve_model

    hf_logging.disable_progress_bar()  # the demo prints its own progress
    resolved = resolve_model(model)  # creates the embedded model on first use
    num_blocks = AutoConfig.from_pretrained(resolved.path).num_hidden_layers
    processes: list[NodeProcess] = []
    try:
        print(f"Starting a local swarm for {resolved.name} ({num_blocks} blocks) ...", flush=True)
        dht = start_dht(log_level="error")
        processes.append(dht)
        maddrs = dht.wait_ready().maddrs
        print(f"  bootstrap node  {maddrs[0]}", flush=True)
        for start, end in _spans(num_blocks, num_peers):
            peer = start_peer(model, maddrs[0], "--blocks", f"{start}:{end}", log_level="error")
            processes.append(peer)
            print(f"  peer  blocks {start}:{end}  {peer.wait_ready().maddrs[0]}", flush=True)

        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        client = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=maddrs)
        try:
            inputs = tokenizer(prompt, return_tensors="pt")
            with client.inference_session(max_length=inputs["input_ids"].shape[1] + max_new_tokens) as session:
                started = time.perf_counter()
                outputs = client.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                          do_sample=False, session=session)
                elapsed = time.perf_counter() - started
                route = list(zip(session.describe_route(), session.transports))
        finally:
            client.close()
        new_tokens = outputs.shape[1] - inputs["input_ids"].shape[1]
        print("\nRoute:", flush=True)
        for (peer_id, start, end), transport in route:
            print(f"  {peer_id} -> blocks {start}:{end}  ({transport})")
        print(f"\nPrompt: {prompt}")
        print(f"Generated: {tokenizer.decode(outputs[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
        print(f"\n{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s "
              f"(the embedded model has random weights: the text is not meaningful)")
        return _check_against_local(AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32),
                                    inputs, outputs, route, num_blocks, max_new_tokens)
    finally:
        stop_all(processes)
        print("Swarm stopped.", flush=True)


def _check_against_local(local_model, inputs, outputs, route, num_blocks: int, max_new_tokens: int) -> int:
    """0 if the route covered blocks [0, num_blocks) in order and the swarm's tokens equal the local model's greedy
    tokens; otherwise prints what is wrong and returns 1."""
    covered = 0
    for (_, start, end), _ in route:
        if start != covered:
            break
        covered = end
    if covered != num_blocks:
        print(f"\nCheck FAILED: the session's route covers blocks 0:{covered}, not 0:{num_blocks}", flush=True)
        return 1
    with torch.inference_mode():
        expected = local_model.eval().generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                               do_sample=False)
    if expected.tolist() != outputs.tolist():
        print("\nCheck FAILED: the swarm's tokens differ from the local model's with the same weights", flush=True)
        return 1
    print("Check: identical to the local transformers model with the same weights", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(run_demo())
