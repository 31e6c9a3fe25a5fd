"""PeerMetrics: every Prometheus metric of one peer, in a registry of its own.

Each peer owns a `CollectorRegistry` (not prometheus_client's global one), so several peers, or
several tests, in one process never collide. Names follow Prometheus conventions: `swarmlm_`
prefix, the unit in the name, `_total` on counters, labels with a few fixed values only.

Who feeds what:
- RPC traffic (requests, latency, tokens, bytes): `swarmlm.monitoring.rpc_tap.metered`, around
  the handler's rpc_* methods;
- live state (sessions, KV cache): functions passed to `watch()`, read at every scrape;
- what the peer announces (model, blocks, state, throughput, DHT peers): `observe_announcement()`;
- training the hosted blocks: `averaging.observe()`, with the span optimizer's round counts.

`AveragingMetrics` and `dht_peers_gauge` are shared with `swarmlm train`'s TrainerMetrics.
"""

from __future__ import annotations

import threading
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily

from swarmlm.dht.records import ServerRecord, ServerState

RPC_KINDS = ("forward", "backward", "inference")
OUTCOMES = ("ok", "bad_request", "busy", "error")
TRANSPORTS = ("direct", "p2p")  # how a peer sends pushed steps (see swarmlm.transport.direct)
PEER_STATES = tuple(state.name.lower() for state in ServerState)
AVERAGING_KINDS = ("gradients", "state")  # the kinds of swarmlm.training.optimizer.AveragingRounds
AVERAGING_OUTCOMES = ("completed", "failed")
# from a tiny model's single-token step on CPU (~1 ms) to a request timing out (60 s)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PeerMetrics:
    """The metrics of one peer. All methods are thread-safe and cheap; none does I/O."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "swarmlm_requests", "RPC calls this peer answered, by kind and outcome (counted when the call ends; "
            "an inference session is one call)", ["kind", "outcome"], registry=r)
        self._latency = Histogram(
            "swarmlm_request_duration_seconds", "Seconds from receiving a forward/backward request or an inference "
            "step to sending its result (successful ones)", ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self._tokens = Counter(
            "swarmlm_processed_tokens", "Tokens (batch x sequence length) that went through this peer's blocks",
            ["kind"], registry=r)
        self._received = Counter(
            "swarmlm_rpc_received_bytes", "Payload bytes of RPC messages received", ["kind"], registry=r)
        self._sent = Counter("swarmlm_rpc_sent_bytes", "Payload bytes of RPC messages sent", ["kind"], registry=r)
        self._pushed = Counter(
            "swarmlm_pushed_steps", "Inference steps sent straight on to the route's next peer, by transport (direct: "
            "plain TCP, p2p: through the p2p daemons)", ["transport"], registry=r)
        self._sessions = Gauge("swarmlm_inference_sessions_active", "Open inference sessions", registry=r)
        self._open_channels = Gauge(
            "swarmlm_open_connections", "Open sessions and push streams other nodes hold on this peer (p2p and direct)",
            registry=r)
        self._cache_used = Gauge(
            "swarmlm_kv_cache_used_tokens", "KV-cache tokens reserved by open sessions (batch x max_length each)",
            registry=r)
        self._cache_free = Gauge("swarmlm_kv_cache_free_tokens", "KV-cache tokens free for new sessions", registry=r)
        self._info = Info("swarmlm_peer", "The model and blocks this peer serves", registry=r)
        self._state = Enum("swarmlm_peer_state", "The state this peer announces", states=list(PEER_STATES),
                           registry=r)
        self._served_blocks = Gauge("swarmlm_served_blocks", "Blocks this peer hosts", registry=r)
        self._throughput = Gauge(
            "swarmlm_announced_throughput_tokens_per_second", "Throughput this peer announces, tokens/s per block",
            registry=r)
        self._dht_peers = dht_peers_gauge(r, "refreshed at every announcement")
        self._dropped = Counter(
            "swarmlm_dropped_micro_batches", "Micro-batches whose parameter gradients this training peer dropped "
            "because their backward call gave up first (timed out, or the caller left): the caller retries them "
            "elsewhere", registry=r)
        self._jobs = Gauge("swarmlm_compute_jobs", "Jobs (forward, backward, inference steps, state snapshots) waiting "
                           "for or running on the compute thread", registry=r)
        self._refused_jobs = Counter(
            "swarmlm_refused_jobs", "Jobs refused as busy because the compute queue was full (--max-queued-jobs)",
            registry=r)
        self.averaging = AveragingMetrics(r)  # a training peer's rounds (all zero on other peers)
        for kind in RPC_KINDS:  # every series exists from the start, so rate() sees the first event
            self._latency.labels(kind)
            self._tokens.labels(kind)
            self._received.labels(kind)
            self._sent.labels(kind)
            for outcome in OUTCOMES:
                self._requests.labels(kind, outcome)
        for transport in TRANSPORTS:
            self._pushed.labels(transport)

    # ---- RPC traffic ---------------------------------------------------------------------------------

    def request_finished(self, kind: str, outcome: str) -> None:
        """One RPC call of `kind` ended with `outcome` (ok, bad_request, busy or error)."""
        _check(kind, RPC_KINDS, "kind")
        _check(outcome, OUTCOMES, "outcome")
        self._requests.labels(kind, outcome).inc()

    def step_served(self, kind: str, tokens: int, seconds: float) -> None:
        """A forward/backward request or an inference step of `tokens` tokens was answered in `seconds`."""
        _check(kind, RPC_KINDS, "kind")
        self._tokens.labels(kind).inc(tokens)
        self._latency.labels(kind).observe(seconds)

    def job_refused(self) -> None:
        """A job was refused: the compute queue was full."""
        self._refused_jobs.inc()

    def watch_jobs(self, jobs: Callable[[], float]) -> None:
        """Makes the compute-jobs gauge read `jobs` at every scrape."""
        self._jobs.set_function(jobs)

    def micro_batch_dropped(self) -> None:
        """A training peer dropped a micro-batch's parameter gradients (its backward call gave up first)."""
        self._dropped.inc()

    def step_pushed(self, transport: str) -> None:
        """An inference step's output went on to the next peer over `transport` (direct or p2p)."""
        _check(transport, TRANSPORTS, "transport")
        self._pushed.labels(transport).inc()

    def bytes_received(self, kind: str, size: int) -> None:
        self._received.labels(kind).inc(size)

    def bytes_sent(self, kind: str, size: int) -> None:
        self._sent.labels(kind).inc(size)

    # ---- live state, read at scrape time -------------------------------------------------------------

    def watch_channels(self, open_channels: Callable[[], float], refused: Mapping[str, int]) -> None:
        """Makes the open-channels gauge read `open_channels`, and exports `refused` (reason -> refusals so far,
        see swarmlm.transport.limits) as the counter swarmlm_refused_connections_total, at every scrape."""
        self._open_channels.set_function(open_channels)
        self.registry.register(_RefusalCollector(refused))

    def watch(self, active_sessions: Callable[[], float], cache_used_tokens: Callable[[], float],
              cache_free_tokens: Callable[[], float]) -> None:
        """Makes the session and KV-cache gauges read these functions at every scrape."""
        self._sessions.set_function(active_sessions)
        self._cache_used.set_function(cache_used_tokens)
        self._cache_free.set_function(cache_free_tokens)

    # ---- announcements -------------------------------------------------------------------------------

    def observe_announcement(self, model: str, family: str, record: ServerRecord, dht_peers: int) -> None:
        """Mirrors what the peer just announced: model, blocks, state, throughput; and its DHT view."""
        self._info.info({
            "model": model, "family": family, "start": str(record.start), "end": str(record.end),
            "torch_dtype": record.torch_dtype, "version": record.version,
        })
        self._state.state(record.state.name.lower())
        self._served_blocks.set(record.end - record.start)
        self._throughput.set(record.throughput)
        self._dht_peers.set(dht_peers)


