"""Finding a model's files (embedded name, local directory, HF cache) and reading selected tensors.

A peer reads only the tensors of the blocks it hosts: safetensors files are memory-mapped and
opened tensor by tensor, and with a sharded checkpoint only the shards that hold them are opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from swarmlm.errors import ModelNotFoundError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # directory with config.json and *.safetensors
    name: str  # the name peers and clients agree on (DHT prefix)


def resolve_model(name_or_path: str | os.PathLike) -> ResolvedModel:
    """Resolves an embedded model name, a local directory or a Hugging Face repo id in the local cache.

    Never downloads when the files are already present; tries a download only for a repo id that
    is not in the cache (and fails with an actionable message when offline).
    """
    from swarmlm.models.embedded import EMBEDDED_MODELS, ensure_embedded_model

    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return ResolvedModel(ensure_embedded_model(name), name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not a model checkpoint")
        return ResolvedModel(path.resolve(), path.resolve().name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel(_from_hf_hub(name), name)
    raise ModelNotFoundError(
        f"model {name!r} not found: give a checkpoint directory, a Hugging Face repo id, "
        f"or one of the embedded models {sorted(EMBEDDED_MODELS)}"
    )


def _from_hf_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded ({e}); "
            f"download it where there is network (huggingface-cli download {repo_id}) or pass a local directory"
        ) from e


def tensor_files(path: Path) -> dict[str, str]:
    """Maps every tensor name of a checkpoint to the safetensors file that holds it."""
    if (path / SAFE_INDEX).exists():
        return dict(json.loads((path / SAFE_INDEX).read_text())["weight_map"])
    if (path / SAFE_SINGLE).exists():
        with safe_open(path / SAFE_SINGLE, framework="pt") as f:
            return {name: SAFE_SINGLE for name in f.keys()}
    raise ModelNotFoundError(f"no safetensors weights in {path} (expected {SAFE_SINGLE} or {SAFE_INDEX})")


def load_tensors(
    path: Path, rename: Callable[[str], str | None], dtype: torch.dtype | None = None,
    on_read: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Loads the tensors for which `rename(name)` returns a new name (others are never read); `on_read(new name,
    tensor)` sees each one as stored, before the cast to `dtype` (swarmlm.models.fingerprint hashes them there)."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, filename in tensor_files(path).items():
        new_name = rename(name)
        if new_name is not None:
            by_file.setdefault(filename, []).append((name, new_name))
    tensors = {}
    for filename, names in by_file.items():
        with safe_open(path / filename, framework="pt") as f:
            for name, new_name in names:
                tensor = f.get_tensor(name)
                if on_read is not None:
                    on_read(new_name, tensor)
                tensors[new_name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors
