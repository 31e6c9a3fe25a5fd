"""What a swarmlm DHT node stores and accepts: owner-signed, owner-bound, short-lived records under swarmlm keys.

Every swarmlm node (bootstrap, peer, trainer, client) installs `SwarmRecordValidator` after hivemind's
`RSASignatureValidator` (which checks and strips the signature), so storing nodes refuse bad values and readers
drop them from answers. Rules:

- Expiration: no record may expire more than MAX_RECORD_LIFETIME ahead (a squat cannot outlive a short window).
- A value under a swarmlm subkey (span, model, trainer tags) is signed by the key in its subkey, parses, and
  speaks only for the peer id derived from that key (a span record's `peer_id` must be the signer's).
- Protected keys (the model registry, each registered model's block keys, the roster keys of known runs) hold
  nothing else: no plain value (which would replace every peer's entry), no foreign subkey. The validator
  learns a model's block keys from the (signed) registry entries it sees, and knows the keys it is given.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarmlm.dht.identity import owner_peer_id
from swarmlm.dht.records import (
    MAX_RECORD_LIFETIME,
    MODEL_SUBKEY_TAG,
    MODELS_KEY,
    SPAN_SUBKEY_TAG,
    TRAINER_SUBKEY_TAG,
    ModelRecord,
    ServerRecord,
    block_key,
    model_subkey_digest,
    parse_model_subkey,
)

MAX_LEARNED_MODELS = 256  # models whose block keys a node protects after seeing their registry entries
TAGS = (SPAN_SUBKEY_TAG, MODEL_SUBKEY_TAG, TRAINER_SUBKEY_TAG)
CLOCK_TOLERANCE = 10.0  # seconds of clock skew between honest nodes that the expiration cap allows


def key_id(key: str) -> bytes:
    """The bytes a DHT record carries for `key` (hivemind stores and validates by this hash)."""
    return DHTID.generate(source=key).to_bytes()


class SwarmRecordValidator(RecordValidatorBase):
    """See the module docstring. `protected`: DHT keys known up front to hold swarmlm entries only, each with the
    subkey tag its entries have (e.g. records.model_keys, a trainer's roster key)."""

    def __init__(self, protected: Mapping[str, bytes] = MappingProxyType({})):
        self._tags: dict[bytes, bytes] = {key_id(MODELS_KEY): MODEL_SUBKEY_TAG}  # protected key id -> the tag it holds
        for key, tag in protected.items():
            if tag not in TAGS:
                raise ValueError(f"unknown subkey tag {tag!r}")
            self._tags[key_id(key)] = tag
        self._learned: dict[str, int] = {}  # model name -> blocks protected

    def validate(self, record: DHTRecord) -> bool:
        if record.expiration_time > get_dht_time() + MAX_RECORD_LIFETIME + CLOCK_TOLERANCE:
            return False
        subkey = self._subkey(record)
        tag = next((t for t in TAGS if isinstance(subkey, bytes) and subkey.startswith(t)), None)
        required = self._tags.get(record.key)
        if required is not None and tag != required:
            return False  # a protected key holds only its own kind of owner-signed entries
        if tag is None:
            return True  # not ours: hivemind's own records (averaging, progress)
        owner = owner_peer_id(subkey)
        if owner is None:
            return False  # swarmlm entries are always signed (RSASignatureValidator checked the signature)
        try:
            value = MSGPackSerializer.loads(record.value)
            if tag == SPAN_SUBKEY_TAG:
                return ServerRecord.from_wire(value).peer_id == owner
            if tag == MODEL_SUBKEY_TAG:
                return self._check_model(subkey, value)
            return value is None or isinstance(value, dict)  # a trainer's entry (None: it left)
        except Exception:
            return False

    @staticmethod
    def _subkey(record: DHTRecord):
        if not record.subkey:
            return None
        try:
            return MSGPackSerializer.loads(record.subkey)
        except Exception:
            return None

    def _check_model(self, subkey: bytes, value) -> bool:
        name, model = ModelRecord.from_wire(value)
        if parse_model_subkey(subkey) != model_subkey_digest(name):
            return False
        self._learn(name, model.num_blocks)
        return True

    def _learn(self, name: str, num_blocks: int) -> None:
        known = self._learned.get(name, 0)
        if known >= num_blocks or (not known and len(self._learned) >= MAX_LEARNED_MODELS):
            return
        for block in range(known, num_blocks):
            self._tags.setdefault(key_id(block_key(name, block)), SPAN_SUBKEY_TAG)
        self._learned[name] = num_blocks

    def protects(self, key: str) -> Optional[bytes]:
        """The tag that entries under `key` must have, if the key is protected."""
        return self._tags.get(key_id(key))

    @property
    def priority(self) -> int:
        return 5  # after the signature validator (10)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, SwarmRecordValidator):
            return False
        self._tags.update({k: v for k, v in other._tags.items() if k not in self._tags})
        return True
