"""KV cache of one inference session on a (sub-)span of a peer's blocks."""

from __future__ import annotations

from transformers import DynamicCache, PretrainedConfig


class SpanCache(DynamicCache):
    """A DynamicCache for layers [offset, offset + n) of a BlockSpan.

    The span's layers keep their indices within the whole hosted span; this cache holds only the
    layers a session uses and maps `layer_idx` to its own index, so mask sizes are read from the
    session's first layer.
    """

    def __init__(self, config: PretrainedConfig, offset: int):
        super().__init__(config=config)
        self.offset = offset

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)

    def truncate(self, length: int) -> None:
        """Keeps only the first `length` positions (rewinds the session); no-op if it holds no more."""
        excess = self.get_seq_length() - length
        if excess > 0:
            self.crop(-excess)  # transformers 5: crop() takes the number of tokens to remove, negated
