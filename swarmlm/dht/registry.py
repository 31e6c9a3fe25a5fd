"""Announce and look up span records and the model registry over hivemind.DHT."""

from __future__ import annotations

from functools import partial
from types import MappingProxyType
from typing import Iterable, Mapping, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from swarmlm.dht.identity import NodeIdentity, owner_peer_id
from swarmlm.dht.records import (
    MODELS_KEY,
    SPAN_SUBKEY_TAG,
    ModelRecord,
    ServerRecord,
    ServerState,
    block_key,
    model_subkey,
    model_subkey_digest,
    parse_model_subkey,
)
from swarmlm.dht.validation import SwarmRecordValidator


def make_validators(identity: NodeIdentity, protected: Mapping[str, bytes] = MappingProxyType({})
                    ) -> tuple[RSASignatureValidator, SwarmRecordValidator]:
    """The record validators every swarmlm DHT node installs (bootstrap, peers, clients): signatures by the node's
    own identity key, then swarmlm's rules (see swarmlm.dht.validation)."""
    return identity.signer, SwarmRecordValidator(protected)


def span_subkey(signature_validator: RSASignatureValidator) -> bytes:
    return SPAN_SUBKEY_TAG + signature_validator.local_public_key


def declare_span(
    dht: hivemind.DHT,
    model: str,
    record: ServerRecord,
    expiration_time: float,
    signature_validator: RSASignatureValidator,
    wait: bool = True,
    blocks: Optional[Iterable[int]] = None,
):
    """Stores `record` under every block key of its span (or only under those of `blocks`), signed with
    this process's key. Each block key holds one entry per peer, so a peer may state different things
    about different blocks (e.g. while it moves: ONLINE where it serves, JOINING where it loads)."""
    blocks = range(record.start, record.end) if blocks is None else list(blocks)
    keys = [block_key(model, i) for i in blocks]
    store = partial(
        _store,
        keys=keys,
        subkey=span_subkey(signature_validator),
        value=record.to_wire(),
        expiration_time=expiration_time,
    )
    return dht.run_coroutine(store, return_future=not wait)


async def _store(dht: hivemind.DHT, node, *, keys, subkey, value, expiration_time) -> dict:
    n = len(keys)
    return await node.store_many(keys, [value] * n, [expiration_time] * n, subkeys=[subkey] * n)


def fetch_block_records(dht: hivemind.DHT, model: str, num_blocks: int, latest: bool = True) -> list[list[ServerRecord]]:
    """For each block 0..num_blocks-1, the valid, unexpired records of peers serving it (any state)."""
    return dht.run_coroutine(partial(_fetch, model=model, num_blocks=num_blocks, latest=latest))


async def _fetch(dht: hivemind.DHT, node, *, model: str, num_blocks: int, latest: bool) -> list[list[ServerRecord]]:
    keys = [block_key(model, i) for i in range(num_blocks)]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    now = get_dht_time()
    result = []
    for key in keys:
        entry = found.get(key)
        records: dict[str, tuple[float, ServerRecord]] = {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                if not isinstance(subkey, bytes) or not subkey.startswith(SPAN_SUBKEY_TAG) or item.expiration_time < now:
                    continue
                try:
                    record = ServerRecord.from_wire(item.value)
                except ValueError:
                    continue
                if record.peer_id != owner_peer_id(subkey):
                    continue  # a record speaks only for the peer that signed it (storing nodes check this too)
                previous = records.get(record.peer_id)
                if previous is None or previous[0] < item.expiration_time:
                    records[record.peer_id] = (item.expiration_time, record)  # a restarted peer: keep the newest
        result.append([record for _, record in records.values()])
    return result


def online(records: Sequence[ServerRecord]) -> list[ServerRecord]:
    return [r for r in records if r.state == ServerState.ONLINE]


# ---- model registry: which models the swarm serves, and how many blocks each has ----------------


def declare_model(dht: hivemind.DHT, model: str, record: ModelRecord, expiration_time: float,
                  signer: RSASignatureValidator, wait: bool = True):
    """Registers `model` in the swarm's model registry until `expiration_time`, in this node's own signed entry."""
    store = partial(_store_model, subkey=model_subkey(model, signer.local_public_key), value=record.to_wire(model),
                    expiration_time=expiration_time)
    return dht.run_coroutine(store, return_future=not wait)


async def _store_model(dht: hivemind.DHT, node, *, subkey: bytes, value: tuple, expiration_time: float) -> bool:
    return await node.store(MODELS_KEY, value, expiration_time, subkey=subkey)


def fetch_model_claims(dht: hivemind.DHT) -> dict[str, dict[ModelRecord, set[str]]]:
    """Every claim in the model registry: {model name: {record: peer ids that signed it}}. Anyone may sign a
    claim; a reader that must choose prefers those signed by peers that serve the model (monitoring.health)."""
    return dht.run_coroutine(_fetch_model_claims)


async def _fetch_model_claims(dht: hivemind.DHT, node) -> dict[str, dict[ModelRecord, set[str]]]:
    found = await node.get(MODELS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    now = get_dht_time()
    claims: dict[str, dict[ModelRecord, set[str]]] = {}
    for subkey, item in found.value.items():
        owner = owner_peer_id(subkey) if isinstance(subkey, bytes) else None
        if owner is None or item.expiration_time < now:
            continue
        try:
            name, record = ModelRecord.from_wire(item.value)
        except ValueError:
            continue
        if parse_model_subkey(subkey) == model_subkey_digest(name):
            claims.setdefault(name, {}).setdefault(record, set()).add(owner)
    return claims


def count_dht_peers(dht: hivemind.DHT, timeout: Optional[float] = None) -> int:
    """How many DHT peers this node knows: the nodes in its Kademlia routing table's buckets."""
    return dht.run_coroutine(_count_dht_peers, return_future=True).result(timeout)


async def _count_dht_peers(dht: hivemind.DHT, node) -> int:
    return sum(len(bucket.nodes_to_peer_id) for bucket in node.protocol.routing_table.buckets)
