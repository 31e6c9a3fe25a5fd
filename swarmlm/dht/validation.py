"""DHT record validation: span records must be signed by their owner and parse as ServerRecord."""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from swarmlm.dht.records import SPAN_SUBKEY_TAG, ServerRecord


class SpanRecordValidator(RecordValidatorBase):
    """Rejects any value stored under a span subkey unless it is a well-formed, owner-signed ServerRecord.

    Runs after RSASignatureValidator (lower priority), which checks the signature and strips it.
    Every node (bootstrap, peers, clients) installs it, so malformed records are refused on store.
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:
            return True  # not ours
        if not isinstance(subkey, bytes) or not subkey.startswith(SPAN_SUBKEY_TAG):
            return True  # not a span record: other validators decide
        if RSASignatureValidator.PUBLIC_KEY_FORMAT.split(b"_key_")[0] not in subkey:
            return False  # span records must be protected by the owner's key
        try:
            ServerRecord.from_wire(MSGPackSerializer.loads(record.value))
        except Exception:
            return False
        return True

    @property
    def priority(self) -> int:
        return 5  # after the signature validator (10)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SpanRecordValidator)
