"""ClientConfig: every setting of the client, one comment each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ClientConfig:
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of any swarm members
    dht_prefix: Optional[str] = None  # the model's name in the DHT (default: resolved model name)
    request_timeout: float = 30.0  # seconds to wait for one forward/backward call or inference step
    max_retries: int = 3  # retries per call or inference step before giving up with an error (fresh route each)
    retry_backoff: float = 0.5  # seconds before the 2nd retry in a row, doubling after each failure
    max_backoff: float = 10.0  # cap on the wait between retries
    ban_duration: float = 5.0  # a failing peer is left out of routes this long, doubling per failure in a row
    max_ban_duration: float = 120.0  # cap on a peer's ban
    probe_timeout: float = 2.0  # seconds to wait for a peer's rpc_info answer (RTT probe) before banning it
    route_refresh_period: float = 10.0  # seconds before cached DHT records are re-read
    peer_push: bool = True  # inference steps go from peer to peer along the route (each also answers the client)
    push_timeout: float = 1.0  # a pushed step not answered within max(this, 4x the hop's usual answer time) is
    # sent by the client itself, and pushes into that hop stop (a lost push costs this long, not request_timeout)
    direct_connections: bool = True  # inference sessions use a peer's direct TCP address when it serves them (its
    # rpc_info says where; plain TCP, see swarmlm.transport.direct); p2p otherwise, and whenever that connection fails
    swarm_key: Optional[str] = None  # swarm key file of a private swarm (swarmlm.utils.swarm_key); None: a public one
    use_nat_port_map: bool = False  # the client never needs a port mapping: it only dials out
    startup_timeout: float = 60.0  # seconds to wait for the client's p2p daemon to start
    # verification of peers' answers (swarmlm.client.verification): "available" audits every inference session's
    # outputs where another replica or the local checkpoint can recompute them, "required" fails where nothing can,
    # "off" trusts the peers
    verify: str = "available"
    verify_rate: float = 0.1  # probability that an inference step also audits everything so far (besides the
    # audit before generate() returns): a liar is caught sooner, so less work is redone
    verify_tolerance: float = 2e-2  # relative L2 error per token above which an answer counts as wrong
    verify_locally: bool = True  # the client may compute blocks from its own checkpoint (when it holds them) to
    # audit what no other peer can, and to settle disagreements

    check_weights: bool = True  # peers whose announced weights hash differs from the local checkpoint's blocks (when
    # it holds them; read and hashed once) are not used; a different config hash never is (client.weights_check)
    metrics_port: Optional[int] = None  # serve the client's Prometheus metrics (swarmlm.client.metrics) on this port
    # (0: any free one; RemoteSequential.metrics_url says where); None: not served
    metrics_host: str = "127.0.0.1"  # where those metrics listen

    def __post_init__(self):
        if self.verify not in ("off", "available", "required"):
            raise ValueError(f"verify must be off, available or required, got {self.verify!r}")
        if not 0 <= self.verify_rate <= 1 or not self.verify_tolerance > 0:
            raise ValueError("need 0 <= verify_rate <= 1 and verify_tolerance > 0")
