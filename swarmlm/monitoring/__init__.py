"""Monitoring: a peer's Prometheus metrics, the swarm health report and its web page."""

from swarmlm.monitoring.metrics import PeerMetrics

__all__ = ["PeerMetrics"]
