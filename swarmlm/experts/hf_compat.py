"""The one place that knows how the installed transformers release spells its cache argument.

transformers 5.24 renamed `past_key_values` to `cache` in `generate()`, in the `forward` of models,
decoder layers and attention, in the mask functions of `masking_utils` and in the output fields of
`CausalLMOutputWithPast`; the old name still works there until 5.40 but logs a deprecation warning,
and a function we define ourselves gets the cache under the new name only. Everything in swarmlm
that hands a cache to transformers or takes one from it asks this module for the name, read from the
installed release's own signatures (public API: `inspect.signature` follows transformers' decorators
to the wrapped function), so both spellings work and the newest gets no deprecation warnings.
tests/test_hf_compat.py pins these uses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

NEW_NAME = "cache"  # transformers >= 5.24
OLD_NAME = "past_key_values"  # transformers < 5.24 (deprecated from 5.24, announced for removal in 5.40)


def _spelling(names, what: str) -> str:
    """NEW_NAME or OLD_NAME, whichever `names` (a signature's parameters, a dataclass's fields) has."""
    for name in (NEW_NAME, OLD_NAME):
        if name in names:
            return name
    raise TypeError(f"{what} takes neither `{NEW_NAME}` nor `{OLD_NAME}`: unsupported transformers release")


@functools.lru_cache(maxsize=None)
def cache_kwarg(function: Callable) -> str:
    """The keyword under which `function` (a transformers callable) takes the KV cache."""
    return _spelling(inspect.signature(function).parameters, function.__qualname__)


@functools.lru_cache(maxsize=None)
def output_cache_field(output_class: type) -> str:
    """The field of a transformers ModelOutput dataclass (e.g. CausalLMOutputWithPast) that carries the cache."""
    return _spelling({field.name for field in dataclasses.fields(output_class)}, output_class.__qualname__)


def cache_argument(function: Callable, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to splat into a call of `function`, with the name that release uses."""
    return {cache_kwarg(function): cache}


def pop_cache(kwargs: dict[str, Any], cache: Any = None) -> Any:
    """The cache handed to a forward() of ours under either name (the other name is removed from `kwargs`).

    `cache` is the value already bound to the explicit parameter, if any; giving two different caches
    is an error, as in transformers.
    """
    for name in (NEW_NAME, OLD_NAME):
        value = kwargs.pop(name, None)
        if value is None:
            continue
        if cache is not None and value is not cache:
            raise ValueError(f"give the cache once: both `{NEW_NAME}` and `{OLD_NAME}` were given")
        cache = value
    return cache
