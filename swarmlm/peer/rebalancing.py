"""Automatic block balancing: which peer (if any) should move its span, and where.

Every movable peer (one started with --num-blocks) runs `plan_move` on the records it reads from
the DHT at each balance check. The plan is a deterministic function of those records, so peers
that see the same swarm agree on a single mover; only that peer moves, which avoids two peers
rushing into the same gap. A move must
- keep every block that is covered now covered (never open a gap by moving; only ONLINE peers
  cover a block, since clients route only to them),
- and either cover more blocks, or, with every block covered, raise the weakest block's
  throughput by more than `margin` (hysteresis: no moves for small gains, no oscillation).
A span is never "moved" onto itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.peer.block_selection import choose_span


@dataclass(frozen=True)
class Move:
    peer_id: str
    start: int
    end: int
    covered_blocks: int  # blocks covered after the move
    bottleneck: float  # throughput of the weakest block after the move (tokens/s)


def _coverage(records: Sequence[Sequence[ServerRecord]], exclude: Optional[str] = None):
    """Per block: (number of ONLINE peers, total throughput of ONLINE and JOINING peers).

    Only ONLINE peers cover a block (clients route only to them), so a block that only a JOINING
    peer announces (one still loading) counts as uncovered and no move may leave a block to it. The
    throughput, which decides where a peer goes, also counts JOINING peers: capacity that is about
    to arrive, so two peers do not rush into the same gap."""
    counts, throughputs = [], []
    for block in records:
        online = [r for r in block if r.state == ServerState.ONLINE and r.peer_id != exclude]
        joining = [r for r in block if r.state == ServerState.JOINING and r.peer_id != exclude]
        counts.append(len(online))
        throughputs.append(sum(r.throughput for r in online + joining))
    return counts, throughputs


def _score(counts: Sequence[int], throughputs: Sequence[float]) -> tuple[int, float]:
    covered = sum(1 for c in counts if c > 0)
    return covered, (min(throughputs) if covered == len(counts) else 0.0)


def plan_move(records: Sequence[Sequence[ServerRecord]], margin: float) -> Optional[Move]:
    """The single best move in the swarm described by `records` (one list per block), or None."""
    counts, throughputs = _coverage(records)
    covered, bottleneck = _score(counts, throughputs)
    movable = {r.peer_id: r for block in records for r in block if r.movable and r.state == ServerState.ONLINE}
    candidates = []
    for peer_id, record in sorted(movable.items()):
        other_counts, other_throughputs = _coverage(records, exclude=peer_id)
        start, end = choose_span(other_throughputs, record.end - record.start)
        if (start, end) == (record.start, record.end):
            continue
        for block in range(start, end):
            other_counts[block] += 1
            other_throughputs[block] += record.throughput
        if any(before > 0 and after == 0 for before, after in zip(counts, other_counts)):
            continue  # moving would uncover a block that only this peer serves
        new_covered, new_bottleneck = _score(other_counts, other_throughputs)
        better = new_covered > covered or (
            new_covered == covered == len(counts) and new_bottleneck > bottleneck * (1 + margin)
        )
        if better:
            candidates.append(Move(peer_id, start, end, new_covered, new_bottleneck))
    if not candidates:
        return None
    return min(candidates, key=lambda m: (-m.covered_blocks, -m.bottleneck, m.peer_id))
