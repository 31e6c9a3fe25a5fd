"""Local swarms on 127.0.0.1: `python -m swarmlm.cli ...` nodes as child processes.

The one launcher that `swarmlm demo`, the tests and the benchmarks start their nodes with. A node is
ready when it prints its READY line (after its multiaddrs); nothing here sleeps for a fixed time.
Nodes are context managers whose teardown always runs: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

READY_TIMEOUT = 120.0  # seconds for a node to print READY (benchmarks of large models pass more)
STDERR_LINES = 2000  # lines of stderr kept in memory when it does not go to a file


class NodeProcess:
    """One `python -m swarmlm.cli ARGS` process (or `python PROGRAM ARGS`, e.g. a test's modified peer). Its stdout is read line by line as it arrives (every line read
    so far is in `stdout_lines`, multiaddrs in `maddrs`); its stderr goes to `stderr_path` if given, else the
    last STDERR_LINES lines stay in memory (`stderr`)."""

    ready_timeout = READY_TIMEOUT  # default of wait_ready and wait_for_line, in seconds

    def __init__(self, *args: str, env: Optional[dict] = None, stderr_path: Optional[Path] = None,
                 program: tuple[str, ...] = ("-m", "swarmlm.cli")):
        self.args = args
        self.maddrs: list[str] = []
        self.ready_line = ""
        self.stdout_lines: list[str] = []
        self.stderr_path = Path(stderr_path) if stderr_path is not None else None
        self._stderr_file = open(self.stderr_path, "w") if self.stderr_path is not None else None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._lines: queue.Queue = queue.Queue()  # (time.monotonic() when read, line), then (time, None) at exit
        self.proc = subprocess.Popen(
            [sys.executable, *program, *args], stdout=subprocess.PIPE,
            stderr=self._stderr_file if self._stderr_file is not None else subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        threading.Thread(target=self._pump_stdout, daemon=True).start()  # also keeps draining the pipe
        if self._stderr_file is None:
            threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put((time.monotonic(), line.rstrip("\n")))
        self._lines.put((time.monotonic(), None))

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr_tail.append(line)

    @property
    def peer_id(self) -> str:
        """The node's base58 peer id (the last part of its multiaddrs; known once it is ready)."""
        return self.maddrs[0].rsplit("/", 1)[-1]

    @property
    def stderr(self) -> str:
        """The end of what the node wrote to stderr."""
        if self.stderr_path is not None:
            if not self._stderr_file.closed:
                self._stderr_file.flush()
            return self.stderr_path.read_text(errors="replace")[-20000:]
        return "".join(list(self._stderr_tail)[-200:])

    def line_arrived(self, arrived: float, line: str) -> None:
        """Called for every stdout line read (`arrived`: time.monotonic() when it was read); subclasses record more."""

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: Optional[float] = None) -> str:
        """Reads stdout until a line satisfies `predicate` and returns it; raises if the node exits or times out
        (after `timeout` s, default `ready_timeout`)."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                arrived, line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"node {self.args}: no expected line in {timeout} s; stdout:\n"
                                   + "\n".join(self.stdout_lines[-20:]) + f"\nstderr:\n{self.stderr}") from None
            if line is None:
                raise RuntimeError(f"node {self.args} exited with {self.proc.wait()} before the expected line; "
                                   f"stderr:\n{self.stderr}")
            self.stdout_lines.append(line)
            if line.startswith("/"):
                self.maddrs.append(line)
            elif line.startswith("READY"):
                self.ready_line = line
            self.line_arrived(arrived, line)
            if predicate(line):
                return line

    def wait_ready(self, timeout: Optional[float] = None) -> "NodeProcess":
        self.wait_for_line(lambda line: line.startswith("READY"), timeout)
        return self

    def terminate(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        """Sends `sig` (SIGTERM: a graceful leave) and waits up to `timeout` s, then kills; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr_file is not None and not self._stderr_file.closed:
            self._stderr_file.close()
        return self.proc.returncode

    def __enter__(self) -> "NodeProcess":
        try:
            return self.wait_ready()
        except BaseException:
            self.terminate(signal.SIGKILL)
            raise

    def __exit__(self, *exc) -> None:
        self.terminate()


def stop_all(nodes, timeout: float = 30.0) -> None:
    """Sends SIGTERM to every node at once, then waits for each (SIGKILL after `timeout`): they leave in parallel."""
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.terminate(timeout=timeout)


def start_dht(*extra: str, log_level: str = "warning", **node_kwargs) -> NodeProcess:
    """A bootstrap DHT node (`swarmlm dht`); extra CLI arguments in `extra`."""
    return NodeProcess("dht", "--log-level", log_level, *extra, **node_kwargs)


def start_peer(model: str, initial_peer: str, *extra: str, num_threads: int = 1, log_level: str = "info",
               **node_kwargs) -> NodeProcess:
    """A peer (`swarmlm peer`) joining through `initial_peer`; its blocks and other CLI arguments in `extra`."""
    return NodeProcess("peer", "--model", model, "--initial-peers", initial_peer, "--num-threads", str(num_threads),
                       "--log-level", log_level, *extra, **node_kwargs)


@contextlib.contextmanager
def local_swarm(model: str, spans: list[str], *peer_args: str, **peer_kwargs) -> Iterator[tuple]:
    """A bootstrap DHT node plus one peer per span ("A:B"), started together, ready on entry, all torn down on
    exit; yields (dht, peers)."""
    with contextlib.ExitStack() as stack:
        dht = stack.enter_context(start_dht())
        peers: list[NodeProcess] = []
        stack.callback(stop_all, peers)  # every peer started is torn down, even if another never gets ready
        for span in spans:  # all start at once
            peers.append(start_peer(model, dht.maddrs[0], "--blocks", span, *peer_args, **peer_kwargs))
        for peer in peers:
            peer.wait_ready()
        yield dht, peers
