"""Announce and look up span records over hivemind.DHT."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

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
):
    """Stores `record` under every block key of its span, signed with this process's key."""
    keys = [block_key(model, i) for i in range(record.start, record.end)]
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
