"""Starting real swarmlm nodes (`python -m swarmlm.cli ...`) as subprocesses for tests.

A node is ready when it prints its READY line (after its multiaddrs); nothing here sleeps for a
fixed time. Nodes are context managers whose teardown always runs: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

READY_TIMEOUT = 120.0


class NodeProcess:
    def __init__(self, *args: str, env: dict | None = None):
        self.args = args
        self.maddrs: list[str] = []
        self.ready_line = ""
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmlm.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def peer_id(self) -> str:
        """The node's base58 peer id (the last part of its multiaddrs; known once it is ready)."""
        return self.maddrs[0].rsplit("/", 1)[-1]

    @property
    def stderr(self) -> str:
        return "".join(self._stderr[-200:])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "NodeProcess":
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"node {self.args} not ready in {timeout} s; stderr:\n{self.stderr}") from None
            if line is None:
                raise RuntimeError(f"node {self.args} exited with {self.proc.wait()}; stderr:\n{self.stderr}")
            self.stdout_lines.append(line)
            if line.startswith("/"):
                self.maddrs.append(line)
            elif line.startswith("READY"):
                self.ready_line = line
                return self

    def wait_for_line(self, predicate, timeout: float = READY_TIMEOUT) -> str:
        """Reads stdout until a line satisfies `predicate` and returns it (every line read is kept in stdout_lines)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"node {self.args}: no expected line in {timeout} s; stdout:\n"
                                   + "\n".join(self.stdout_lines[-20:]) + f"\nstderr:\n{self.stderr}") from None
            if line is None:
                raise RuntimeError(f"node {self.args} exited with {self.proc.wait()} before the expected line; "
                                   f"stderr:\n{self.stderr}")
            self.stdout_lines.append(line)
            if predicate(line):
                return line

    def terminate(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "NodeProcess":
        try:
            return self.wait_ready()
        except BaseException:
            self.terminate(signal.SIGKILL)
            raise

    def __exit__(self, *exc) -> None:
        self.terminate()


def start_dht() -> NodeProcess:
    return NodeProcess("dht", "--log-level", "warning")


def start_peer(model: str, initial_peer: str, *extra: str) -> NodeProcess:
    return NodeProcess("peer", "--model", model, "--initial-peers", initial_peer, "--num-threads", "1",
                       "--log-level", "info", *extra)
