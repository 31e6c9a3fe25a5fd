"""Span records: wire round trip, validation, and owner signatures enforced by real DHT nodes."""

from __future__ import annotations

import math

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarmlm.dht.node import create_dht
from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.dht.registry import declare_span, fetch_block_records, span_subkey
from swarmlm.dht.validation import SpanRecordValidator


def _record(peer_id="12D3KooWexample", state=ServerState.ONLINE, start=0, end=3) -> ServerRecord:
    return ServerRecord(peer_id=peer_id, state=state, start=start, end=end, throughput=100.0, free_cache_tokens=5,
                        max_cache_tokens=10, version="0.1.0", torch_dtype="float32")


def test_wire_round_trip():
    record = _record()
    assert ServerRecord.from_wire(record.to_wire()) == record
    assert ServerRecord.from_wire(list(record.to_wire())) == record  # msgpack gives lists


def test_fields_of_newer_versions_are_ignored():
    record = _record()
    assert ServerRecord.from_wire([*record.to_wire(), "a newer version's field", 7]) == record


@pytest.mark.parametrize(
    "wire",
    [None, (), ("p", 2, 0, 3), ("p", 9, 0, 3, 1.0, 1, 1, "v", "f", None), ("p", 2, 3, 3, 1.0, 1, 1, "v", "f", None),
     ("p", 2, 0, 3, -1.0, 1, 1, "v", "f", None), ("p", 2, "0", 3, 1.0, 1, 1, "v", "f", None)],
)
def test_malformed_wire_is_rejected(wire):
    with pytest.raises(ValueError):
        ServerRecord.from_wire(wire)


@pytest.mark.parametrize("throughput", [math.inf, -math.inf, math.nan])
def test_non_finite_throughput_is_rejected(throughput):
    """A record's numbers end up in `swarmlm health --json`: no inf or NaN, which JSON cannot carry."""
    from swarmlm.models.embedded import DEFAULT_MODEL
    from swarmlm.peer.config import PeerConfig

    wire = list(_record().to_wire())
    wire[4] = throughput
    with pytest.raises(ValueError, match="finite number"):
        ServerRecord.from_wire(wire)
    with pytest.raises(ValueError, match="finite number"):
        ServerRecord(**{**_record().model_dump(), "throughput": throughput})
    with pytest.raises(ValueError, match="finite number"):  # `swarmlm peer --throughput inf` fails at once
        PeerConfig(model=DEFAULT_MODEL, blocks=(0, 1), new_swarm=True, throughput=throughput)


def _validators():
    return RSASignatureValidator(RSAPrivateKey()), SpanRecordValidator()


def test_only_the_owner_can_write_its_record_and_garbage_is_refused():
    owner_validators, other_validators = _validators(), _validators()
    owner = create_dht([], ["/ip4/127.0.0.1/tcp/0"], validators=owner_validators)
    other = create_dht(owner.get_visible_maddrs(), ["/ip4/127.0.0.1/tcp/0"], validators=other_validators)
    try:
        record = _record(peer_id=owner.peer_id.to_base58())
        stored = declare_span(owner, "m", record, get_dht_time() + 30, owner_validators[0])
        assert all(stored.values())
        assert fetch_block_records(other, "m", 4) == [[record], [record], [record], []]

        forged = record.model_copy(update=dict(state=ServerState.OFFLINE))
        assert not other.store("m.0", forged.to_wire(), get_dht_time() + 60, subkey=span_subkey(owner_validators[0]))
        assert not other.store("m.3", ("garbage",), get_dht_time() + 60, subkey=span_subkey(other_validators[0]))
        assert fetch_block_records(owner, "m", 4)[0] == [record]
        assert fetch_block_records(other, "m", 4)[3] == []
    finally:
        other.shutdown()
        owner.shutdown()
