"""Each family adapter's BlockSpan reproduces the local transformers model (no network involved)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from swarmlm.experts import BlockSpan, family_for_config
from swarmlm.models.checkpoint import load_tensors
from swarmlm.models.embedded import EMBEDDED_MODELS, ensure_embedded_model


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_spans_chained_match_local_model(name):
    path = ensure_embedded_model(name)
    config = AutoConfig.from_pretrained(path)
    family = family_for_config(config)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    spans = []
    for start, end in [(0, 3), (3, config.num_hidden_layers)]:
        span = BlockSpan(family, config, start, end)
        span.load_state_dict(load_tensors(path, lambda n: family.block_tensor_name(n, start, end)), strict=False)
        spans.append(span.eval())
    ids = torch.randint(3, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = local(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states[-1]
        hidden = local.model.embed_tokens(ids)
        for span in spans:
            hidden = span(hidden, positions, mask.bool())
        torch.testing.assert_close(local.model.norm(hidden)[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)

        caches = [span.new_cache() for span in spans]  # incremental: 5 tokens, then 4 more
        hidden = local.model.embed_tokens(ids[:, :5])
        for span, cache in zip(spans, caches):
            hidden = span(hidden, positions[:, :5], mask[:, :5].bool(), cache)
        hidden = local.model.embed_tokens(ids[:, 5:])
        for span, cache in zip(spans, caches):
            hidden = span(hidden, positions[:, 5:], mask.bool(), cache)
        torch.testing.assert_close(local.model.norm(hidden), expected[:, 5:], atol=1e-4, rtol=0)

        for span, cache in zip(spans, caches):  # rewind to 7 tokens and feed the last 2 again: same result
            cache.truncate(7)
            assert cache.get_seq_length() == 7
        hidden = local.model.embed_tokens(ids[:, 7:])
        for span, cache in zip(spans, caches):
            hidden = span(hidden, positions[:, 7:], mask.bool(), cache)
        torch.testing.assert_close(local.model.norm(hidden), expected[:, 7:], atol=1e-4, rtol=0)
