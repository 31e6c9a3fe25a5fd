"""Loading a peer's blocks from its checkpoint: only their tensors are read, each hashed as stored on the way."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from swarmlm.experts.families import ModelFamily
from swarmlm.experts.span import BlockSpan
from swarmlm.models.checkpoint import load_tensors
from swarmlm.models.fingerprint import BlockDigests

logger = logging.getLogger(__name__)


def load_span(checkpoint: Path, family: ModelFamily, model_config, start: int, end: int, dtype: torch.dtype,
              device: torch.device, reuse: Optional[BlockSpan] = None) -> tuple[BlockSpan, dict[int, bytes]]:
    """(blocks [start, end) with their weights, in eval mode without gradients; the digests of the blocks read,
    swarmlm.models.fingerprint). Blocks that `reuse` holds are taken from it, not reloaded (nor hashed again).
    ValueError if the checkpoint does not match the model."""
    kept = range(max(start, reuse.start), min(end, reuse.end)) if reuse is not None else range(0)
    logger.info(f"Loading blocks {start}:{end} ({family.name}) from {checkpoint}"
                + (f", keeping {kept.start}:{kept.stop}" if kept else ""))

    def tensor_name(name: str) -> Optional[str]:
        renamed = family.block_tensor_name(name, start, end)
        return None if renamed is None or start + int(renamed.split(".")[1]) in kept else renamed

    span = BlockSpan(family, model_config, start, end)
    digests = BlockDigests(start)
    tensors = load_tensors(checkpoint, tensor_name, dtype, on_read=digests)
    missing, unexpected = span.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.startswith("rotary_emb.")
               and not (m.startswith("layers.") and start + int(m.split(".")[1]) in kept)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for block in kept:
        layer = reuse.layers[block - reuse.start]
        layer.self_attn.layer_idx = block - start  # its index in the new span's KV cache
        span.layers[block - start] = layer
    return span.to(device=device, dtype=dtype).eval().requires_grad_(False), digests.blocks()
