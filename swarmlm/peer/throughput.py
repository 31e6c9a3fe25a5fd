"""Measuring how fast this peer runs its blocks, for the throughput it announces."""

from __future__ import annotations

import time

import torch

from swarmlm.experts.span import BlockSpan


def measure_throughput(span: BlockSpan, device: torch.device, dtype: torch.dtype, steps: int = 8) -> float:
    """Tokens/s of one block in single-token inference steps (the latency-bound case)."""
    hidden = torch.randn(1, 1, span.config.hidden_size, device=device, dtype=dtype)
    cache = span.new_cache()
    with torch.inference_mode():
        for i in range(2):  # warm-up
            span(hidden, torch.tensor([[i]], device=device), cache=cache)
        start = time.perf_counter()
        for i in range(2, 2 + steps):
            span(hidden, torch.tensor([[i]], device=device), cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return steps * span.num_blocks / max(elapsed, 1e-9)
