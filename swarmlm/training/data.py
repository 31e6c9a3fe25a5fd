"""The data path of collaborative pretraining: documents -> clean -> de-duplicate -> held-out split ->
tokenize -> fixed-length samples -> this volunteer's shard -> batches.

Rules (deterministic, so every volunteer computes the same split from the same corpus):
  cleaning      Unicode NFC, line endings to "\\n", trailing spaces stripped from every line, runs of 3+
                newlines collapsed to one blank line, leading/trailing whitespace stripped (indentation is
                kept: code examples stay code). Documents shorter than `min_doc_chars` are dropped.
  dedup         exact: the first document with a given BLAKE2b hash of its cleaned text is kept.
  held-out      a document is held out for validation when its text hash, read as a number in [0, 1),
                is below `val_fraction`; the document with the smallest hash is always held out, so the
                held-out split is never empty. Whole documents go one way, so no text leaks across.
  samples       each split's documents are tokenized, joined with EOS and cut into `seq_len` tokens;
                the remainder is dropped.
  shards        training sample i belongs to shard i % num_shards: shards are disjoint and together
                cover every sample. Volunteers given different --shard-index values never train on the
                same sample, in any epoch; each reshuffles its own shard on every pass.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from swarmlm.errors import TrainingDataError
from swarmlm.training.config import DataConfig

logger = logging.getLogger(__name__)

_HASH_BYTES = 8


@dataclass(frozen=True)
class PreparedData:
    train: torch.Tensor  # [num_train_samples, seq_len] int64: every training sample of the corpus
    val: torch.Tensor  # [num_val_samples, seq_len] int64: held-out samples (at most max_val_samples)
    shard: torch.Tensor  # [num_shard_samples] int64: indices into `train` that this volunteer trains on
    stats: dict  # counts: documents read / dropped short / dropped duplicate / train / held out, samples


# ---- documents --------------------------------------------------------------------------------------

def builtin_documents() -> list[str]:
    """Python's own help topics (`pydoc_data.topics`): present on every machine, no download."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def load_documents(sources: tuple[str, ...] | list[str], text_column: str = "text") -> list[str]:
    """Reads documents from text files, directories of text files (one document per file, sorted by path,
    hidden files skipped) or a `datasets.save_to_disk` directory; no sources = the builtin corpus."""
    if not sources:
        return builtin_documents()
    documents: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise TrainingDataError(f"training data {source!r} does not exist")
        if path.is_dir() and _is_hf_dataset_dir(path):
            documents.extend(_load_hf_dataset(path, text_column))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path)))
            documents.extend(text for text in map(_read_text, files) if text is not None)
        else:
            text = _read_text(path)
            if text is None:
                raise TrainingDataError(f"{path} is not a UTF-8 text file")
            documents.append(text)
    return documents


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        logger.warning(f"Skipping {path}: not UTF-8 text")
        return None


def _is_hf_dataset_dir(path: Path) -> bool:
    saved_dataset = (path / "dataset_info.json").exists() and (path / "state.json").exists()
    return saved_dataset or (path / "dataset_dict.json").exists()


