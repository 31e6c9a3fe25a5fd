"""Prompt tuning through a swarm of frozen peers: a small sentiment task learned by a trainable prefix.

Only the client's prefix trains (shallow: virtual input tokens; with --deep also one trainable vector per
block and prefix position, sent to the peers with each request, whose gradients come back). The peers'
blocks and the client's embeddings and LM head stay frozen. The task: after "Sentiment:", say
" positive" or " negative" for a short review; the loss is measured on that answer token only.

    swarmlm dht                                                          # prints MADDR, then READY
    swarmlm peer --model swarmlm-tiny-llama --blocks 0:4 --initial-peers MADDR
    swarmlm peer --model swarmlm-tiny-llama --blocks 4:8 --initial-peers MADDR
    python examples/prompt_tuning.py --initial-peers MADDR --steps 30 [--deep]

Prints the loss and accuracy on the training reviews before, every --log-every steps, and after.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from swarmlm import AutoDistributedModelForCausalLM
from swarmlm.models.checkpoint import resolve_model
from swarmlm.models.embedded import DEFAULT_MODEL

REVIEWS = [
    ("A wonderful film, I loved every minute.", "positive"),
    ("The plot was dull and the acting was worse.", "negative"),
    ("Brilliant, funny and moving.", "positive"),
    ("I want those two hours of my life back.", "negative"),
    ("A delight from start to finish.", "positive"),
    ("Boring, predictable and far too long.", "negative"),
    ("The best thing I have seen this year.", "positive"),
    ("A mess of a movie with no redeeming parts.", "negative"),
]
LABELS = ("positive", "negative")


def encode(tokenizer) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Left-padded prompts "Review: ... Sentiment:", and the token ids of each answer and of both labels."""
    prompts = [f"Review: {text} Sentiment:" for text, _ in REVIEWS]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    label_ids = torch.tensor([tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS])
    answers = torch.stack([label_ids[LABELS.index(label)] for _, label in REVIEWS])
    return batch, answers, label_ids


def answer_loss(model, batch: dict, answers: torch.Tensor, label_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(cross-entropy of the answer token after each prompt, accuracy of picking the right label)."""
    logits = model(**batch).logits[:, -1]  # [reviews, vocab]: the next token after "Sentiment:"
    loss = torch.nn.functional.cross_entropy(logits, answers)
    picked = label_ids[logits[:, label_ids].argmax(-1)]
    return loss, (picked == answers).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model the peers serve")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any swarm members")
    parser.add_argument("--num-tokens", type=int, default=8, help="length of the trainable prefix")
    parser.add_argument("--deep", action="store_true", help="also train a vector per block (deep prompt tuning)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (each: the whole training set)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate of the prefix")
    parser.add_argument("--log-every", type=int, default=5, help="print the loss every N steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    batch, answers, label_ids = encode(tokenizer)
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers)
    try:
        model.requires_grad_(False)
        prefix = model.enable_prompt_tuning(args.num_tokens, deep=args.deep)  # the only trainable parameters
        optimizer = torch.optim.Adam(prefix.parameters(), lr=args.lr)
        with torch.no_grad():
            loss, accuracy = answer_loss(model, batch, answers, label_ids)
        print(f"before loss {loss.item():.4f} accuracy {accuracy:.2f}", flush=True)
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            loss, accuracy = answer_loss(model, batch, answers, label_ids)
            loss.backward()  # through the peers' frozen blocks back to the prefix
            optimizer.step()
            if step % args.log_every == 0:
                print(f"step {step} loss {loss.item():.4f} accuracy {accuracy:.2f}", flush=True)
        with torch.no_grad():
            loss, accuracy = answer_loss(model, batch, answers, label_ids)
        print(f"after loss {loss.item():.4f} accuracy {accuracy:.2f}", flush=True)
    finally:
        model.close()


if __name__ == "__main__":
    main()
