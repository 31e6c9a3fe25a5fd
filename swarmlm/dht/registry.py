"""Announce and look up span records and the model registry over hivemind.DHT."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarmlm.dht.records import SPAN_SUBKEY_TAG, ServerRecord, ServerState, block_key
from swarmlm.dht.validation import SpanRecordValidator


def make_validators() -> tuple[RSASignatureValidator, SpanRecordValidator]:
    """The record validators every swarmlm DHT node installs (bootstrap, peers, clients)."""
    return RSASignatureValidator(), SpanRecordValidator()


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
                previous = records.get(record.peer_id)
                if previous is None or previous[0] < item.expiration_time:
                    records[record.peer_id] = (item.expiration_time, record)  # a restarted peer: keep the newest
        result.append([record for _, record in records.values()])
    return result


def online(records: Sequence[ServerRecord]) -> list[ServerRecord]:
    return [r for r in records if r.state == ServerState.ONLINE]


# ---- model registry: which models the swarm serves, and how many blocks each has ----------------

MODELS_KEY = "swarmlm.models"  # one DHT key for all models; subkey = the model's DHT name
MAX_MODEL_NAME_LENGTH = 256


class ModelRecord(BaseModel):
    """What a peer tells the swarm about the model it serves (stored under MODELS_KEY, subkey = model name).

    Every peer of the model writes the same value; the latest write wins. Unsigned: readers must
    treat it as a hint and parse it with `from_wire` (never trust its shape).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_blocks: int = Field(ge=1, le=100_000)  # decoder blocks of the whole model
    family: str = Field(min_length=1, max_length=32)  # HF config.model_type of the family, e.g. "llama"

    def to_wire(self) -> tuple:
        return (self.num_blocks, self.family)

    @classmethod
    def from_wire(cls, wire: Any) -> "ModelRecord":
        """Parses a wire tuple; raises ValueError on anything malformed."""
        if not isinstance(wire, (list, tuple)) or len(wire) != 2:
            raise ValueError(f"a ModelRecord is a 2-tuple, got {type(wire).__name__}")
        try:
            return cls.model_validate(dict(zip(cls.model_fields, wire)))
        except ValidationError as e:
            raise ValueError(str(e)) from None


def declare_model(dht: hivemind.DHT, model: str, record: ModelRecord, expiration_time: float, wait: bool = True):
    """Registers `model` in the swarm's model registry until `expiration_time`."""
    store = partial(_store_model, model=model, value=record.to_wire(), expiration_time=expiration_time)
    return dht.run_coroutine(store, return_future=not wait)


async def _store_model(dht: hivemind.DHT, node, *, model: str, value: tuple, expiration_time: float) -> bool:
    return await node.store(MODELS_KEY, value, expiration_time, subkey=model)


def fetch_models(dht: hivemind.DHT) -> dict[str, ModelRecord]:
    """The unexpired, well-formed entries of the model registry: {model name: ModelRecord}."""
    return dht.run_coroutine(_fetch_models)


async def _fetch_models(dht: hivemind.DHT, node) -> dict[str, ModelRecord]:
    found = await node.get(MODELS_KEY, latest=True)
    models: dict[str, ModelRecord] = {}
    if found is None or not isinstance(found.value, dict):
        return models
    now = get_dht_time()
    for name, item in found.value.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MODEL_NAME_LENGTH or item.expiration_time < now:
            continue
        try:
            models[name] = ModelRecord.from_wire(item.value)
        except ValueError:
            continue
    return models


def count_dht_peers(dht: hivemind.DHT, timeout: Optional[float] = None) -> int:
    """How many DHT peers this node knows: the nodes in its Kademlia routing table's buckets."""
    return dht.run_coroutine(_count_dht_peers, return_future=True).result(timeout)


async def _count_dht_peers(dht: hivemind.DHT, node) -> int:
    return sum(len(bucket.nodes_to_peer_id) for bucket in node.protocol.routing_table.buckets)
