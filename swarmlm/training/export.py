"""Exporting the swarm's (trained) blocks as a normal Hugging Face checkpoint directory.

`export_model(model, initial_peers, out)` fetches every block's current tensors from an online peer that
serves it (`rpc_state`; training peers first, the most trained replica first, then the peer that covers the
most blocks), takes the client tensors (embeddings, final norm, LM head), config, generation config and
tokenizer files from the original checkpoint, and writes a float32 safetensors checkpoint atomically
(`swarmlm.training.checkpoint.save_checkpoint`). The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and is served by `swarmlm peer --model DIR`.
`training_state.json` in it records which peer (and epoch) each run of blocks came from.

Every tensor a peer sends is checked against the original checkpoint: its name must be a block tensor of
the requested blocks, sent once, with the checkpoint's shape, a float dtype and finite values; a peer that
sends anything else is skipped like one that fails. Blocks that no online peer serves end the export with
an `ExportError` that lists them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

try:  # skips the random initialization of weights that are all assigned right after (transformers 5.x)
    from transformers.initialization import no_init_weights
except ImportError:  # older 5.x releases: initialize, then overwrite
    from contextlib import nullcontext as no_init_weights

from swarmlm.client.config import ClientConfig
from swarmlm.client.rpc import call_info, call_peer
from swarmlm.client.swarm import RemoteSequential
from swarmlm.dht.records import ServerState
from swarmlm.dht.registry import fetch_block_records
from swarmlm.errors import ExportError, RemotePeerError, RequestError
from swarmlm.experts.families import ModelFamily, family_for_config
from swarmlm.experts.protocol import (
    STATE,
    PeerInfo,
    SpanRequest,
    StateTensor,
    check_response,
    deserialize_bounded,
    pack,
    unpack,
)
from swarmlm.models.checkpoint import load_tensors, resolve_model, tensor_files
from swarmlm.training.checkpoint import check_replaceable, save_checkpoint
from swarmlm.transport import Dialer

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass(frozen=True)
class BlockSource:
    peer_id: str
    start: int  # first block taken from this peer (inclusive)
    end: int  # last block (exclusive)
    training_epoch: Optional[int]  # the span's epoch on that peer; None: it serves frozen weights


@dataclass(frozen=True)
class SpanState:
    training_epoch: Optional[int]  # as in BlockSource
    tensors: dict[str, torch.Tensor]  # checkpoint name -> float32 tensor


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the written checkpoint directory
    sources: list[BlockSource]  # where each run of blocks came from, in block order


# ---- what the original checkpoint says ------------------------------------------------------------

def block_tensor_shapes(checkpoint: Path, family: ModelFamily, num_blocks: int) -> dict[int, dict[str, tuple]]:
    """Block index -> {checkpoint name: shape} for every block tensor (read from safetensors headers only)."""
    shapes: dict[int, dict[str, tuple]] = {block: {} for block in range(num_blocks)}
    by_file: dict[str, list[str]] = {}
    for name, filename in tensor_files(checkpoint).items():
        if family.block_tensor_name(name, 0, num_blocks) is not None:
            by_file.setdefault(filename, []).append(name)
    for filename, names in by_file.items():
        with safe_open(checkpoint / filename, framework="pt") as f:
            for name in names:
                block = int(name[len(family.block_prefix):].split(".", 1)[0])
                shapes[block][name] = tuple(f.get_slice(name).get_shape())
    return shapes


def shapes_of(shapes: dict[int, dict[str, tuple]], start: int, end: int) -> dict[str, tuple]:
    """The tensors of blocks [start, end) from `block_tensor_shapes`."""
    return {name: shape for block in range(start, end) for name, shape in shapes[block].items()}


# ---- fetching a span's state from one peer ---------------------------------------------------------

class _StateReader:
    """Reassembles the chunked tensors of an rpc_state answer, checking each against `expected` shapes."""

    def __init__(self, peer_id: str, expected: dict[str, tuple]):
        self.peer_id, self.expected = peer_id, expected
        self.tensors: dict[str, torch.Tensor] = {}
        self.epoch: Optional[int] = None
        self._name: Optional[str] = None
        self._parts: list[runtime_pb2.Tensor] = []
        self._bytes = 0

    def _bad(self, message: str) -> RemotePeerError:
        return RemotePeerError(self.peer_id, f"sent an invalid state: {message}")

    def add(self, response: runtime_pb2.ExpertResponse) -> None:
        if len(response.tensors) != 1:
            raise self._bad(f"a message must carry one tensor chunk, got {len(response.tensors)}")
        chunk = response.tensors[0]
        if response.metadata:
            self._finish_tensor()
            self._begin_tensor(response.metadata, chunk)
        elif self._name is None:
            raise self._bad("a tensor chunk came before its name")
        self._parts.append(chunk)
        self._bytes += len(chunk.buffer)
        if self._bytes > _max_bytes(self.expected[self._name]):
            raise self._bad(f"{self._name} is larger than its shape {list(self.expected[self._name])}")

    def _begin_tensor(self, metadata: bytes, chunk: runtime_pb2.Tensor) -> None:
        try:
            meta = unpack(metadata, StateTensor)
        except RequestError as e:
            raise self._bad(str(e)) from None
        if meta.name not in self.expected:
            raise self._bad(f"{meta.name!r} is not a tensor of the requested blocks")
        if meta.name in self.tensors:
            raise self._bad(f"{meta.name} was sent twice")
        if tuple(chunk.size) != self.expected[meta.name]:
            raise self._bad(f"{meta.name} has shape {list(chunk.size)}, "
                            f"the checkpoint {list(self.expected[meta.name])}")
        if chunk.dtype not in FLOAT_DTYPES:
            raise self._bad(f"{meta.name} has dtype {chunk.dtype!r}, expected one of {FLOAT_DTYPES}")
        if self.tensors and meta.training_epoch != self.epoch:
            raise self._bad("its tensors come from different epochs")
        self.epoch, self._name, self._parts, self._bytes = meta.training_epoch, meta.name, [], 0

    def _finish_tensor(self) -> None:
        if self._name is None:
            return
        name, numel = self._name, _numel(self.expected[self._name])
        if len(self._parts) != max(self._parts[0].chunks, 1):
            raise self._bad(f"{name} arrived in {len(self._parts)} chunks, announced {self._parts[0].chunks}")
        try:
            tensor = deserialize_bounded(combine_from_streaming(self._parts), numel, name)
        except RequestError as e:
            raise self._bad(str(e)) from None
        if not torch.isfinite(tensor).all():
            raise self._bad(f"{name} holds non-finite values")
        self.tensors[name] = tensor.float()
        self._name, self._parts = None, []

    def complete(self) -> bool:
        """Every expected tensor arrived whole (the peer has nothing more to send)."""
        if self._name is not None and len(self._parts) == max(self._parts[0].chunks, 1):
            self._finish_tensor()
        return self.tensors.keys() == self.expected.keys()

    def finish(self) -> SpanState:
        self._finish_tensor()
        missing = sorted(set(self.expected) - set(self.tensors))
        if missing:
            raise self._bad(f"{len(missing)} tensors are missing, e.g. {missing[:3]}")
        return SpanState(self.epoch, self.tensors)


def _numel(shape: tuple) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def _max_bytes(shape: tuple) -> int:
    return _numel(shape) * 4  # float32, the widest dtype accepted


async def call_state(dialer: Dialer, peer_id: str, request: SpanRequest, expected: dict[str, tuple],
                     timeout: float) -> SpanState:
    """The current tensors of blocks [request.start, request.end) on one peer (rpc_state), validated against
    `expected` ({checkpoint name: shape}). Raises RemotePeerError on any failure or invalid answer."""
    async def call() -> SpanState:
        state_request = runtime_pb2.ExpertRequest(metadata=pack(request))
        async with dialer.answers(peer_id, STATE, state_request, runtime_pb2.ExpertResponse) as stream:
            reader = _StateReader(peer_id, expected)
            async for response in stream:
                reader.add(check_response(peer_id, response))
                if reader.complete():
                    break
            return reader.finish()

    return await call_peer(peer_id, call(), timeout,
                           f"did not send the state of blocks {request.start}:{request.end} within {timeout} s")


def fetch_span_state(remote: RemoteSequential, peer_id: str, start: int, end: int, expected: dict[str, tuple],
                     timeout: float = 60.0) -> SpanState:
    """Sync wrapper of `call_state` on a client's network loop (e.g. to compare replicas)."""
    request = SpanRequest(model=remote.model, start=start, end=end)
    return remote.loop.run(call_state(remote.dialer, peer_id, request, expected, timeout))


