"""Who trains in a run: every trainer announces itself under "{run_id}_trainers" in the DHT (subkey: its owner-signed
trainer tag, so the entry speaks only for the peer id derived from its key; value: its data shard and, once it has
finished, its final epoch and parameter hash), refreshed every `period` seconds and expiring after 2 x period, so a
killed trainer drops out on its own.

Used to wait until a run has enough trainers before the first step (`--min-peers`), to warn when two live
trainers were given the same shard (they would train on the same samples), and to end a run in agreement
(see finish.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Optional

import hivemind
from hivemind.utils import get_dht_time

from swarmlm.dht.identity import owner_peer_id
from swarmlm.dht.node import node_identity
from swarmlm.dht.records import TRAINER_SUBKEY_TAG, roster_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerEntry:
    peer_id: str
    shard_index: int
    num_shards: int
    finished_epoch: Optional[int] = None  # set once the trainer has reached the run's last epoch
    param_hash: Optional[str] = None  # its parameters' hash once finished

    def to_wire(self) -> dict:
        return dict(shard_index=self.shard_index, num_shards=self.num_shards, finished_epoch=self.finished_epoch,
                    param_hash=self.param_hash)

    @classmethod
    def from_wire(cls, peer_id, value) -> Optional["TrainerEntry"]:
        """Parses a remote value; None when it is malformed (remote data is never trusted)."""
        if not isinstance(peer_id, str) or not isinstance(value, dict):
            return None
        shard_index, num_shards = value.get("shard_index"), value.get("num_shards")
        finished_epoch, param_hash = value.get("finished_epoch"), value.get("param_hash")
        if not (isinstance(shard_index, int) and isinstance(num_shards, int)
                and (finished_epoch is None or isinstance(finished_epoch, int))
                and (param_hash is None or (isinstance(param_hash, str) and len(param_hash) <= 128))):
            return None
        return cls(peer_id, shard_index, num_shards, finished_epoch, param_hash)


class Roster:
    def __init__(self, dht: hivemind.DHT, run_id: str, shard_index: int, num_shards: int, period: float = 5.0):
        self.dht, self.key, self.period = dht, roster_key(run_id), period
        self.me = TrainerEntry(str(dht.peer_id), shard_index, num_shards)
        self._subkey = TRAINER_SUBKEY_TAG + node_identity(dht).owner_marker
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Announces this trainer now and keeps the announcement fresh in a background thread."""
        self._announce()
        self._thread = threading.Thread(target=self._refresh, name="roster", daemon=True)
        self._thread.start()

    def announce_finished(self, epoch: int, param_hash: str) -> None:
        self.me = dataclasses.replace(self.me, finished_epoch=epoch, param_hash=param_hash)
        self._announce()

    def _refresh(self) -> None:
        while not self._stop.wait(self.period):
            self._announce()

    def _announce(self, leaving: bool = False) -> None:
        value = None if leaving else self.me.to_wire()
        self.dht.store(self.key, value, get_dht_time() + 2 * self.period, subkey=self._subkey)

    def members(self) -> list[TrainerEntry]:
        """Live trainers of the run (this one included once announced); malformed entries are skipped."""
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        entries = (TrainerEntry.from_wire(owner_peer_id(subkey), getattr(item, "value", None))
                   for subkey, item in found.value.items()
                   if isinstance(subkey, bytes) and subkey.startswith(TRAINER_SUBKEY_TAG))
        return [entry for entry in entries if entry is not None]

    def wait_for(self, count: int, stop: threading.Event, poll: float = 0.5, log_every: float = 30.0) -> int:
        """Blocks until at least `count` trainers are in the run (or `stop` is set); returns how many are."""
        last_log = time.monotonic()
        while True:
            present = len(self.members())
            if present >= count or stop.is_set():
                return present
            if time.monotonic() - last_log > log_every:
                logger.info(f"Waiting for trainers: {present} of {count} have joined")
                last_log = time.monotonic()
            stop.wait(poll)

    def shard_conflicts(self) -> list[str]:
        """Peer ids of other live trainers that were given this trainer's shard."""
        if self.me.num_shards == 1:
            return []
        mine = (self.me.shard_index, self.me.num_shards)
        return [e.peer_id for e in self.members()
                if e.peer_id != self.me.peer_id and (e.shard_index, e.num_shards) == mine]

    def shutdown(self) -> None:
        """Stops refreshing and removes this trainer from the run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._announce(leaving=True)
        except Exception as e:  # the DHT may already be gone; the entry then expires on its own
            logger.debug(f"Could not remove {self.me.peer_id} from the roster: {e!r}")
