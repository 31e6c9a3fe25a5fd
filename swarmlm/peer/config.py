"""PeerConfig and SpanTrainingConfig: every setting of a volunteer peer, one help text each (swarmlm.settings
turns them into the flags, env vars and config file keys of `swarmlm peer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from swarmlm.dht.records import MAX_RECORD_LIFETIME
from swarmlm.settings import setting
from swarmlm.transport.direct import direct_hosts, loopback_only
from swarmlm.transport.limits import ChannelLimits


@dataclass(frozen=True)
class SpanTrainingConfig:
    """How a training peer (`swarmlm peer --train`) trains its span with the replicas of that span.

    lr, target_batch_size and averaging_timeout default lower than `swarmlm train`'s: these are the blocks of
    a (pre)trained model, and requests wait for an epoch's averaging (PeerConfig.request_timeout >= 2x).
    Its env vars are SWARMLM_TRAINING_<FLAG> (SWARMLM_TRAINING_LR), apart from `swarmlm train`'s SWARMLM_LR."""

    ENV_PREFIX: ClassVar[str] = "SWARMLM_TRAINING_"

    run_id: str = field(default="swarmlm", metadata=setting(
        "replicas with the same run id, model and blocks train together"))
    target_batch_size: int = field(default=64, metadata=setting(
        "samples all replicas of the span process per epoch (one optimizer step)"))
    lr: float = field(default=1e-4, metadata=setting("AdamW learning rate (tuned for target_batch_size)"))
    weight_decay: float = field(default=0.0, metadata=setting("AdamW weight decay"))
    average_state_every: int = field(default=1, metadata=setting(
        "average parameters and Adam statistics every this many epochs"))
    matchmaking_time: float = field(default=5.0, metadata=setting(
        "seconds to wait for replicas to form an averaging group"))
    averaging_timeout: float = field(default=30.0, metadata=setting(
        "an averaging round that takes longer (seconds) is abandoned (local results are kept)"))
    load_state_timeout: float = field(default=120.0, metadata=setting(
        "seconds to wait for a download of the replicas' state"))
    progress_expiration: float = field(default=30.0, metadata=setting(
        "seconds a replica's progress record lives in the DHT (dead replicas vanish)"))
    tick_period: float = field(default=0.25, metadata=setting(
        "seconds between checks whether the span's replicas finished an epoch"))

    def __post_init__(self):
        if not self.run_id or any(c.isspace() for c in self.run_id):
            raise ValueError(f"the training run id must be a non-empty word, got {self.run_id!r}")
        if self.target_batch_size < 1 or self.average_state_every < 1:
            raise ValueError("target_batch_size and average_state_every must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        if not 0 < self.matchmaking_time < self.averaging_timeout:
            raise ValueError("need 0 < matchmaking_time < averaging_timeout")
        if self.tick_period <= 0 or self.progress_expiration <= 0 or self.load_state_timeout <= 0:
            raise ValueError("tick_period, progress_expiration and load_state_timeout must be > 0")


@dataclass
class PeerConfig:
    model: str = field(metadata=setting("embedded model name, checkpoint directory or HF repo id (from the local "
                                        "HF cache)"))
    blocks: Optional[tuple[int, int]] = field(default=None, metadata=setting(
        "serve blocks A:B (A inclusive, B exclusive); or give num_blocks", metavar="A:B", excludes=("num_blocks",)))
    num_blocks: Optional[int] = field(default=None, metadata=setting(
        "serve N blocks where the swarm is weakest (instead of blocks)", metavar="N"))
    initial_peers: list[str] = field(default_factory=list, metadata=setting(
        "multiaddrs of any swarm members", metavar="MADDR"))
    new_swarm: bool = field(default=False, metadata=setting("start a new swarm instead of joining one"))
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], metadata=setting(
        "where to listen (e.g. /ip4/0.0.0.0/tcp/31337 for a public peer)", metavar="MADDR"))
    announce_maddrs: list[str] = field(default_factory=list, metadata=setting(
        "public multiaddrs to announce (behind NAT)", metavar="MADDR"))
    identity_path: Optional[str] = field(default=None, metadata=setting(
        "libp2p private key file: a stable peer id across restarts", metavar="FILE"))
    swarm_key: Optional[str] = field(default=None, metadata=setting(
        "swarm key file of a private swarm: only nodes holding the same key can join, read or write its records and "
        "call its peers (`swarmlm swarm-key FILE` makes one)", metavar="FILE"))
    use_nat_port_map: bool = field(default=False, metadata=setting(
        "ask the gateway for a port mapping (NAT-PMP/UPnP); never on loopback"))
    use_relay: bool = field(default=True, metadata=setting("allow libp2p circuit relays (peers behind NAT)"))
    direct: Optional[bool] = field(default=None, metadata=setting(
        "also serve inference sessions and pushed steps over plain, unencrypted TCP (no p2p daemon on the path: "
        "less latency and CPU per token; for local swarms and trusted LANs; printed as DIRECT HOST:PORT before "
        "READY). Default: on where every listen and announce address is loopback (127.x), off otherwise"))
    direct_port: int = field(default=0, metadata=setting(
        "TCP port of direct connections when they are on (0: any free port)", metavar="PORT"))
    dht_prefix: Optional[str] = field(default=None, metadata=setting(
        "the model's name in the DHT (default: from --model)", metavar="NAME"))
    public_name: Optional[str] = field(default=None, metadata=setting("a name shown in health reports"))
    device: str = field(default="cpu", metadata=setting("torch device of the blocks, e.g. cuda:0"))
    torch_dtype: str = field(default="float32", metadata=setting(
        "dtype of weights and compute", choices=("float32", "float16", "bfloat16")))
    num_threads: Optional[int] = field(default=None, metadata=setting(
        "torch intra-op threads (default: torch's)", metavar="N"))
    max_cache_tokens: int = field(default=16384, metadata=setting(
        "KV-cache budget: sum of batch x max_length over open sessions"))
    max_batch_size: int = field(default=64, metadata=setting("largest batch accepted in one request"))
    max_request_tokens: int = field(default=16384, metadata=setting(
        "largest batch x seq in one forward/backward/inference message"))
    max_session_length: Optional[int] = field(default=None, metadata=setting(
        "longest inference session in tokens (default: the model's max positions)"))
    request_timeout: float = field(default=60.0, metadata=setting(
        "seconds one forward/backward/inference step may take"))
    session_timeout: float = field(default=300.0, metadata=setting(
        "seconds an idle inference session stays open (then its cache is freed)"))
    max_connections_per_source: int = field(default=256, metadata=setting(
        "open sessions and push streams one source may hold (a peer id; an IP address for direct connections); "
        "more are refused as busy"))
    max_connections: int = field(default=4096, metadata=setting(
        "open sessions and push streams from everyone (more are refused as busy)"))
    update_period: float = field(default=30.0, metadata=setting(
        "seconds between DHT announcements (records expire after 2x); at most 300"))
    max_queued_jobs: int = field(default=64, metadata=setting(
        "jobs (forward, backward, inference steps) that may wait for or run on the compute thread at once; more are "
        "refused as busy (each holds its request's tensors)"))
    open_timeout: float = field(default=10.0, metadata=setting(
        "seconds a new inference session may take to send its request; a connection that sends nothing is closed"))
    max_cache_tokens_per_source: Optional[int] = field(default=None, metadata=setting(
        "KV-cache tokens one source (a peer id; an IP address for direct connections) may reserve at most "
        "(default: half of max_cache_tokens); more are refused as busy", metavar="N"))
    health_check_period: float = field(default=5.0, metadata=setting(
        "seconds between the peer's checks of its own parts (DHT process, p2p daemon, RPC loop, direct listener, "
        "announcements); when one dies the peer leaves and exits with status 1, for a supervisor to restart it"))
    balance_period: float = field(default=120.0, metadata=setting(
        "with num_blocks: seconds (+-50% jitter) between checks whether moving would help the swarm"))
    balance_margin: float = field(default=0.2, metadata=setting(
        "move only if the swarm's weakest block gets this much faster (0.2 = +20%)"))
    throughput: Optional[float] = field(default=None, metadata=setting(
        "announced tokens/s per block (default: measured at start)"))
    startup_timeout: float = field(default=60.0, metadata=setting("seconds to wait for the p2p daemon to start"))
    metrics_port: Optional[int] = field(default=None, metadata=setting(
        "serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port; printed as METRICS URL before "
        "READY; default: no metrics)", metavar="PORT"))
    metrics_host: str = field(default="127.0.0.1", metadata=setting(
        "where /metrics listens (0.0.0.0: scrapable from other machines)", metavar="HOST"))
    training: Optional[SpanTrainingConfig] = None  # train the hosted blocks with their replicas; None: frozen weights

    @property
    def serves_direct(self) -> bool:
        """Whether the peer serves direct connections: as `direct` says, or by default where it listens and
        announces on loopback only (plain TCP there reaches no other machine)."""
        return self.direct if self.direct is not None else loopback_only(self.host_maddrs, self.announce_maddrs)

    def __post_init__(self):
        ChannelLimits(self.max_connections_per_source, self.max_connections)  # raises ValueError if invalid
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (A:B) or num_blocks (N)")
        if not self.new_swarm and not self.initial_peers:
            raise ValueError("give initial_peers to join a swarm, or new_swarm=True to start one")
        if self.blocks is not None and not 0 <= self.blocks[0] < self.blocks[1]:
            raise ValueError(f"invalid blocks {self.blocks[0]}:{self.blocks[1]}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must lie in [0, 65535], got {self.metrics_port}")
        if not 0 <= self.direct_port <= 65535:
            raise ValueError(f"direct_port must lie in [0, 65535], got {self.direct_port}")
        if self.direct:
            direct_hosts(self.host_maddrs, self.announce_maddrs)  # raises ValueError with what to give
        if not 0 < self.update_period <= MAX_RECORD_LIFETIME / 2:
            raise ValueError(f"update_period must lie in (0, {MAX_RECORD_LIFETIME / 2:.0f}] s (records expire after 2x, "
                             f"and no DHT node keeps a record longer than {MAX_RECORD_LIFETIME:.0f} s), "
                             f"got {self.update_period}")
        if self.throughput is not None and not 0 <= self.throughput < math.inf:  # also false for NaN
            raise ValueError(f"throughput must be a finite number >= 0, got {self.throughput}")
        if self.training is not None:
            if self.blocks is None:
                raise ValueError("a training peer needs fixed blocks (--blocks A:B): replicas average by span, "
                                 "and a peer that moved would leave its group")
            if self.torch_dtype != "float32":
                raise ValueError(f"a training peer keeps float32 weights; got torch_dtype={self.torch_dtype}")
            if 2 * self.training.averaging_timeout > self.request_timeout:
                raise ValueError(f"request_timeout ({self.request_timeout} s) must cover an epoch's averaging, a "
                                 f"gradient and a parameter round of up to averaging_timeout "
                                 f"({self.training.averaging_timeout} s) each: requests wait for it")
