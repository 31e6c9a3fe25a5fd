"""PeerConfig: every setting of a volunteer peer, one comment each; `swarmlm peer` maps onto it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from swarmlm.experts.direct import direct_hosts, loopback_only
from swarmlm.training.span_trainer import SpanTrainingConfig


@dataclass
class PeerConfig:
    model: str  # embedded model name, checkpoint directory or HF repo id (from the local cache)
    blocks: Optional[tuple[int, int]] = None  # serve blocks [start, end); None: choose by num_blocks
    num_blocks: Optional[int] = None  # with blocks=None: host this many blocks where the swarm is weakest
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm members
    new_swarm: bool = False  # start a new swarm (no initial peers needed)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to announce (behind NAT)
    identity_path: Optional[str] = None  # libp2p private key file: a stable peer id across restarts
    use_nat_port_map: bool = False  # ask the gateway for a port mapping (NAT-PMP/UPnP); never on loopback
    use_relay: bool = True  # allow libp2p circuit relays (peers behind NAT)
    direct: Optional[bool] = None  # also serve inference sessions and pushes over plain TCP (unencrypted: local
    # swarms and trusted LANs; see swarmlm.experts.direct); None: only where every address is loopback (`serves_direct`)
    direct_port: int = 0  # TCP port of direct connections (0: any free port)
    dht_prefix: Optional[str] = None  # the model's name in the DHT (default: resolved model name)
    public_name: Optional[str] = None  # a human-readable name shown in health reports
    device: str = "cpu"  # torch device of the blocks
    torch_dtype: str = "float32"  # dtype of weights and compute: float32, float16, bfloat16
    num_threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    max_cache_tokens: int = 16384  # KV-cache budget: sum over sessions of batch x max_length
    max_batch_size: int = 64  # largest batch accepted in one request
    max_request_tokens: int = 16384  # largest batch x seq in one forward/backward/inference message
    max_session_length: Optional[int] = None  # longest session (default: the model's max positions)
    request_timeout: float = 60.0  # seconds one forward/backward/inference step may take
    session_timeout: float = 300.0  # an inference session idle this long is closed, its cache freed
    update_period: float = 30.0  # seconds between DHT announcements (records expire after 2x)
    balance_period: float = 120.0  # with num_blocks: seconds (+-50% jitter) between checks whether to move
    balance_margin: float = 0.2  # move only if the swarm's weakest block gets this much faster (0.2 = +20%)
    throughput: Optional[float] = None  # announced tokens/s per block (default: measured at start)
    startup_timeout: float = 60.0  # seconds to wait for the p2p daemon to start
    metrics_port: Optional[int] = None  # serve Prometheus metrics at http://metrics_host:PORT/metrics (0: any free port)
    metrics_host: str = "127.0.0.1"  # where the metrics endpoint listens (0.0.0.0 to let other machines scrape)
    training: Optional[SpanTrainingConfig] = None  # train the hosted blocks with their replicas; None: frozen weights

    @property
    def serves_direct(self) -> bool:
        """Whether the peer serves direct connections: as `direct` says, or by default where it listens and
        announces on loopback only (plain TCP there reaches no other machine)."""
        return self.direct if self.direct is not None else loopback_only(self.host_maddrs, self.announce_maddrs)

    def __post_init__(self):
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
