"""ClientMetrics: a client's Prometheus metrics (verification, bans, failovers), in a registry of its own.

Served at http://HOST:PORT/metrics when ClientConfig.metrics_port is set (a long-lived client: an API server, a
trainer); `RemoteSequential.metrics` holds them either way. Names follow the peers' (swarmlm.monitoring.metrics),
with a `swarmlm_client_` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

AUDIT_OUTCOMES = ("agreed", "mismatch", "unverified")  # unverified: nothing independent could recompute the segment
BAN_REASONS = ("failure", "wrong_output")  # a peer failed a call (temporary) or was caught lying (for good)


class ClientMetrics:
    """Thread-safe counters; none does I/O."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._audits = Counter(
            "swarmlm_client_audits", "Route segments whose outputs the client audited, by outcome (agreed, mismatch: "
            "a recomputation disagreed, unverified: nothing independent could recompute them)", ["outcome"],
            registry=r)
        self._audited_tokens = Counter(
            "swarmlm_client_audited_tokens", "Tokens of segment outputs recomputed by audits (one per token and "
            "segment)", registry=r)
        self._bans = Counter(
            "swarmlm_client_peer_bans", "Peers left out of routes, by reason (failure: for a while, wrong_output: "
            "caught answering wrong numbers, for the client's lifetime)", ["reason"], registry=r)
        self._reruns = Counter(
            "swarmlm_client_reruns", "generate() calls and forward passes run again from their start after a peer "
            "was caught answering wrong numbers", registry=r)
        self._failovers = Counter(
            "swarmlm_client_failovers", "Hops of inference sessions replaced after their peer failed", registry=r)
        for outcome in AUDIT_OUTCOMES:
            self._audits.labels(outcome)
        for reason in BAN_REASONS:
            self._bans.labels(reason)

    def audited(self, outcome: str, tokens: int = 0) -> None:
        self._audits.labels(outcome).inc()
        if tokens:
            self._audited_tokens.inc(tokens)

    def banned(self, reason: str) -> None:
        self._bans.labels(reason).inc()

    def rerun(self) -> None:
        self._reruns.inc()

    def failover(self) -> None:
        self._failovers.inc()
