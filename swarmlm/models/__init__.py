"""Model files: the embedded default model, name resolution and selective weight loading."""

from swarmlm.models.checkpoint import load_tensors, resolve_model, ResolvedModel
from swarmlm.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, create_model_dir, ensure_embedded_model

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ResolvedModel",
    "create_model_dir",
    "ensure_embedded_model",
    "load_tensors",
    "resolve_model",
]