# ---- choosing peers and fetching every block ---------------------------------------------------------

async def _online_peers(remote: RemoteSequential, probe_timeout: float) -> dict[str, PeerInfo]:
    """Every ONLINE peer of the model that answers rpc_info, with its live span and training epoch."""
    loop = asyncio.get_running_loop()
    records = await loop.run_in_executor(None, fetch_block_records, remote.dht, remote.model, remote.num_blocks)
    peer_ids = sorted({r.peer_id for block in records for r in block if r.state == ServerState.ONLINE})

    async def probe(peer_id: str) -> Optional[PeerInfo]:
        try:
            return await call_info(remote.dialer, peer_id, probe_timeout)
        except RemotePeerError as e:
            logger.warning(f"Leaving out {peer_id}: {e}")
            return None

    infos = await asyncio.gather(*(probe(peer_id) for peer_id in peer_ids))
    return {peer_id: info for peer_id, info in zip(peer_ids, infos) if info is not None}


def _preference(item: tuple[str, PeerInfo]) -> tuple:
    """Training peers first, then the highest epoch, then the longest reach."""
    _, info = item
    return info.training_epoch is not None, info.training_epoch or 0, info.end


async def fetch_blocks(remote: RemoteSequential, shapes: dict[int, dict[str, tuple]], timeout: float,
                       hint: str = "") -> tuple[dict[str, torch.Tensor], list[BlockSource]]:
    """Every block tensor of the model from online peers; raises ExportError listing blocks nobody serves."""
    peers, failed = await _online_peers(remote, min(timeout, 10.0)), set()
    tensors, sources, missing = {}, [], []
    num_blocks, block = remote.num_blocks, 0

    def serving(b: int) -> list[tuple[str, PeerInfo]]:
        return [(p, info) for p, info in peers.items() if p not in failed and info.start <= b < info.end]

    while block < num_blocks:
        candidates = serving(block)
        if not candidates:
            gap_end = next((b for b in range(block + 1, num_blocks) if serving(b)), num_blocks)
            missing.append((block, gap_end))
            block = gap_end
            continue
        peer_id, info = max(candidates, key=_preference)
        end = min(info.end, num_blocks)
        request = SpanRequest(model=remote.model, start=block, end=end)
        try:
            state = await call_state(remote.dialer, peer_id, request, shapes_of(shapes, block, end), timeout)
        except RemotePeerError as e:
            logger.warning(f"Could not fetch blocks {block}:{end}: {e}; trying another peer")
            failed.add(peer_id)
            continue
        tensors.update(state.tensors)
        sources.append(BlockSource(peer_id, block, end, state.training_epoch))
        block = end
    if missing:
        spans = ", ".join(f"{a}:{b}" for a, b in missing)
        first = missing[0]
        raise ExportError(
            f"cannot export {remote.model}: no online peer serves blocks {spans}"
            + (f" ({len(failed)} peer(s) failed to send their state)" if failed else "")
            + f"; start peers for them (e.g. swarmlm peer --model {hint or remote.model} "
              f"--blocks {first[0]}:{first[1]} --initial-peers ...) and export again")
    return tensors, sources


