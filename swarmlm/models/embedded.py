"""Small models that swarmlm creates on any machine without network access.

The default model (`swarmlm-tiny-llama`) serves the demo and the tests: a Llama-architecture
model with deterministic weights (fixed seed) and a tokenizer trained offline. It is written as
a normal HF checkpoint directory (config.json, sharded safetensors + index, tokenizer files), so
everything that loads it also loads real checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swarmlm.models.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "swarmlm-tiny-llama"


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # HF config.model_type: "llama", "qwen2", "mistral"
    config: dict = field(default_factory=dict)  # HF config fields (sizes)
    tokenizer_vocab: int = 2048  # BPE vocabulary trained offline; config.vocab_size may be larger
    seed: int = 0  # weights are torch.manual_seed(seed) + the HF initializer


_TINY = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=2048,
    initializer_range=0.05,
    tie_word_embeddings=False,
)

EMBEDDED_MODELS: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec("llama", _TINY),
    "swarmlm-tiny-qwen2": ModelSpec("qwen2", _TINY),
    "swarmlm-tiny-mistral": ModelSpec("mistral", dict(_TINY, sliding_window=None)),
}


def swarmlm_home() -> Path:
    """Where swarmlm keeps files it creates (override with $SWARMLM_HOME)."""
    return Path(os.environ.get("SWARMLM_HOME", Path.home() / ".cache" / "swarmlm"))


def create_model_dir(path: Path | str, spec: ModelSpec, max_shard_size: str = "2MB") -> Path:
    """Writes a checkpoint directory for `spec` at `path` atomically (a temp dir renamed into place).

    Concurrent callers (several peers starting at once) are safe: the first rename wins, the
    others discard their copy. Returns the final path.
    """
    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tokenizer = train_tokenizer(spec.tokenizer_vocab)
        fields = dict(spec.config)
        fields.setdefault("bos_token_id", tokenizer.bos_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(spec.model_type, **fields)
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_embedded_model(name: str = DEFAULT_MODEL) -> Path:
    """Returns the directory of an embedded model, creating it on first use (a few seconds)."""
    spec = EMBEDDED_MODELS[name]
    path = swarmlm_home() / "models" / name
    if not (path / "config.json").exists():
        logger.info(f"Creating the embedded model {name} at {path} (one time, no download)")
        create_model_dir(path, spec)
    return path
