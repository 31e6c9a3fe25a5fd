"""The model a trainer starts from (`--model`), its tokenizer, and a hash of its parameters.

  embedded name (swarmlm-tiny-llama)  a fresh model of that config, weights from torch.manual_seed(seed)
  path/to/config.json                  a fresh model of that config (same seeding)
  checkpoint directory / HF repo id    continues from its weights

The tokenizer comes from the checkpoint (or the config's directory); without one, the embedded default
model's tokenizer (trained offline on Python's help text, identical on every machine) is used.
Every trainer of a run must build the same model: same --model, --seed and --num-layers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from swarmlm.errors import ModelNotFoundError
from swarmlm.models.checkpoint import resolve_model
from swarmlm.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, ensure_embedded_model

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class StartingModel:
    model: PreTrainedModel  # float32, in train mode
    tokenizer: object  # a transformers tokenizer with an EOS token
    fresh: bool  # True: newly initialized weights; False: loaded from a checkpoint


def build_model(name_or_path: str, seed: int = 0, num_layers: Optional[int] = None) -> StartingModel:
    """Builds the starting model for `--model` (see the module docstring)."""
    if name_or_path in EMBEDDED_MODELS:
        directory = ensure_embedded_model(name_or_path)  # its config and tokenizer (weights are not used)
        return _fresh(AutoConfig.from_pretrained(directory), _tokenizer(directory), seed, num_layers)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _fresh(AutoConfig.from_pretrained(path), _tokenizer(path.parent), seed, num_layers)
    resolved = resolve_model(name_or_path)
    if not any(resolved.path.glob("*.safetensors")):
        return _fresh(AutoConfig.from_pretrained(resolved.path), _tokenizer(resolved.path), seed, num_layers)
    if num_layers is not None:
        raise ValueError("--num-layers applies only to fresh models (an embedded name or a config.json), "
                         f"not to the checkpoint {resolved.path}")
    tokenizer = _tokenizer(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32)
    return StartingModel(_checked(model, tokenizer), tokenizer, fresh=False)


def _fresh(config, tokenizer, seed: int, num_layers: Optional[int]) -> StartingModel:
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:num_layers]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is None:
            setattr(config, name, getattr(tokenizer, name))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return StartingModel(_checked(model, tokenizer), tokenizer, fresh=True)


def _tokenizer(directory: Path):
    if not any((directory / name).exists() for name in _TOKENIZER_FILES):
        logger.info(f"No tokenizer in {directory}; using the offline-trained tokenizer of {DEFAULT_MODEL}")
        directory = ensure_embedded_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.eos_token_id is None:
        raise ModelNotFoundError(f"the tokenizer in {directory} has no EOS token (needed to join documents)")
    return tokenizer


def _checked(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; use a config with vocab_size >= {len(tokenizer)}")
    return model.train()


def parameter_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes: equal hashes = identical parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