def _load_hf_dataset(path: Path, text_column: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise TrainingDataError(
            f"{path} is a Hugging Face dataset directory, but the `datasets` package is not installed; "
            f"install it (pip install datasets) or pass text files instead"
        ) from None
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        split = "train" if "train" in dataset else sorted(dataset)[0]
        logger.info(f"Using split {split!r} of {path}")
        dataset = dataset[split]
    if text_column not in dataset.column_names:
        raise TrainingDataError(f"{path} has no column {text_column!r} (columns: {dataset.column_names}); "
                                f"choose one with --text-column")
    return [text for text in dataset[text_column] if isinstance(text, str)]


# ---- cleaning and de-duplication ---------------------------------------------------------------------

_TRAILING_SPACE = re.compile(r"[ \t\f\v]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalizes whitespace without destroying indentation (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_HASH_BYTES).digest()


def clean_and_deduplicate(documents: list[str], min_chars: int) -> tuple[list[str], dict]:
    """Cleans every document, drops short ones and exact duplicates (first kept); returns (kept, counts)."""
    kept, seen = [], set()
    too_short = duplicates = 0
    for document in documents:
        text = clean_text(document)
        if len(text) < min_chars:
            too_short += 1
            continue
        digest = text_hash(text)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        kept.append(text)
    return kept, dict(documents_read=len(documents), dropped_short=too_short, dropped_duplicates=duplicates)


def split_held_out(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Splits documents into (train, held_out) by the hash of their text; held_out is never empty."""
    if len(documents) < 2:
        raise TrainingDataError(f"the corpus has {len(documents)} usable document(s); validation holds out whole "
                                f"documents, so give at least 2 (e.g. split a large file into several)")
    positions = [int.from_bytes(text_hash(d), "big") / 2 ** (8 * _HASH_BYTES) for d in documents]
    lowest = min(range(len(documents)), key=positions.__getitem__)
    held_out = [i == lowest or p < val_fraction for i, p in enumerate(positions)]
    train = [d for d, h in zip(documents, held_out) if not h]
    val = [d for d, h in zip(documents, held_out) if h]
    if not train:
        raise TrainingDataError("every document was held out for validation; lower --val-fraction")
    return train, val


# ---- samples, shards, batches ------------------------------------------------------------------------

def tokenize_and_chunk(documents: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenizes documents, joins them with EOS and cuts the stream into [num_samples, seq_len] (remainder dropped)."""
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    num_samples = len(stream) // seq_len
    return torch.tensor(stream[: num_samples * seq_len], dtype=torch.int64).view(num_samples, seq_len)


def shard_indices(num_samples: int, num_shards: int, shard_index: int) -> torch.Tensor:
    """Indices of the samples in shard `shard_index`: sample i belongs to shard i % num_shards."""
    return torch.arange(shard_index, num_samples, num_shards, dtype=torch.int64)


def prepare_data(config: DataConfig, tokenizer) -> PreparedData:
    """Runs the whole data path for one volunteer (deterministic: same corpus + config = same samples)."""
    documents, stats = clean_and_deduplicate(load_documents(config.sources, config.text_column), config.min_doc_chars)
    train_docs, val_docs = split_held_out(documents, config.val_fraction)
    train = tokenize_and_chunk(train_docs, tokenizer, config.seq_len)
    val = tokenize_and_chunk(val_docs, tokenizer, config.seq_len)[: config.max_val_samples]
    if len(val) == 0:
        raise TrainingDataError(f"the held-out documents are shorter than one sample of {config.seq_len} tokens; "
                                f"raise --val-fraction or lower --seq-len")
    shard = shard_indices(len(train), config.num_shards, config.shard_index)
    if len(shard) == 0:
        raise TrainingDataError(f"shard {config.shard_index} of {config.num_shards} is empty: the corpus has only "
                                f"{len(train)} training samples of {config.seq_len} tokens")
    stats.update(train_documents=len(train_docs), val_documents=len(val_docs), train_samples=len(train),
                 val_samples=len(val), shard_samples=len(shard))
    return PreparedData(train=train, val=val, shard=shard, stats=stats)


def iterate_batches(data: PreparedData, batch_size: int, seed: int, shard_index: int) -> Iterator[torch.Tensor]:
    """Endless [batch_size, seq_len] batches from this volunteer's shard, reshuffled on every pass.

    A shard smaller than batch_size is repeated to fill a batch; otherwise the last partial batch of a
    pass is dropped (the next pass reshuffles, so every sample keeps being seen).
    """
    shard = data.shard
    for pass_index in itertools.count():
        generator = torch.Generator().manual_seed(_mix(seed, shard_index, pass_index))
        order = shard[torch.randperm(len(shard), generator=generator)]
        if len(order) < batch_size:
            order = order.repeat((batch_size + len(order) - 1) // len(order))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield data.train[order[start:start + batch_size]]  # [batch_size, seq_len]


def _mix(*numbers: int) -> int:
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
