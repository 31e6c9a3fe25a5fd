"""Typed, signed, expiring DHT records: which peer serves which blocks of which model."""

from swarmlm.dht.records import ServerRecord, ServerState, block_key
from swarmlm.dht.registry import declare_span, fetch_block_records, make_validators

__all__ = ["ServerRecord", "ServerState", "block_key", "declare_span", "fetch_block_records", "make_validators"]
