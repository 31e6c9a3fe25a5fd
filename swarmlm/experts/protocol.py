"""What crosses the network between clients and peers: message metadata, tensors, errors.

Every message is a hivemind `runtime_pb2.ExpertRequest` / `ExpertResponse`: tensors serialized with
hivemind.compression, metadata as msgpack of a frozen strict pydantic model. Peers parse remote
data with the `parse_*` functions below, which raise `RequestError` with a clear message (never
`assert`). Errors travel back as "[code] message" so the client can tell "busy" from "bad request".
"""

from __future__ import annotations

from typing import Optional, Sequence

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarmlm.errors import CacheBudgetError, RemotePeerError, RequestError

PROTOCOL_VERSION = 1
MAX_METADATA_BYTES = 64 * 1024
STATE_CHUNK_BYTES = 2 * 1024**2  # rpc_state messages stay below the p2p daemon's 4 MiB message limit
ADDRESS_PATTERN = r"^\d{1,3}(\.\d{1,3}){3}:\d{1,5}$"  # a direct address a peer's info may name: IPV4:PORT


class _Wire(BaseModel):
    """Unknown fields are ignored, so that a newer side can add optional fields that an older one goes without
    (an older peer that knows no push_to, say, does not push and answers pushed=False); every known field is
    validated strictly."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class SpanRequest(_Wire):
    """Metadata of a forward/backward call and of the first message of an inference session."""

    model: str = Field(max_length=256)  # DHT prefix of the model
    start: int = Field(ge=0)  # first block (inclusive)
    end: int = Field(ge=1)  # last block (exclusive)
    max_length: Optional[int] = Field(default=None, ge=1)  # inference only: tokens to reserve per sequence
    batch_size: Optional[int] = Field(default=None, ge=1)  # inference only: sequences in the session
    prompt_tokens: int = Field(default=0, ge=0)  # forward/backward: deep prompts for the first N positions follow
    session_id: Optional[str] = Field(default=None, min_length=16, max_length=64)  # inference: names this session
    # for steps pushed into it (see PushTarget); shared only with the peer that pushes
    push_from: Optional[str] = Field(default=None, max_length=128)  # inference: the one peer (its id) whose pushed
    # steps this session takes (the previous peer of the client's route); none without it
    timeout: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)  # forward/backward: seconds the caller
    # waits for the answer; the peer gives up sooner (CALLER_TIMEOUT_SHARE), and a training peer counts a backward
    # call's parameter gradients only if it answers (a caller that gave up retries on another peer)
    version: int = PROTOCOL_VERSION


class PushTarget(_Wire):
    """Where a peer sends its output of an inference step straight away: the session of the route's next peer."""

    peer_id: str = Field(max_length=128)
    session_id: str = Field(min_length=16, max_length=64)


class InferenceStep(_Wire):
    """Metadata of every inference message: where in the sequence its tokens start."""

    position: int = Field(ge=0)  # tokens the peer must already hold for this session before this step
    prompt_tokens: int = Field(default=0, ge=0)  # deep prompts for positions [0, N) follow (only at position 0)
    step_id: int = Field(default=0, ge=0)  # chosen by the client, echoed in StepResult (tells stale answers apart)
    push_to: list[PushTarget] = Field(default=[], max_length=64)  # the route's next peers: the output goes
    # to push_to[0] as that session's step (carrying push_to[1:]), as well as back to the client
    session_id: Optional[str] = Field(default=None, max_length=64)  # set on steps pushed by a peer (rpc_push)


class StepResult(_Wire):
    position: int = Field(ge=0)  # tokens the peer holds after this step
    step_id: int = Field(default=0, ge=0)  # the step's InferenceStep.step_id
    pushed: bool = False  # the output went on to push_to[0] (the client need not send it there)


