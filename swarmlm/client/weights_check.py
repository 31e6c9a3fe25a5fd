"""Which peers serve the client's model: their span records' hashes against the client's own copy.

Every span record carries the hash of the peer's model config and of its blocks' weights (swarmlm.models
.fingerprint). A record whose config hash differs from the client's config is not used (every client can tell);
one whose weights hash differs from what the client's checkpoint gives for those blocks is not used either, when
the checkpoint holds them (each block is read and hashed once, when a record first needs it). Another fine-tune
served under the same name so never gets the client's traffic; a peer that lies about its hash is left to
verification (swarmlm.client.verification).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

from swarmlm.dht.records import ServerRecord
from swarmlm.experts.families import ModelFamily
from swarmlm.models.checkpoint import load_tensors
from swarmlm.models.fingerprint import BlockDigests, config_hash, span_weights_hash

logger = logging.getLogger(__name__)


class WeightsCheck:
    def __init__(self, checkpoint: Path, family: ModelFamily, model_config, read_blocks: bool = True):
        self.checkpoint, self.family, self.read_blocks = checkpoint, family, read_blocks
        self.config_hash = config_hash(model_config)
        self._digests: dict[int, Optional[bytes]] = {}  # block -> its digest, None if the checkpoint lacks it
        self._lock = threading.Lock()
        self._reported: set[tuple[str, str]] = set()  # (peer id, why) already logged

    def accepts(self, record: ServerRecord) -> bool:
        """Whether routes may use `record`'s peer (see the module docstring)."""
        if record.config_hash != self.config_hash:
            return self._refuse(record, f"another model config (hash {record.config_hash}, ours {self.config_hash})")
        expected = self.expected(record.start, record.end)
        if expected is not None and record.weights_hash != expected:
            return self._refuse(record, f"other weights for blocks {record.start}:{record.end} than the local "
                                        f"checkpoint (hash {record.weights_hash}, ours {expected})")
        return True

    def expected(self, start: int, end: int) -> Optional[str]:
        """The weights hash of blocks [start, end) from the local checkpoint; None where it cannot tell."""
        if not self.read_blocks:
            return None
        with self._lock:
            for block in range(start, end):
                if block not in self._digests:
                    self._digests[block] = self._read(block)
                if self._digests[block] is None:
                    return None
            return span_weights_hash(self.config_hash, self._digests, start, end)

    def _read(self, block: int) -> Optional[bytes]:
        digests = BlockDigests(block)
        try:
            load_tensors(self.checkpoint, lambda name: self.family.block_tensor_name(name, block, block + 1),
                         on_read=digests)
        except (OSError, ValueError) as e:
            logger.info(f"The local checkpoint cannot check the weights of block {block}: {e}")
            return None
        return digests.blocks().get(block)

    def _refuse(self, record: ServerRecord, why: str) -> bool:
        if (record.peer_id, why) not in self._reported:
            self._reported.add((record.peer_id, why))
            logger.warning(f"Not using peer {record.peer_id}: it serves {why}")
        return False
