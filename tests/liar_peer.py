"""A hostile stranger's peer: the real `swarmlm peer`, whose block outputs are replaced by well-shaped lies.

    python tests/liar_peer.py MODE PEER-ARGS...

MODE: identity (returns its input), noise (random numbers of the output's scale), offset (5% too large),
late:K (honest for its first K answers, then offset), fraction:F (offset in a fraction F of answers, seeded),
nan (NaN everywhere), slow:S (honest numbers, but each answer takes S seconds more: a lie about speed, told with
--throughput). Both inference steps and stateless forward calls lie the same way.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from swarmlm.peer import compute


def make_lie(mode: str):
    kind, _, arg = mode.partition(":")
    answers, coin = [0], random.Random(0)

    def lie(inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        answers[0] += 1
        if kind == "identity":
            return inputs.float().clone()
        if kind == "noise":
            return torch.randn_like(output) * output.std()
        if kind == "slow":
            time.sleep(float(arg))
            return output
        if kind == "nan":
            return torch.full_like(output, float("nan"))
        if kind == "late" and answers[0] <= int(arg):
            return output
        if kind == "fraction" and coin.random() >= float(arg):
            return output
        if kind in ("offset", "late", "fraction"):
            return output * 1.05
        raise SystemExit(f"unknown lie {mode!r}")

    return lie


def main() -> int:
    lie = make_lie(sys.argv[1])
    honest_step, honest_forward = compute.BlockCompute._step, compute.BlockCompute.forward

    def step(self, session, position, hidden, *args, **kwargs):
        return lie(hidden, honest_step(self, session, position, hidden, *args, **kwargs))

    def forward(self, span, hidden, *args, **kwargs):
        return lie(hidden, honest_forward(self, span, hidden, *args, **kwargs))

    compute.BlockCompute._step, compute.BlockCompute.forward = step, forward
    from swarmlm.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
