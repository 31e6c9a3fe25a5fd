"""The peer's KV-cache budget in tokens: sessions reserve batch x max_length and release on close; one source (a
peer id, or the IP address of direct connections) may hold at most `per_source` of it, so that one client cannot
reserve the whole cache for itself."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Optional

from swarmlm.errors import CacheBudgetError


class CacheBudget:
    def __init__(self, max_tokens: int, on_change: Optional[Callable[[], None]] = None,
                 per_source: Optional[int] = None):
        self.max_tokens = max_tokens
        self.per_source = max_tokens if per_source is None else per_source
        self.on_change = on_change  # called after every reserve and release (e.g. to re-announce)
        self._used = 0
        self._by_source: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self._used

    def reserve(self, tokens: int, source: str = "") -> "Reservation":
        """Reserves `tokens` for `source`, or raises CacheBudgetError ("busy") when they do not fit in the budget or
        in the source's share."""
        with self._lock:
            if tokens > self.max_tokens - self._used:
                raise CacheBudgetError(
                    f"not enough KV cache: the session needs {tokens} tokens, "
                    f"{self.max_tokens - self._used} of {self.max_tokens} are free; retry later or use another peer"
                )
            if self._by_source[source] + tokens > self.per_source:
                raise CacheBudgetError(
                    f"not enough KV cache for one source: the session needs {tokens} tokens and {source or 'you'} "
                    f"already hold(s) {self._by_source[source]} of the {self.per_source} one source may reserve here; "
                    f"close other sessions or use another peer")
            self._used += tokens
            self._by_source[source] += tokens
        self._changed()
        return Reservation(self, tokens, source)

    def _release(self, tokens: int, source: str) -> None:
        with self._lock:
            self._used -= tokens
            self._by_source[source] -= tokens
            if self._by_source[source] <= 0:
                del self._by_source[source]
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class Reservation:
    """Reserved cache tokens; release() is idempotent."""

    def __init__(self, budget: CacheBudget, tokens: int, source: str):
        self.budget, self.tokens, self.source, self._released = budget, tokens, source, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.budget._release(self.tokens, self.source)
