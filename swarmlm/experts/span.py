"""BlockSpan: blocks [start, end) of a decoder-only model, run with transformers' own layers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from swarmlm.experts.cache import SpanCache

from swarmlm.experts.families import MASK_FUNCTIONS, ModelFamily
from swarmlm.experts.hf_compat import cache_kwarg
from swarmlm.models.checkpoint import load_tensors


class BlockSpan(nn.Module):
    """A contiguous span of decoder layers with the model's rotary embedding.

    forward() is the same computation as the local model's layer loop: masks come from
    transformers.masking_utils, positions from the caller, the KV cache is a DynamicCache
    covering the span's layers (indexed from 0).
    """

    def __init__(self, family: ModelFamily, config: PretrainedConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"invalid block span {start}:{end} for a model of {config.num_hidden_layers} blocks")
        self.family, self.start, self.end = family, start, end
        self.config = family.span_config(config, start, end)
        self.layer_types = family.layer_types(config)[start:end]
        self.layers = nn.ModuleList(family.make_layers(self.config))
        self.rotary_emb = family.make_rotary(self.config)
        # how this transformers release spells the cache argument of the layers and of each mask function
        self._layer_cache_kwarg = cache_kwarg(type(self.layers[0]).forward)
        self._mask_cache_kwarg = {kind: cache_kwarg(MASK_FUNCTIONS[kind]) for kind in set(self.layer_types)}

    @classmethod
    def from_checkpoint(cls, checkpoint, family: ModelFamily, config: PretrainedConfig, start: int, end: int,
                        dtype: torch.dtype = torch.float32) -> "BlockSpan":
        """Blocks [start, end) with their weights read from `checkpoint` (only theirs are read), in eval mode;
        raises ValueError if the checkpoint lacks some of them."""
        span = cls(family, config, start, end)
        tensors = load_tensors(Path(checkpoint), lambda name: family.block_tensor_name(name, start, end), dtype)
        missing, unexpected = span.load_state_dict(tensors, strict=False)
        missing = [m for m in missing if not m.startswith("rotary_emb.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint} does not hold blocks {start}:{end}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return span.to(dtype=dtype).eval().requires_grad_(False)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def new_cache(self, first: int = 0, last: int | None = None) -> SpanCache:
        """A KV cache for layers [first, last) of this span (indices relative to the span)."""
        last = self.num_blocks if last is None else last
        return SpanCache(self.family.span_config(self.config, first, last), offset=first)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [batch, seq, hidden]
        position_ids: torch.Tensor,  # [batch, seq], int64
        attention_mask: torch.Tensor | None = None,  # [batch, cached + seq], 1 = attend; None = all ones
        cache: SpanCache | None = None,
        first: int = 0,  # run layers [first, last) of the span (relative indices)
        last: int | None = None,
        prompts: torch.Tensor | None = None,  # [last - first, prompt_tokens, hidden]: deep prompt tuning
    ) -> torch.Tensor:  # [batch, seq, hidden]
        """With `prompts`, block j first adds prompts[j] to the hidden states of the first prompt_tokens positions."""
        last = self.num_blocks if last is None else last
        mask_args = dict(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                         position_ids=position_ids)
        layer_types = self.layer_types[first:last]
        masks = {kind: MASK_FUNCTIONS[kind](**mask_args, **{self._mask_cache_kwarg[kind]: cache})
                 for kind in set(layer_types)}
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for j, (layer, kind) in enumerate(zip(self.layers[first:last], layer_types)):
            if prompts is not None:
                hidden_states = add_prompts(hidden_states, prompts[j])
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[kind],
                position_ids=position_ids,
                **{self._layer_cache_kwarg: cache},
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return hidden_states


def add_prompts(hidden_states: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """hidden [batch, seq, hidden] + prompts [n, hidden] on the first n positions (out of place, differentiable)."""
    n = prompts.shape[0]
    return torch.cat([hidden_states[:, :n] + prompts.to(hidden_states.dtype), hidden_states[:, n:]], dim=1)
