"""ServerRecord: "peer P serves blocks [start, end) of model M", with its wire form.

Stored under one DHT key per block (`block_key(model, i)`), subkey = the owner's signed marker,
so each peer can only write its own entry. The DHT only ever sees `to_wire()`.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SPAN_SUBKEY_TAG = b"swarmlm.span:"  # prefix of every subkey holding a ServerRecord (then the owner's marker)
MODEL_SUBKEY_TAG = b"swarmlm.model:"  # prefix of a model registry subkey (then the name's digest, the owner's marker)
TRAINER_SUBKEY_TAG = b"swarmlm.trainer:"  # prefix of a training roster subkey (then the owner's marker)
MODELS_KEY = "swarmlm.models"  # one DHT key for the whole model registry: one entry per (model, peer)
MAX_MODEL_NAME_LENGTH = 256
MAX_MODEL_BLOCKS = 1024  # more decoder blocks than any model has; bounds what one registry entry makes readers fetch
MAX_RECORD_LIFETIME = 600.0  # seconds: no swarmlm node stores a record expiring later than this from now
MAX_DHT_TIME_DISCREPANCY_SECONDS = 3.0
MIN_WIRE_FIELDS, MAX_WIRE_FIELDS = 10, 32  # a ServerRecord's wire tuple: the fields up to torch_dtype are required


class ServerState(enum.IntEnum):
    OFFLINE = 0  # announced on graceful shutdown, until the record expires
    JOINING = 1  # loading weights
    ONLINE = 2  # serving requests


class ServerRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)  # base58 libp2p peer id that serves the span
    state: ServerState
    start: int = Field(ge=0)  # first block served (inclusive)
    end: int = Field(ge=1)  # last block served (exclusive)
    # tokens/s one block processes in single-token inference steps; finite, so that reports stay valid JSON
    throughput: float = Field(ge=0, allow_inf_nan=False)
    free_cache_tokens: int = Field(ge=0)  # KV-cache tokens not reserved by sessions
    max_cache_tokens: int = Field(ge=0)  # the peer's whole KV-cache budget in tokens
    version: str = Field(max_length=32)  # swarmlm version of the peer
    torch_dtype: str = Field(max_length=16)  # dtype the blocks compute in
    public_name: Optional[str] = Field(default=None, max_length=64)  # optional human-readable name
    movable: bool = False  # the peer chose its blocks (--num-blocks) and may move to where the swarm is weak
    config_hash: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{16}$")  # of the model's config
    weights_hash: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{32}$")  # of the config and blocks
    # [start, end)'s weights (swarmlm.models.fingerprint); None while some are not loaded (a JOINING move)

    @model_validator(mode="after")
    def _span_not_empty(self) -> "ServerRecord":
        if self.end <= self.start:
            raise ValueError(f"empty span {self.start}:{self.end}")
        return self

    def to_wire(self) -> tuple:
        return (self.peer_id, int(self.state), self.start, self.end, self.throughput, self.free_cache_tokens,
                self.max_cache_tokens, self.version, self.torch_dtype, self.public_name, self.movable,
                self.config_hash, self.weights_hash)

    @classmethod
    def from_wire(cls, wire: Any) -> "ServerRecord":
        """Parses a wire tuple; raises ValueError on anything malformed. Elements beyond the known fields (a newer
        version's) are ignored."""
        if not isinstance(wire, (list, tuple)) or not MIN_WIRE_FIELDS <= len(wire) <= MAX_WIRE_FIELDS:
            raise ValueError(f"a ServerRecord is a tuple of {MIN_WIRE_FIELDS} to {MAX_WIRE_FIELDS} fields, "
                             f"got {type(wire).__name__}")
        names = list(cls.model_fields)
        values = dict(zip(names, wire))
        if isinstance(values["state"], int) and not isinstance(values["state"], bool):
            try:
                values["state"] = ServerState(values["state"])
            except ValueError as e:
                raise ValueError(str(e)) from None
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ValueError(str(e)) from None


def block_key(model: str, block: int) -> str:
    return f"{model}.{block}"


def model_keys(model: str, num_blocks: int) -> dict[str, bytes]:
    """The DHT keys that hold `model`'s span records, with their subkey tag (a node that knows them protects them)."""
    return {block_key(model, block): SPAN_SUBKEY_TAG for block in range(min(num_blocks, MAX_MODEL_BLOCKS))}


def roster_key(run_id: str) -> str:
    """The DHT key of a training run's roster (entries: TRAINER_SUBKEY_TAG + the trainer's owner marker)."""
    return f"{run_id}_trainers"


def record_expiration(update_period: float) -> float:
    """How long an announcement lives: two update periods (at least the DHT clock tolerance, at most the cap)."""
    return min(max(2 * update_period, MAX_DHT_TIME_DISCREPANCY_SECONDS), MAX_RECORD_LIFETIME)


class ModelRecord(BaseModel):
    """What a peer tells the swarm about the model it serves: one owner-signed registry entry per (model, peer),
    stored under MODELS_KEY. Readers believe the value signed by the most peers that serve the model
    (monitoring.health)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_blocks: int = Field(ge=1, le=MAX_MODEL_BLOCKS)  # decoder blocks of the whole model
    family: str = Field(min_length=1, max_length=32)  # HF config.model_type of the family, e.g. "llama"

    def to_wire(self, name: str) -> tuple:
        return (name, self.num_blocks, self.family)

    @classmethod
    def from_wire(cls, wire: Any) -> tuple[str, "ModelRecord"]:
        """Parses a registry value into (model name, record); raises ValueError on anything malformed."""
        if not isinstance(wire, (list, tuple)) or len(wire) != 3:
            raise ValueError(f"a registry entry is a 3-tuple, got {type(wire).__name__}")
        name = wire[0]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MODEL_NAME_LENGTH:
            raise ValueError("a model name is a string of 1 to 256 characters")
        try:
            return name, cls.model_validate(dict(zip(cls.model_fields, wire[1:])))
        except ValidationError as e:
            raise ValueError(str(e)) from None


def model_subkey_digest(name: str) -> bytes:
    """What a registry subkey holds between its tag and its owner marker: a digest of the model's name."""
    return hashlib.sha256(name.encode()).hexdigest()[:32].encode()


def model_subkey(name: str, owner_marker: bytes) -> bytes:
    return MODEL_SUBKEY_TAG + model_subkey_digest(name) + owner_marker


def parse_model_subkey(subkey: bytes) -> Optional[bytes]:
    """The name digest of a registry subkey (None if it is not shaped like one)."""
    if not subkey.startswith(MODEL_SUBKEY_TAG):
        return None
    return subkey[len(MODEL_SUBKEY_TAG):len(MODEL_SUBKEY_TAG) + 32]
