"""DHT records: wire round trip, validation, and the swarm's rules (owner-signed, owner-bound, capped, protected
keys) enforced by real DHT nodes against a hostile stranger."""

from __future__ import annotations

import math

import pytest
from types import SimpleNamespace

import hivemind
from hivemind.utils import get_dht_time

from swarmlm.dht.identity import NodeIdentity, owner_peer_id
from swarmlm.errors import IdentityError
from swarmlm.dht.node import create_dht, node_identity, shutdown_dht
from swarmlm.dht.records import MAX_RECORD_LIFETIME, MODELS_KEY, ModelRecord, ServerRecord, ServerState, model_keys, model_subkey
from swarmlm.dht.registry import declare_model, declare_span, fetch_block_records, fetch_model_claims, span_subkey


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


@pytest.fixture(scope="module")
def swarm():
    """Two honest swarmlm nodes (a peer-like owner that knows model "m" has 4 blocks, and a reader) and a hostile
    stranger: a plain hivemind node that signs with its own key and enforces none of swarmlm's rules."""
    owner_identity = NodeIdentity.load_or_create()
    owner = create_dht([], ["/ip4/127.0.0.1/tcp/0"], identity=owner_identity, protected=model_keys("m", 4))
    maddrs = [str(m) for m in owner.get_visible_maddrs()]
    reader = create_dht(maddrs, ["/ip4/127.0.0.1/tcp/0"], protected=model_keys("m", 4))
    stranger_identity = NodeIdentity.load_or_create()
    stranger = hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                            nat_port_map=False, identity_path=stranger_identity.path, check_if_identity_free=False,
                            record_validators=[stranger_identity.signer])
    try:
        yield SimpleNamespace(owner=owner, owner_identity=owner_identity, reader=reader, stranger=stranger,
                              stranger_identity=stranger_identity)
    finally:
        for node in (stranger, reader, owner):
            shutdown_dht(node)


def _announce(swarm, record=None, lifetime=60.0):
    record = record or _record(peer_id=swarm.owner.peer_id.to_base58(), end=4)
    return record, declare_span(swarm.owner, "m", record, get_dht_time() + lifetime, swarm.owner_identity.signer)


def test_a_node_peer_id_is_derived_from_its_signing_key(swarm):
    assert swarm.owner_identity.peer_id == swarm.owner.peer_id.to_base58()
    assert owner_peer_id(span_subkey(swarm.owner_identity.signer)) == swarm.owner_identity.peer_id
    assert owner_peer_id(b"swarmlm.span:no marker") is None


def test_only_the_owner_can_write_its_record_and_garbage_is_refused(swarm):
    record, stored = _announce(swarm)
    assert all(stored.values())
    assert fetch_block_records(swarm.reader, "m", 4) == [[record]] * 4
    forged = record.model_copy(update=dict(state=ServerState.OFFLINE))  # under the owner's subkey, unsigned by it
    assert not swarm.reader.store("m.0", forged.to_wire(), get_dht_time() + 60,
                                  subkey=span_subkey(swarm.owner_identity.signer))
    swarm.reader.store("m.3", ("garbage",), get_dht_time() + 60, subkey=span_subkey(node_identity(swarm.reader).signer))
    assert fetch_block_records(swarm.reader, "m", 4) == [[record]] * 4


@pytest.mark.parametrize("state,throughput", [(ServerState.ONLINE, 1e12), (ServerState.OFFLINE, 100.0)])
def test_a_stranger_cannot_speak_for_another_peer(swarm, state, throughput):
    """The stranger signs, with its own key, a record claiming to be the owner: fast (to draw routes to it) or
    OFFLINE (to hide it). Honest nodes refuse it; readers never see it."""
    record, _ = _announce(swarm)
    spoof = record.model_copy(update=dict(state=state, throughput=throughput))
    swarm.stranger.store("m.0", spoof.to_wire(), get_dht_time() + 60, subkey=span_subkey(swarm.stranger_identity.signer))
    assert fetch_block_records(swarm.reader, "m", 4)[0] == [record]
    assert fetch_block_records(swarm.owner, "m", 4)[0] == [record]