# ---- writing the checkpoint ------------------------------------------------------------------------

class _TokenizerFiles:
    """Stands in for a tokenizer in save_checkpoint: copies the original checkpoint's tokenizer files verbatim."""

    def __init__(self, source: Path):
        self.files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        for path in self.files:
            shutil.copyfile(path, Path(directory) / path.name)


def _assemble(checkpoint: Path, config: PretrainedConfig, family: ModelFamily, blocks: dict[str, torch.Tensor]):
    """The HF model (float32) with the fetched blocks and the checkpoint's client tensors."""
    state = {**load_tensors(checkpoint, family.client_tensor_name, torch.float32), **blocks}
    with no_init_weights():  # every tensor is assigned below; a missing one is an error
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False, assign=True)  # no second copy of the weights
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [key for key in result.missing_keys if not (tied and key == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise ExportError(f"the fetched tensors do not fit {checkpoint}: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    if tied:
        model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model.eval()


def export_model(model: str, initial_peers: Sequence[str], out: str | os.PathLike, *,
                 dht_prefix: Optional[str] = None, timeout: float = 120.0, overwrite: bool = False,
                 swarm_key: Optional[str] = None) -> ExportResult:
    """Fetches every block from the swarm and writes the checkpoint directory `out` (see the module docstring);
    CheckpointError, before any block is fetched, if `out` holds files a save would not write (unless `overwrite`)."""
    check_replaceable(out, overwrite)
    resolved = resolve_model(model)
    config = AutoConfig.from_pretrained(resolved.path)
    family = family_for_config(config)
    name, num_blocks = dht_prefix or resolved.name, config.num_hidden_layers
    shapes = block_tensor_shapes(resolved.path, family, num_blocks)
    remote = RemoteSequential(name, num_blocks, ClientConfig(initial_peers=list(initial_peers), swarm_key=swarm_key), hint=model)
    try:
        blocks, sources = remote.loop.run(fetch_blocks(remote, shapes, timeout, hint=model))
    finally:
        remote.close()
    hf_model = _assemble(resolved.path, config, family, blocks)
    provenance = dict(exported_from=name, checkpoint=str(resolved.path), blocks=[asdict(s) for s in sources])
    path = save_checkpoint(out, hf_model, _TokenizerFiles(resolved.path), training_state=provenance, overwrite=overwrite)
    logger.info(f"Exported {name} to {path}: " + ", ".join(f"{s.start}:{s.end} from {s.peer_id}" for s in sources))
    return ExportResult(path, sources)


__all__ = ["BlockSource", "ExportError", "ExportResult", "SpanState", "block_tensor_shapes", "call_state",
           "export_model", "fetch_blocks", "fetch_span_state", "shapes_of"]
