"""Reading a node's Prometheus metrics in tests: its METRICS url, one scrape, or scrapes until a condition holds."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from swarmlm.local_swarm import NodeProcess


ROUNDS, BYTES = "swarmlm_averaging_rounds_total", "swarmlm_averaging_contributed_bytes_total"  # averaging counters


def metrics_url(node: NodeProcess) -> str:
    """The url the node printed as `METRICS <url>` before READY."""
    urls = [line.split(" ", 1)[1] for line in node.stdout_lines if line.startswith("METRICS ")]
    assert urls, f"the node printed no METRICS line: {node.stdout_lines}"
    return urls[0]


def scrape(url: str) -> dict:
    """{(sample name, frozenset of labels): value} parsed from a /metrics page."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_until(url: str, condition, timeout: float = 30.0) -> dict:
    """Scrapes until `condition(samples)` holds (nodes update some metrics only when an event ends)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics of {url} never met the condition; last scrape: {samples}")
        time.sleep(0.05)  # polling interval, not a wait for an event