def test_a_squat_does_not_erase_a_block_or_block_reannouncements(swarm):
    """A plain value with a far expiration under a block key would replace every peer's entry; honest nodes
    refuse it and the owner's next announcement is stored everywhere."""
    record, _ = _announce(swarm)
    swarm.stranger.store("m.1", "squat", get_dht_time() + 300)
    swarm.stranger.store("m.2", ("a", "foreign", "entry"), get_dht_time() + 300, subkey=b"not-swarmlm")
    assert fetch_block_records(swarm.reader, "m", 4) == [[record]] * 4
    again, _ = _announce(swarm, record.model_copy(update=dict(free_cache_tokens=4)))
    assert fetch_block_records(swarm.reader, "m", 4) == [[again]] * 4
    assert fetch_block_records(swarm.owner, "m", 4) == [[again]] * 4


def test_expirations_are_capped(swarm):
    record = _record(peer_id=swarm.owner.peer_id.to_base58(), end=4).model_copy(update=dict(public_name="late"))
    _announce(swarm, record, lifetime=MAX_RECORD_LIFETIME + 3600)  # honest nodes, the owner's own included, refuse it
    swarm.stranger.store("m.0", "squat", get_dht_time() + 7 * 24 * 3600)
    assert all(r.public_name != "late" for block in fetch_block_records(swarm.reader, "m", 4) for r in block)


def test_the_registry_is_signed_per_peer_and_a_strangers_claim_does_not_win(swarm):
    from swarmlm.monitoring.health import collect_report

    _announce(swarm)
    assert declare_model(swarm.owner, "m", ModelRecord(num_blocks=4, family="llama"), get_dht_time() + 60,
                         swarm.owner_identity.signer)
    fake = ModelRecord(num_blocks=900, family="mistral")
    subkey = model_subkey("m", swarm.stranger_identity.owner_marker)
    swarm.stranger.store(MODELS_KEY, fake.to_wire("m"), get_dht_time() + 300, subkey=subkey)  # its own, signed
    swarm.stranger.store(MODELS_KEY, fake.to_wire("m"), get_dht_time() + 300, subkey="m")  # the old unsigned form
    claims = fetch_model_claims(swarm.reader)
    assert claims["m"][ModelRecord(num_blocks=4, family="llama")] == {swarm.owner_identity.peer_id}
    model = collect_report(swarm.reader, ["m"]).models[0]
    assert (model.registry.family, model.num_blocks) == ("llama", 4)  # the claim of the peer that serves it
    # a claim whose subkey digest names another model is refused
    swarm.reader.store(MODELS_KEY, fake.to_wire("m"), get_dht_time() + 60,
                       subkey=model_subkey("other", node_identity(swarm.reader).owner_marker))
    assert fetch_model_claims(swarm.owner)["m"][fake] == {swarm.stranger_identity.peer_id}


def test_identity_files_must_be_rsa(tmp_path):
    from hivemind.proto import crypto_pb2

    path = tmp_path / "ed25519.key"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"x" * 64).SerializeToString())
    with pytest.raises(IdentityError, match="RSA"):
        NodeIdentity.load_or_create(str(path))
    kept = NodeIdentity.load_or_create(str(tmp_path / "new.key"))  # created at a path that did not exist
    assert NodeIdentity.load_or_create(kept.path).peer_id == kept.peer_id


def test_hivemind_components_sign_with_the_node_identity(swarm):
    """hivemind.Optimizer's progress tracker signs with hivemind's process-wide key (a private class attribute):
    sign_hivemind_records_as makes it the node's identity, else no node could sign the tracker's records."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from swarmlm.dht.node import sign_hivemind_records_as

    saved = RSAPrivateKey._process_wide_key
    try:
        sign_hivemind_records_as(swarm.owner)
        assert RSASignatureValidator().local_public_key == swarm.owner_identity.owner_marker
    finally:
        RSAPrivateKey._process_wide_key = saved
