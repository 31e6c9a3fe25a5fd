"""Pins what swarmlm relies on in the installed transformers release (swarmlm/experts/hf_compat.py).

Each of these is a place where transformers takes or returns the KV cache; if a release renames it again,
these tests name the function instead of generation quietly dropping the cache. They run in-process on a
tiny span (no swarm), and also catch the deprecation warnings the old spelling causes on the newest release.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from transformers import AutoConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarmlm import JIT_SCRIPT_DEPRECATION
from swarmlm.experts.families import FAMILIES
from swarmlm.experts.hf_compat import NEW_NAME, OLD_NAME, cache_kwarg, output_cache_field, pop_cache
from swarmlm.experts.span import BlockSpan
from swarmlm.models.embedded import EMBEDDED_MODELS

pytestmark = pytest.mark.canary
RENAMED_IN = Version("5.24.0")  # transformers release that renamed `past_key_values` to `cache`
EXPECTED = NEW_NAME if Version(version("transformers")) >= RENAMED_IN else OLD_NAME


def _callables():
    """Every transformers callable swarmlm hands a cache to, by a readable name."""
    found = {"create_causal_mask": create_causal_mask,
             "create_sliding_window_causal_mask": create_sliding_window_causal_mask}
    for family in FAMILIES.values():
        found[f"{family.layer_class}.forward"] = family._class(family.layer_class).forward
    for model_type in ("llama", "qwen2", "mistral"):
        from transformers import AutoModelForCausalLM

        config_class = type(AutoConfig.for_model(model_type))
        hf_class = AutoModelForCausalLM._model_mapping[config_class]
        found[f"{hf_class.__name__}.prepare_inputs_for_generation"] = hf_class.prepare_inputs_for_generation
    return found


@pytest.mark.parametrize("name", sorted(_callables()))
def test_every_cache_taking_callable_is_spelled_as_this_release_spells_it(name):
    assert cache_kwarg(_callables()[name]) == EXPECTED


def test_the_output_carries_the_cache_under_this_releases_name():
    assert output_cache_field(CausalLMOutputWithPast) == EXPECTED


def test_pop_cache_takes_either_name_and_refuses_two_caches():
    first, second = object(), object()
    for name in (NEW_NAME, OLD_NAME):
        kwargs = {name: first, "other": 1}
        assert pop_cache(kwargs) is first and kwargs == {"other": 1}
    assert pop_cache({OLD_NAME: first}, first) is first
    with pytest.raises(ValueError, match="give the cache once"):
        pop_cache({OLD_NAME: second}, first)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model", sorted(EMBEDDED_MODELS))
def test_a_cached_span_step_equals_a_full_recompute_without_deprecation_warnings(model):
    """A span fed the prompt then one token through its cache gives the same last hidden state as one pass over
    both; nothing warns (transformers logs its rename warning through its own logger, once per process, so the
    logger's once-cache is cleared first)."""
    from swarmlm.models.checkpoint import resolve_model

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_model(model).path)
    family = FAMILIES[config.model_type]
    span = BlockSpan(family, config, 0, config.num_hidden_layers).eval()
    hidden = torch.randn(1, 6, config.hidden_size)  # [batch, seq, hidden]
    positions = torch.arange(6).unsqueeze(0)
    transformers_logger = logging.getLogger("transformers")
    records = _Records()
    transformers_logger.addHandler(records)
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is an lru_cache on Logger
    try:
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            cache = span.new_cache()
            span(hidden[:, :5], positions[:, :5], cache=cache)
            stepped = span(hidden[:, 5:], positions[:, 5:], cache=cache)
            full = span(hidden, positions)
    finally:
        transformers_logger.removeHandler(records)
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(stepped[:, -1], full[:, -1], atol=1e-5, rtol=0)
    noisy = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
    noisy += [m for m in records.messages if "deprecat" in m.lower()]
    assert not noisy, noisy


STRICT = ("-W", "error::DeprecationWarning", "-W", "error::PendingDeprecationWarning", "-W", "error::FutureWarning")


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *STRICT, *args], capture_output=True, text=True, timeout=300)


def test_importing_swarmlm_and_its_dependencies_warns_of_nothing_deprecated():
    """Every deprecation warning is an error here (as in the suite); swarmlm hides only hivemind's torch.jit.script."""
    done = _python("-c", "import swarmlm, hivemind, transformers; import swarmlm.cli, swarmlm.client.model, "
                         "swarmlm.peer.server, swarmlm.training.pretrain, swarmlm.training.span_trainer")
    assert done.returncode == 0, done.stderr


def test_the_one_hidden_deprecation_is_still_hiveminds():
    """When a hivemind release stops calling torch.jit.script at import, this fails: then drop the filter in
    swarmlm/__init__.py and raise pyproject's torch bound."""
    done = _python("-c", "import hivemind")
    assert done.returncode != 0 and re.search(JIT_SCRIPT_DEPRECATION, done.stderr), done.stderr
    assert "hivemind" in done.stderr  # raised while hivemind was being imported
