"""Monitoring: Prometheus metrics of a peer (metrics.py) and of a trainer (trainer_metrics.py), the swarm health
report and its web page."""

from swarmlm.monitoring.metrics import PeerMetrics

__all__ = ["PeerMetrics"]
