"""The benchmarks' nodes: swarmlm.local_swarm.NodeProcess (the one launcher of local swarms) with stderr in a
log file, the log level at warning and a startup timeout long enough for large peers."""

from __future__ import annotations

from pathlib import Path

from swarmlm.local_swarm import NodeProcess

STARTUP_TIMEOUT = 600.0  # seconds for a node to print READY (large peers measure their throughput first)


class Node(NodeProcess):
    ready_timeout = STARTUP_TIMEOUT

    def __init__(self, args: list[str], log_path: Path, env: dict, program: tuple[str, ...] = ("-m", "swarmlm.cli")):
        super().__init__(*args, "--log-level", "warning", env=env, stderr_path=log_path, program=program)

    def wait_for(self, prefix: str, timeout: float = STARTUP_TIMEOUT) -> str:
        """Reads lines until one starts with `prefix` and returns it; raises if the node exits or times out."""
        return self.wait_for_line(lambda line: line.startswith(prefix), timeout)
