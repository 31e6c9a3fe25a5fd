"""Prompt tuning: a trainable prefix of virtual tokens, kept on the client, prepended to every input.

Shallow: only the input embeddings of the prefix train. Deep (`deep=True`): in addition every block
adds its own trainable vectors to the prefix positions' hidden states; these "deep prompts" travel
to the peers with each request and the peers return their gradients. The peers' weights stay
frozen. Enable it with `model.enable_prompt_tuning(num_tokens, deep=...)`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class PromptPrefix(nn.Module):
    """`num_tokens` trainable input embeddings, initialised from the embeddings of `init_ids` (if
    given, cycled to length) or as small random vectors."""

    def __init__(self, embeddings: nn.Embedding, num_tokens: int, init_ids: Optional[torch.Tensor] = None,
                 init_std: float = 0.02, deep_blocks: int = 0):
        super().__init__()
        if num_tokens < 1:
            raise ValueError("num_tokens must be >= 1")
        weight = embeddings.weight
        if init_ids is not None:
            ids = init_ids.flatten().repeat(num_tokens // max(init_ids.numel(), 1) + 1)[:num_tokens]
            initial = weight[ids].detach().clone()
        else:
            initial = torch.randn(num_tokens, weight.shape[1], dtype=weight.dtype) * init_std
        self.embeddings = nn.Parameter(initial)
        # [blocks, num_tokens, hidden], zeros: training starts from the plain prefix
        self.deep = nn.Parameter(torch.zeros(deep_blocks, num_tokens, weight.shape[1], dtype=weight.dtype)) \
            if deep_blocks else None

    @property
    def num_tokens(self) -> int:
        return self.embeddings.shape[0]

    def prepend(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """[batch, seq, hidden] (+ mask [batch, seq]) -> the same with the prefix in front (always attended)."""
        batch = inputs_embeds.shape[0]
        prefix = self.embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([prefix, inputs_embeds], dim=1)
        return embeds, extend_mask(attention_mask, self.num_tokens)


def extend_mask(attention_mask: Optional[torch.Tensor], num_tokens: int) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    ones = attention_mask.new_ones(attention_mask.shape[0], num_tokens)
    return torch.cat([ones, attention_mask], dim=1)