class _RefusalCollector:
    """swarmlm_refused_connections_total{reason}: channels the transport refused, read at scrape time."""

    REASONS = ("per_source", "total", "admission")  # swarmlm.transport.limits.REFUSAL_REASONS

    def __init__(self, refused: Mapping[str, int]):
        self.refused = refused

    def collect(self):
        family = CounterMetricFamily("swarmlm_refused_connections", "Sessions and push streams this peer refused: "
                                     "a source over its limit, everyone over the total, or not admitted",
                                     labels=["reason"])
        for reason in self.REASONS:
            family.add_metric([reason], self.refused.get(reason, 0))
        yield family


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def dht_peers_gauge(registry: CollectorRegistry, refreshed: str) -> Gauge:
    """`swarmlm_dht_known_peers`; `refreshed` says when its owner updates it (for the help text)."""
    return Gauge("swarmlm_dht_known_peers", f"DHT peers in this node's routing table ({refreshed})",
                 registry=registry)


class AveragingMetrics:
    """The averaging rounds of a collaborative optimizer (a trainer's, or a training peer's span), fed with
    `AveragingRounds.snapshot()`s: each `observe()` adds what changed since the previous one."""

    def __init__(self, registry: CollectorRegistry):
        self._rounds = Counter(
            "swarmlm_averaging_rounds", "Averaging rounds this node took part in, by kind (gradients: all-reduce of "
            "the accumulated gradients; state: of parameters and Adam statistics) and outcome",
            ["kind", "outcome"], registry=registry)
        self._bytes = Counter(
            "swarmlm_averaging_contributed_bytes", "Bytes of this node's tensors (elements x element size, "
            "uncompressed) in averaging rounds whose all-reduce finished, by kind: the payload it contributed, "
            "not the bytes on the wire", ["kind"], registry=registry)
        self._seen = {key: dict.fromkeys(AVERAGING_KINDS, 0) for key in (*AVERAGING_OUTCOMES, "contributed_bytes")}
        self._lock = threading.Lock()
        for kind in AVERAGING_KINDS:
            self._bytes.labels(kind)
            for outcome in AVERAGING_OUTCOMES:
                self._rounds.labels(kind, outcome)

    def observe(self, snapshot: dict) -> None:
        """Counts the rounds and bytes that `snapshot` (cumulative counts by kind) adds to the previous one."""
        with self._lock:
            for key, seen in self._seen.items():
                for kind, total in snapshot[key].items():
                    _check(kind, AVERAGING_KINDS, "averaging kind")
                    if total > seen[kind]:
                        self._counter(key, kind).inc(total - seen[kind])
                        seen[kind] = total

    def _counter(self, key: str, kind: str):
        """The counter of one snapshot entry: snapshot["completed" | "failed" | "contributed_bytes"][kind]."""
        return self._bytes.labels(kind) if key == "contributed_bytes" else self._rounds.labels(kind, key)
