"""A peer whose part dies (its p2p daemon, its DHT process) says which, leaves, and exits with status 1, for a
supervisor to restart it: it never lingers half alive, announcing nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from swarmlm.local_swarm import start_dht, start_peer

from swarmlm.models.embedded import DEFAULT_MODEL
from swarmlm.peer.watchdog import Watchdog


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name), from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        table[int(stat.parent.name)] = (int(text[text.rindex(")") + 2:].split()[1]), name)
    return table


def _p2p_daemon_of(pid: int) -> tuple[int, int]:
    """(the p2p daemon among `pid`'s descendants, its parent: the peer's DHT process)."""
    table, tree, frontier = _processes(), set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - tree
    daemons = [p for p in tree if table[p][1] == "p2pd"]
    assert len(daemons) == 1, {p: table[p] for p in tree}
    return daemons[0], table[daemons[0]][0]


@pytest.mark.parametrize("victim, part", [("p2p daemon", "p2p daemon"), ("DHT process", "DHT process")])
def test_a_peer_whose_part_dies_exits_with_status_1(tiny_model_path, victim, part):
    with start_dht() as dht:
        with start_peer(DEFAULT_MODEL, dht.maddrs[0], "--blocks", "0:8", "--health-check-period", "0.5") as peer:
            daemon, dht_process = _p2p_daemon_of(peer.proc.pid)
            assert dht_process != peer.proc.pid  # the daemon belongs to the peer's DHT process
            try:
                os.kill(daemon if victim == "p2p daemon" else dht_process, signal.SIGKILL)
                assert peer.proc.wait(timeout=120) == 1
                assert f"Peer stopped: {part}: " in peer.stderr, peer.stderr[-3000:]
            finally:  # a daemon whose DHT process was killed would linger until its idle timeout
                if _processes().get(daemon, (0, ""))[1] == "p2pd":
                    os.kill(daemon, signal.SIGKILL)


def test_checks_run_in_order_and_a_check_that_raises_fails_its_part():
    state = {"dht": None}
    watchdog = Watchdog({"dht": lambda: state["dht"], "broken": lambda: 1 / 0}, period=3600, on_failure=print)
    assert watchdog.check_once() == "broken: its check failed (ZeroDivisionError: division by zero)"
    state["dht"] = "it exited (code -9)"
    assert watchdog.check_once() == "dht: it exited (code -9)"  # checks run in order; the first failure is named
