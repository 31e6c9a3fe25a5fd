"""The swarm health report: per model, which peers serve each block, and where the gaps are.

`collect_report(dht, models)` reads the model registry and the span records from the DHT;
`ModelHealth` and `SwarmReport` are plain values computed from those records (no I/O), rendered
as text for `swarmlm health`, or as a dict (`to_dict`, JSON-ready) for `--json` and the web page.

A block is covered when at least one ONLINE peer serves it; a model is healthy when it is
registered (its number of blocks is known) and every block is covered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import hivemind

from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import ModelRecord, fetch_block_records, fetch_model_claims
from swarmlm.errors import MissingBlocksError


@dataclass(frozen=True)
class ModelHealth:
    name: str  # the model's DHT name
    registry: Optional[ModelRecord]  # None: no peer registered this model (its number of blocks is unknown)
    blocks: tuple[tuple[ServerRecord, ...], ...] = ()  # per block: records of peers serving it, any state

    @property
    def num_blocks(self) -> Optional[int]:
        return self.registry.num_blocks if self.registry is not None else None

    @property
    def peers(self) -> list[ServerRecord]:
        """One record per peer serving any block, ordered by first block then peer id."""
        unique = {record.peer_id: record for block in self.blocks for record in block}
        return sorted(unique.values(), key=lambda r: (r.start, r.end, r.peer_id))

    @property
    def block_throughputs(self) -> list[float]:
        """Summed announced throughput (tokens/s) of the ONLINE peers of each block."""
        return [sum(r.throughput for r in block if r.state == ServerState.ONLINE) for block in self.blocks]

    @property
    def throughput(self) -> float:
        """The swarm's throughput for this model: its weakest block's (0 with a gap)."""
        return min(self.block_throughputs, default=0.0)

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """Maximal runs [start, end) of blocks that no ONLINE peer serves."""
        runs: list[tuple[int, int]] = []
        for index, block in enumerate(self.blocks):
            if any(r.state == ServerState.ONLINE for r in block):
                continue
            if runs and runs[-1][1] == index:
                runs[-1] = (runs[-1][0], index + 1)
            else:
                runs.append((index, index + 1))
        return runs

    @property
    def healthy(self) -> bool:
        return self.registry is not None and not self.gaps

    def problem(self) -> Optional[str]:
        """What is wrong and what to do, or None when healthy."""
        if self.registry is None:
            return f"no peer has registered model {self.name} in the DHT (is any peer serving it?)"
        if self.gaps:
            return str(MissingBlocksError(self.name, self.gaps))
        return None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.registry.family if self.registry is not None else None,
            "num_blocks": self.num_blocks,
            "registered": self.registry is not None,
            "healthy": self.healthy,
            "problem": self.problem(),
            "gaps": [list(gap) for gap in self.gaps],
            "throughput": self.throughput,
            "blocks": [
                {"index": index, "throughput": throughput, "peers": [r.peer_id for r in block]}
                for index, (block, throughput) in enumerate(zip(self.blocks, self.block_throughputs))
            ],
            "peers": [_peer_dict(r) for r in self.peers],
        }


@dataclass(frozen=True)
class SwarmReport:
    models: tuple[ModelHealth, ...]
    generated_at: float = field(default_factory=time.time)  # unix time of the DHT reads

    @property
    def healthy(self) -> bool:
        """At least one model, and every model healthy."""
        return bool(self.models) and all(m.healthy for m in self.models)

    def to_dict(self) -> dict:
        return {"healthy": self.healthy, "generated_at": self.generated_at,
                "models": [m.to_dict() for m in self.models]}


def collect_report(dht: hivemind.DHT, models: Optional[Sequence[str]] = None) -> SwarmReport:
    """Reads the DHT: the given models (default: every registered one) and their span records."""
    claims = fetch_model_claims(dht)
    names = list(dict.fromkeys(models)) if models else sorted(claims)
    report = []
    for name in names:
        registry, blocks = _registered(dht, name, claims.get(name, {}))
        report.append(ModelHealth(name, registry, tuple(tuple(block) for block in blocks)))
    return SwarmReport(tuple(report))


def _registered(dht: hivemind.DHT, name: str, claims: dict[ModelRecord, set[str]]):
    """The registry claim to believe for `name` and its blocks' records: the claim signed by the most peers that
    announce spans of the model (anyone can sign a claim; serving peers are the ones that know), then by the most
    signers. -> (None, []) when no one registered the model."""
    if not claims:
        return None, []
    blocks = fetch_block_records(dht, name, max(record.num_blocks for record in claims))
    serving = {r.peer_id for block in blocks for r in block}
    best = max(claims, key=lambda r: (len(claims[r] & serving), len(claims[r]), r.num_blocks, r.family))
    return best, blocks[:best.num_blocks]


def render_text(report: SwarmReport) -> str:
    """The report for a terminal: per model its status, block runs with their peers, and a peer table."""
    if not report.models:
        return "no model is registered in the DHT: no peer is serving (or the initial peers are wrong)"
    lines = []
    for model in report.models:
        lines += _model_lines(model) + [""]
    healthy = sum(m.healthy for m in report.models)
    lines.append(f"{healthy} of {len(report.models)} models fully served")
    return "\n".join(_printable(line) for line in lines)


def _model_lines(model: ModelHealth) -> list[str]:
    if model.registry is None:
        return [f"model {model.name}: UNKNOWN - {model.problem()}"]
    status = "OK" if model.healthy else "GAP - " + model.problem()
    lines = [
        f"model {model.name} ({model.registry.family}, {model.num_blocks} blocks): {status}",
        f"  swarm throughput {model.throughput:.1f} tokens/s (weakest block)",
        "  blocks     peers (state, tokens/s per block)",
    ]
    for start, end, block in _runs(model.blocks):
        served = ", ".join(f"{_short(r.peer_id)} ({r.state.name.lower()}, {r.throughput:.1f})" for r in block)
        covered = any(r.state == ServerState.ONLINE for r in block)
        row = f"  {start}:{end}".ljust(13) + (served if covered else f"!! MISSING: no online peer  {served}")
        lines.append(row.rstrip())
    lines.append("  peer".ljust(58) + "blocks     state    tokens/s  free cache      name")
    for r in model.peers:
        lines.append(f"  {r.peer_id:<56}{f'{r.start}:{r.end}':<11}{r.state.name.lower():<9}{r.throughput:<10.1f}"
                     f"{f'{r.free_cache_tokens}/{r.max_cache_tokens}':<16}{r.public_name or ''}".rstrip())
    return lines


def _runs(blocks: Sequence[Sequence[ServerRecord]]):
    """Groups consecutive blocks served by the same peers in the same states: (start, end, records)."""
    runs: list[list] = []
    for index, block in enumerate(blocks):
        signature = sorted((r.peer_id, int(r.state)) for r in block)
        if runs and runs[-1][3] == signature:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1, sorted(block, key=lambda r: r.peer_id), signature])
    return [(start, end, records) for start, end, records, _ in runs]


def _printable(text: str) -> str:
    """Names and ids come from the DHT: replace control characters so they cannot drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _short(peer_id: str) -> str:
    return f"{peer_id[:6]}...{peer_id[-6:]}" if len(peer_id) > 16 else peer_id


def _peer_dict(record: ServerRecord) -> dict:
    return {
        "peer_id": record.peer_id, "state": record.state.name.lower(), "start": record.start, "end": record.end,
        "throughput": record.throughput, "free_cache_tokens": record.free_cache_tokens,
        "max_cache_tokens": record.max_cache_tokens, "version": record.version, "torch_dtype": record.torch_dtype,
        "public_name": record.public_name,
    }
