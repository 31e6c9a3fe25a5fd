"""What identifies a model beyond its name: a hash of its config, and hashes of its blocks' weights.

A peer announces with each span record `config_hash(config)` and `weights_hash(config hash, its blocks' digests)`;
a client compares them with what its own copy gives (swarmlm.client.weights_check) and routes around a peer that
serves another config, or other weights, under the same name. A block's digest covers the tensors the checkpoint
stores for it (names within the block, dtype, shape and bytes as stored, before any cast), so peers that compute in
other dtypes from one checkpoint agree; a copy of the weights stored in another dtype counts as other weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping

import torch

CONFIG_HASH_HEX, WEIGHTS_HASH_HEX = 16, 32
# config entries that describe a copy or a runtime choice, not the model
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                                 "_attn_implementation_autoset", "_attn_implementation", "use_cache",
                                 "architectures", "output_attentions", "output_hidden_states", "return_dict"})


def config_hash(config) -> str:
    """A hex hash of a transformers config's model-defining entries."""
    entries = {k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    text = json.dumps(entries, sort_keys=True, default=str)
    return hashlib.sha256(b"swarmlm-config\0" + text.encode()).hexdigest()[:CONFIG_HASH_HEX]


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """sha256 over a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.digest()


class BlockDigests:
    """Collects the digests of tensors as they are read (swarmlm.models.checkpoint.load_tensors' `on_read`), named
    as in a BlockSpan ("layers.I.<name>", I relative to `start`), and gives each block's digest."""

    def __init__(self, start: int):
        self.start = start
        self._tensors: dict[int, dict[str, bytes]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
            self._tensors.setdefault(self.start + int(parts[1]), {})[parts[2]] = tensor_digest(tensor)

    def blocks(self) -> dict[int, bytes]:
        """Block index -> its digest (over its tensors' digests, by name)."""
        result = {}
        for block, tensors in self._tensors.items():
            digest = hashlib.sha256(b"swarmlm-block\0")
            for name in sorted(tensors):
                digest.update(name.encode() + b"\0" + tensors[name])
            result[block] = digest.digest()
        return result


def weights_hash(config_hex: str, block_digests: Iterable[bytes]) -> str:
    """The hash a span record carries: over the config hash and its blocks' digests, in block order."""
    digest = hashlib.sha256(b"swarmlm-weights\0" + config_hex.encode())
    for block in block_digests:
        digest.update(block)
    return digest.hexdigest()[:WEIGHTS_HASH_HEX]


def span_weights_hash(config_hex: str, digests: Mapping[int, bytes], start: int, end: int) -> str | None:
    """weights_hash of blocks [start, end), or None when a digest is missing."""
    if any(block not in digests for block in range(start, end)):
        return None
    return weights_hash(config_hex, (digests[block] for block in range(start, end)))