class PeerInfo(_Wire):
    """A peer's live state, answered by rpc_info (also the client's latency probe)."""

    start: int = Field(ge=0)  # first block served (inclusive)
    end: int = Field(ge=1)  # last block served (exclusive)
    free_cache_tokens: int = Field(ge=0)  # KV-cache tokens not reserved by open sessions
    accepting_sessions: bool  # False while the peer shuts down (it refuses new sessions and calls)
    active_calls: int = Field(default=0, ge=0)  # forward/backward/state calls being answered now
    training_epoch: Optional[int] = Field(default=None, ge=0)  # the span's epoch on a training peer; None: frozen
    direct_address: Optional[str] = Field(default=None, max_length=21, pattern=ADDRESS_PATTERN)  # "IPV4:PORT" where
    # the peer serves direct connections (swarmlm.transport.direct), if it does; learned only from this answer, which
    # comes over the p2p channel that authenticates the peer (a DHT record or a client could name any address)
    direct_ticket: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{32}$")  # what the caller shows on those
    # direct connections (issued for the caller's peer id; swarmlm.transport.direct)


class StateTensor(_Wire):
    """Metadata of the first message of each tensor answered by rpc_state (its chunks follow)."""

    name: str = Field(max_length=512)  # the tensor's name in the model's checkpoint (e.g. model.layers.3.mlp...)
    training_epoch: Optional[int] = Field(default=None, ge=0)  # as in PeerInfo: the state's epoch, None if frozen


# ---- methods: what a peer serves (swarmlm.peer.handler), by name on the wire (swarmlm.transport.p2p) -----------

# forward, backward, state: channel methods called as streams (one request frame in, answer frames out)
FORWARD = "forward"  # stream: [hidden, position_ids, (attention_mask)] + SpanRequest -> [hidden]
BACKWARD = "backward"  # stream: [hidden, grad_outputs, position_ids, (attention_mask)] + SpanRequest
# -> [grad_hidden] (+ [grad_prompts] with deep prompts)
STATE = "state"  # stream: SpanRequest(model, start, end) -> the blocks' current tensors, each as chunks of
# at most STATE_CHUNK_BYTES (hivemind split_for_streaming), one message per chunk; a tensor's first message carries
# StateTensor (its checkpoint name) in metadata. Taken in one snapshot between optimizer steps.
INFO = "info"  # hivemind protobuf, unary: (empty request) -> PeerInfo in metadata; cheap, so clients also use it to
# measure round-trip time
INFERENCE = "inference"  # channel: SpanRequest(max_length, batch_size, session_id), then per step
# [hidden, position_ids, (mask)] + InferenceStep; one StepResult answer per message (the first: position 0)
PUSH = "push"  # channel: a long-lived stream from another peer: inference steps (as sent by clients, with
# InferenceStep.session_id) for sessions opened here with that session_id; each is run as if the session's client
# had sent it, and answered on the client's channel. Nothing is answered on this stream.


def pack(meta: _Wire) -> bytes:
    return msgpack.packb(meta.model_dump(mode="python"), use_bin_type=True)


def unpack(data: bytes, kind: type[_Wire]) -> _Wire:
    if len(data) > MAX_METADATA_BYTES:
        raise RequestError(f"metadata of {len(data)} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise RequestError(f"metadata is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(fields, dict):
        raise RequestError(f"metadata must be a map, got {type(fields).__name__}")
    try:
        return kind.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'metadata'}: {err['msg']}" for err in e.errors())
        raise RequestError(f"invalid {kind.__name__}: {problems}") from None


_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
                 "uint8": np.uint8, "int8": np.int8}
_TORCH_DTYPE_NAMES = {getattr(torch, name): name for name in _NUMPY_DTYPES}
_DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 4,  # hivemind sends bfloat16 as float32 bytes
                "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}


