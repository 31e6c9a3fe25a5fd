"""The peer's KV-cache budget in tokens: sessions reserve batch x max_length and release on close."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from swarmlm.errors import CacheBudgetError


class CacheBudget:
    def __init__(self, max_tokens: int, on_change: Optional[Callable[[], None]] = None):
        self.max_tokens = max_tokens
        self.on_change = on_change  # called after every reserve and release (e.g. to re-announce)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def free_tokens(self) -> int:
        return self.max_tokens - self._used

    def reserve(self, tokens: int) -> "Reservation":
        """Reserves `tokens` or raises CacheBudgetError ("busy") when they do not fit."""
        with self._lock:
            if tokens > self.max_tokens - self._used:
                raise CacheBudgetError(
                    f"not enough KV cache: the session needs {tokens} tokens, "
                    f"{self.max_tokens - self._used} of {self.max_tokens} are free; retry later or use another peer"
                )
            self._used += tokens
        self._changed()
        return Reservation(self, tokens)

    def _release(self, tokens: int) -> None:
        with self._lock:
            self._used -= tokens
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class Reservation:
    """Reserved cache tokens; release() is idempotent."""

    def __init__(self, budget: CacheBudget, tokens: int):
        self.budget, self.tokens, self._released = budget, tokens, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.budget._release(self.tokens)
