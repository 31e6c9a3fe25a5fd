"""Helper processes that die with their trainer.

hivemind.Optimizer forks its averagers as separate processes; if the trainer is killed (SIGKILL, OOM)
they would outlive it as orphans. After `children_die_with_this_process()`, every process this process
forks (os.fork / multiprocessing "fork") asks the Linux kernel for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG). Call it after the DHT is started: the DHT process shuts its p2p daemon down
itself when its parent dies, and must not be killed before it can. Elsewhere than Linux: a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False


def children_die_with_this_process() -> bool:
    """Installs the fork hook once per process; returns False where the platform cannot do it."""
    global _installed
    if not sys.platform.startswith("linux"):
        return False
    if not _installed:
        libc = ctypes.CDLL(None, use_errno=True)
        os.register_at_fork(after_in_child=lambda: libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0))
        _installed = True
    return True
