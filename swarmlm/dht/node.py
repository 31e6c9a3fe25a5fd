"""Starting a hivemind DHT node the way every swarmlm process does (validators, loopback hygiene)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import weakref
from functools import partial
from types import MappingProxyType
from typing import Mapping, Optional

import hivemind
from hivemind.utils.crypto import RSAPrivateKey

from swarmlm.dht.identity import NodeIdentity
from swarmlm.dht.registry import make_validators
from swarmlm.dht.authorizer import SwarmKeyAuthorizer
from swarmlm.utils.swarm_key import SwarmKey
from swarmlm.errors import JoinError

_identities: "weakref.WeakKeyDictionary[hivemind.DHT, NodeIdentity]" = weakref.WeakKeyDictionary()


def create_dht(initial_peers, host_maddrs, announce_maddrs=(), identity_path=None, client_mode=False,
               use_nat_port_map=False, use_relay=True, startup_timeout=60.0, validators=None,
               identity: Optional[NodeIdentity] = None, protected: Mapping[str, bytes] = MappingProxyType({}),
               swarm_key: Optional[SwarmKey] = None) -> hivemind.DHT:
    """A hivemind DHT node with swarmlm's record validators, whose peer id is derived from the key that signs its
    records (`identity`; else loaded from or created at `identity_path`; else a fresh one). `protected`: DHT keys
    this node knows hold swarmlm entries only, with their subkey tags (see swarmlm.dht.validation). `swarm_key`:
    the node talks only to members of that private swarm (swarmlm.utils.swarm_key)."""
    if identity is None:
        identity = NodeIdentity.load_or_create(identity_path)
    kwargs = dict(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        client_mode=client_mode,
        record_validators=list(validators if validators is not None else make_validators(identity, protected)),
        nat_port_map=use_nat_port_map,
        use_relay=use_relay,
        startup_timeout=startup_timeout,
        start=True,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if swarm_key is not None:
        kwargs["authorizer"] = SwarmKeyAuthorizer(swarm_key)
    kwargs["identity_path"] = identity.path
    kwargs["check_if_identity_free"] = not identity.generated  # a fresh key is nobody else's
    try:
        dht = hivemind.DHT(**kwargs)
    except RuntimeError as e:
        if "bootstrap failed" not in str(e):
            raise
        key = "hold another swarm key" if swarm_key is not None else "form a private swarm (this node has no --swarm-key)"
        raise JoinError(f"none of the initial peers answered ({', '.join(map(str, initial_peers))[:300]}): they are "
                        f"down or unreachable, or they {key}") from None
    finally:
        identity.discard_file()  # a temporary one: the p2p daemon has read it
    _identities[dht] = identity
    dht.run_coroutine(partial(_exit_with_parent, parent_pid=os.getpid()), return_future=True)
    return dht


def node_identity(dht: hivemind.DHT) -> NodeIdentity:
    """The identity a DHT node made by create_dht signs its records with."""
    return _identities[dht]


def sign_hivemind_records_as(dht: hivemind.DHT) -> None:
    """hivemind's own components that sign DHT records (hivemind.Optimizer's progress tracker) sign with hivemind's
    process-wide key, and the node can only sign with its identity: makes the two one key. Call before creating such
    a component (one swarmlm DHT node per such process). Uses hivemind's private `RSAPrivateKey._process_wide_key`
    (tests/test_dht_records.py pins it)."""
    RSAPrivateKey._process_wide_key = node_identity(dht).private_key


async def _exit_with_parent(dht: hivemind.DHT, node, *, parent_pid: int, period: float = 0.5) -> None:
    """Runs inside the DHT process: starts a thread that, when the process that started the DHT dies (even
    by SIGKILL), stops the node and its p2p daemon, so a crashed peer leaves no orphan and its streams close
    at once. A plain thread, not a task: the event loop may be stuck (e.g. on a lock the dead parent held)."""
    watcher = threading.Thread(target=_watch_parent, args=(asyncio.get_running_loop(), node, parent_pid, period),
                               name="swarmlm-exit-with-parent", daemon=True)
    watcher.start()


def _watch_parent(loop: asyncio.AbstractEventLoop, node, parent_pid: int, period: float, grace: float = 5.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(period)
    try:
        asyncio.run_coroutine_threadsafe(node.shutdown(), loop).result(grace)
    except BaseException:
        daemon = getattr(getattr(node, "p2p", None), "_child", None)  # the p2p daemon, if the shutdown hung
        if daemon is not None and daemon.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(daemon.pid, signal.SIGKILL)
    finally:
        os._exit(0)


def shutdown_dht(dht: hivemind.DHT, timeout: float = 5.0) -> None:
    """Stops a DHT node's process; kills it if it does not stop in time (so the caller can exit)."""
    dht.shutdown()
    dht.join(timeout)
    if dht.is_alive():
        dht.kill()
        dht.join(timeout)
