"""What a peer needs of a trainer of its blocks (swarmlm.training.span_trainer.SpanTrainer implements it).

The peer does not import training: a training peer is built on top (swarmlm.training.peer), and hands the
peer an object with this shape.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Optional, Protocol

import torch

from swarmlm.experts.span import BlockSpan


class BlockTrainer(Protocol):
    span: BlockSpan  # the span it trains (a request on another span, after a move, trains nothing)
    parameters: list[torch.Tensor]  # the span's parameters, in the order `accumulate` takes their gradients

    @property
    def epoch(self) -> int:
        """The training epoch of the span's weights (shown in the peer's info answer)."""

    def accumulate(self, grads: list[Optional[torch.Tensor]], batch_size: int) -> None:
        """Adds one micro-batch's parameter gradients (None for blocks outside the request), on the compute thread."""

    def start(self, executor: Executor) -> None:
        """Begins averaging; optimizer steps run on `executor` (the peer's compute thread)."""

    def shutdown(self, executor: Optional[Executor]) -> None:
        """Leaves the run (its last work on `executor`, if given)."""
