"""A trainer client for peers started with `swarmlm peer --train` (training the hosted blocks).

It sends micro-batches forward and backward through the swarm; every training peer on the route
accumulates the gradients of its blocks, and the peers that host the same blocks average them and step
together. A local swarm on the embedded model (each command in its own terminal):

    swarmlm dht                                                      # prints MADDR, then READY
    swarmlm peer --model swarmlm-tiny-llama --blocks 0:4 --train --lr 1e-3 --target-batch-size 32 --initial-peers MADDR
    swarmlm peer --model swarmlm-tiny-llama --blocks 0:4 --train --lr 1e-3 --target-batch-size 32 --initial-peers MADDR
    swarmlm peer --model swarmlm-tiny-llama --blocks 4:8 --train --lr 1e-3 --target-batch-size 32 --initial-peers MADDR
    python examples/train_hosted_blocks.py --initial-peers MADDR --steps 200
    swarmlm export --model swarmlm-tiny-llama --initial-peers MADDR --out trained   # then: swarmlm peer --model trained

The client's own tensors (embeddings, final norm, LM head) stay frozen: several trainers share the blocks,
and `swarmlm export` takes those tensors from the original checkpoint. So that backward still reaches the
peers, the chain's input (the embeddings' output) is made to require grad.
"""

from __future__ import annotations

import argparse

import torch
from pydoc_data.topics import topics
from transformers import AutoTokenizer

from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.models.checkpoint import resolve_model
from swarmlm.models.embedded import DEFAULT_MODEL


def help_text_samples(tokenizer, seq_len: int) -> torch.Tensor:
    """Python's help topics (present on every machine), tokenized and cut into [n, seq_len] samples."""
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    count = len(ids) // seq_len
    return ids[:count * seq_len].view(count, seq_len)


def train_step(model, batch: torch.Tensor) -> float:
    """One micro-batch [batch, seq] forward and backward through the swarm; returns its loss."""
    embeds = model.get_input_embeddings()(batch).requires_grad_(True)  # [batch, seq, hidden]: backward starts here
    loss = model(inputs_embeds=embeds, labels=batch).loss
    loss.backward()  # each peer on the route accumulates the gradients of its blocks
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the training peers serve")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    parser.add_argument("--steps", type=int, default=200, help="micro-batches to send")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per micro-batch")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample")
    parser.add_argument("--seed", type=int, default=0, help="the order of the samples")
    parser.add_argument("--log-every", type=int, default=10, help="print the mean loss every N micro-batches")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds to wait for one forward/backward call: a call that arrives while the peers "
                             "average waits for it (up to twice their --averaging-timeout); a peer counts a "
                             "micro-batch only if it answers within this time")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    samples = help_text_samples(tokenizer, args.seq_len)
    order = torch.Generator().manual_seed(args.seed)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers,
                                                            request_timeout=args.request_timeout)
    model.requires_grad_(False)  # only the peers' blocks train
    try:
        losses = []
        for step in range(1, args.steps + 1):
            batch = samples[torch.randint(len(samples), (args.batch_size,), generator=order)]
            losses.append(train_step(model, batch))
            if step % args.log_every == 0:
                recent = losses[-args.log_every:]
                print(f"step {step} loss {sum(recent) / len(recent):.4f}", flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
