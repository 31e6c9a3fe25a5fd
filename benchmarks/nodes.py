"""`python -m swarmlm.cli ...` subprocesses for the benchmarks: stdout read line by line as it arrives,
stderr to a log file, multiaddrs collected, stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

STARTUP_TIMEOUT = 600.0  # seconds for a node to print READY (large peers measure their throughput first)


class Node:
    def __init__(self, args: list[str], log_path: Path, env: dict):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "swarmlm.cli", *args, "--log-level", "warning"],
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self.maddrs: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()  # also keeps draining the pipe

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put((time.monotonic(), line.strip()))
        self._lines.put((time.monotonic(), None))

    def on_line(self, arrived: float, line: str) -> None:
        """Called for every line read (`arrived`: time.monotonic() when it was read); subclasses record more."""
        if line.startswith("/"):
            self.maddrs.append(line)

    def wait_for(self, prefix: str, timeout: float = STARTUP_TIMEOUT) -> str:
        """Reads lines until one starts with `prefix` and returns it; raises if the node exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                arrived, line = self._lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                line = None
            if line is None:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.proc.args[3:5]} did not print {prefix} (exit code {self.proc.poll()}):\n{tail}")
            self.on_line(arrived, line)
            if line.startswith(prefix):
                return line

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> list[str]:
        """Waits for the READY line; returns the multiaddrs printed before it."""
        self.wait_for("READY", timeout)
        return self.maddrs

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