def serialize(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """The tensor (moved to the CPU, no grad) as hivemind's uncompressed Tensor message: for the dtypes numpy
    holds, built directly (the same message as hivemind's NoCompression, without its per-call descriptor)."""
    tensor = tensor.detach().cpu()
    name = _TORCH_DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        return serialize_torch_tensor(tensor, CompressionType.NONE)
    return runtime_pb2.Tensor(compression=CompressionType.NONE, buffer=tensor.numpy().tobytes(), size=tensor.shape,
                              dtype=name, requires_grad=False)


def serialize_all(tensors: Sequence[torch.Tensor]) -> list[runtime_pb2.Tensor]:
    return [serialize(t) for t in tensors]


def deserialize_tensor(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """A tensor of a peer's answer (the caller checks its shape; peers read requests with deserialize_bounded)."""
    if proto.compression == CompressionType.NONE and proto.dtype in _NUMPY_DTYPES:
        tensor = _from_buffer(proto)
        return tensor.requires_grad_(True) if proto.requires_grad else tensor
    return deserialize_torch_tensor(proto)


def _from_buffer(proto: runtime_pb2.Tensor) -> torch.Tensor:
    """An uncompressed tensor of a numpy dtype: the same values as hivemind's NoCompression reads, in a third of
    its time."""
    return as_tensor(_numpy_view(proto))


def _numpy_view(proto: runtime_pb2.Tensor) -> np.ndarray:
    """A read-only numpy view of an uncompressed tensor of a numpy dtype (its buffer's length already checked)."""
    return np.frombuffer(proto.buffer, _NUMPY_DTYPES[proto.dtype]).reshape(tuple(proto.size))


def array_bounded(proto: runtime_pb2.Tensor, max_elements: int, what: str) -> "np.ndarray | torch.Tensor":
    """A remote tensor after checking its declared size, dtype and buffer length: a read-only numpy view of the
    message's bytes for the dtypes numpy holds (checks on it cost a third of torch's on a cold cache; see
    `as_tensor`), a torch tensor otherwise (bfloat16)."""
    numel = 1
    for dim in proto.size:
        numel *= dim
    if numel > max_elements:
        raise RequestError(f"{what}: {numel} elements exceed the limit of {max_elements}")
    if proto.compression != CompressionType.NONE or proto.dtype not in _DTYPE_SIZES:
        raise RequestError(f"{what}: unsupported dtype/compression {proto.dtype!r}/{proto.compression}")
    if len(proto.buffer) != numel * _DTYPE_SIZES[proto.dtype]:
        raise RequestError(f"{what}: buffer of {len(proto.buffer)} bytes does not match shape {list(proto.size)}")
    try:
        return _numpy_view(proto) if proto.dtype in _NUMPY_DTYPES else deserialize_torch_tensor(proto)
    except Exception as e:
        raise RequestError(f"{what}: cannot deserialize ({type(e).__name__}: {e})") from None


def as_tensor(value: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """A torch tensor of `array_bounded`'s result (a writable copy of a numpy view)."""
    return torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value


def deserialize_bounded(proto: runtime_pb2.Tensor, max_elements: int, what: str) -> torch.Tensor:
    """Deserializes a remote tensor after checking its declared size, dtype and buffer length."""
    return as_tensor(array_bounded(proto, max_elements, what))


class ErrorInfo(_Wire):
    """An error answered in-band instead of a result."""

    error: str = Field(max_length=4096)
    code: str = Field(max_length=32)  # "bad_request", "busy" or "internal"


def all_finite(tensor: "torch.Tensor | np.ndarray") -> bool:
    """Whether every element is finite (numpy's check for float32/float16 CPU tensors: 5x faster on small ones)."""
    if isinstance(tensor, np.ndarray):
        return bool(np.isfinite(tensor).all())
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16) and not tensor.requires_grad:
        return bool(np.isfinite(tensor.numpy()).all())
    return bool(torch.isfinite(tensor).all())


def error_response(error: Exception) -> runtime_pb2.ExpertResponse:
    """The response a peer sends for a failed request (RequestError -> its code, others -> "internal")."""
    code = error.code if isinstance(error, RequestError) else "internal"
    message = str(error) if isinstance(error, RequestError) else f"{type(error).__name__}: {error}"
    return runtime_pb2.ExpertResponse(metadata=pack(ErrorInfo(error=message[:4096], code=code)))


def check_response(peer: str, response: runtime_pb2.ExpertResponse) -> runtime_pb2.ExpertResponse:
    """Raises RemotePeerError if `response` carries an error; returns it otherwise."""
    if response.metadata and not response.tensors:
        try:
            fields = msgpack.unpackb(response.metadata, raw=False)
        except Exception:
            fields = None
        if isinstance(fields, dict) and "error" in fields:
            raise RemotePeerError(peer, str(fields.get("error")), str(fields.get("code")))
    return response


__all__ = [
    "CacheBudgetError",
    "InferenceStep",
    "PeerInfo",
    "PushTarget",
    "SpanRequest",
    "StateTensor",
    "StepResult",
    "all_finite",
    "array_bounded",
    "as_tensor",
    "deserialize_bounded",
    "check_response",
    "error_response",
    "pack",
    "serialize",
    "serialize_all",
    "unpack",
]
