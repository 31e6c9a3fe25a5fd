"""Monitoring: Prometheus metrics of a peer (metrics.py; a trainer's are built on them in
swarmlm.training.metrics), the swarm health report and its web page."""

from swarmlm.monitoring.metrics import PeerMetrics

__all__ = ["PeerMetrics"]
