"""One small adapter per model family, registered in one place (`FAMILIES`).

An adapter names the family's own transformers classes (decoder layer, rotary embedding) and how
its checkpoints lay out tensors. Attention, rotary embeddings and masks are transformers' own code;
nothing here re-implements them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarmlm.errors import UnsupportedModelError

MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_type: str  # HF config.model_type
    modeling_module: str  # transformers module with the classes below
    layer_class: str  # decoder layer class name
    rotary_class: str  # rotary embedding class name
    block_prefix: str = "model.layers."  # checkpoint tensor names of block i start with f"{block_prefix}{i}."
    client_prefixes: tuple[str, ...] = ("model.embed_tokens.", "model.norm.", "lm_head.")

    def _class(self, name: str):
        import importlib

        return getattr(importlib.import_module(self.modeling_module), name)

    def layer_types(self, config: PretrainedConfig) -> list[str]:
        """Attention kind of each layer: "full_attention" or "sliding_attention"."""
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        return [kind] * config.num_hidden_layers

    def span_config(self, config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
        """A copy of `config` describing only blocks [start, end) (re-indexed from 0)."""
        span = copy.deepcopy(config)
        layer_types = self.layer_types(config)[start:end]
        span.num_hidden_layers = end - start
        if getattr(config, "layer_types", None):
            span.layer_types = layer_types
        if getattr(span, "_attn_implementation", None) is None:
            span._attn_implementation = "sdpa"
        return span

    def make_layers(self, span_config: PretrainedConfig):
        layer_class = self._class(self.layer_class)
        return [layer_class(span_config, layer_idx=i) for i in range(span_config.num_hidden_layers)]

    def make_rotary(self, span_config: PretrainedConfig):
        return self._class(self.rotary_class)(config=span_config)

    def block_tensor_name(self, name: str, start: int, end: int) -> str | None:
        """Maps a checkpoint tensor name of block i in [start, end) to "layers.{i - start}.<rest>"."""
        if not name.startswith(self.block_prefix):
            return None
        index, _, rest = name[len(self.block_prefix) :].partition(".")
        if not index.isdigit() or not start <= int(index) < end:
            return None
        return f"layers.{int(index) - start}.{rest}"

    def client_tensor_name(self, name: str) -> str | None:
        return name if name.startswith(self.client_prefixes) else None


FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in [
        ModelFamily("Llama", "llama", "transformers.models.llama.modeling_llama", "LlamaDecoderLayer",
                    "LlamaRotaryEmbedding"),
        ModelFamily("Qwen2", "qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer",
                    "Qwen2RotaryEmbedding"),
        ModelFamily("Mistral", "mistral", "transformers.models.mistral.modeling_mistral", "MistralDecoderLayer",
                    "MistralRotaryEmbedding"),
    ]
}


def family_for_config(config: PretrainedConfig) -> ModelFamily:
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} is not supported yet; supported: {sorted(FAMILIES)}"
        ) from None
