"""Choosing which blocks a new peer hosts: the window where the swarm is weakest."""

from __future__ import annotations

from typing import Sequence

from swarmlm.dht.records import ServerRecord, ServerState


def block_throughputs(records: Sequence[Sequence[ServerRecord]], exclude_peer: str | None = None) -> list[float]:
    """Total announced throughput of online (or joining) peers per block."""
    return [
        sum(r.throughput for r in block if r.state != ServerState.OFFLINE and r.peer_id != exclude_peer)
        for block in records
    ]


def choose_span(throughputs: Sequence[float], num_blocks: int) -> tuple[int, int]:
    """The window of `num_blocks` consecutive blocks with the least coverage.

    Windows are compared by their sorted per-block throughputs (the weakest block first), so a
    window with an uncovered block always wins; ties go to the leftmost window.
    """
    total = len(throughputs)
    if not 1 <= num_blocks <= total:
        raise ValueError(f"cannot host {num_blocks} blocks of a model with {total}")
    best = min(range(total - num_blocks + 1), key=lambda s: (sorted(throughputs[s : s + num_blocks]), s))
    return best, best + num_blocks
