"""Every setting of a collaborative trainer, one help text each; `swarmlm train` takes them as flags
(swarmlm.settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from swarmlm.settings import setting


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = field(default=(), metadata=setting(
        "text files, directories of text files or datasets.save_to_disk directories (default: Python's built-in "
        "help text)", flag="data", metavar="PATH"))
    text_column: str = field(default="text", metadata=setting("the text column of a datasets directory"))
    seq_len: int = field(default=128, metadata=setting(
        "tokens per training sample (documents are joined with EOS, then cut into chunks)"))
    min_doc_chars: int = field(default=64, metadata=setting("drop documents shorter than this after cleaning"))
    val_fraction: float = field(default=0.1, metadata=setting(
        "share of documents (chosen by a hash of their text) held out for validation"))
    max_val_samples: int = field(default=64, metadata=setting("held-out samples evaluated every epoch"))
    num_shards: int = field(default=1, metadata=setting("split the training samples into N disjoint shards"))
    shard_index: int = field(default=0, metadata=setting(
        "train on shard K (sample i is in shard i % num_shards)", metavar="K"))
    seed: int = 0  # shuffles the order of samples inside a shard (per pass); `swarmlm train` gives TrainConfig.seed

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {self.shard_index} and {self.num_shards}")
        if self.max_val_samples < 1:
            raise ValueError("max_val_samples must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """lr, target_batch_size and averaging_timeout default higher than a training peer's (SpanTrainingConfig):
    a fresh model, and no requests wait for the averaging."""

    run_id: str = field(metadata=setting(
        "name of the training run: trainers with the same run id train the same model together (a DHT key prefix)"))
    model: str = field(metadata=setting(
        "embedded model name (fresh seeded weights), checkpoint directory (its weights) or config.json path"))
    data: DataConfig = field(default_factory=DataConfig)  # what to train on and how it is split
    num_layers: Optional[int] = field(default=None, metadata=setting(
        "fresh models only: override the config's number of decoder layers", metavar="N"))
    seed: int = field(default=0, metadata=setting(
        "weights of a fresh model (every trainer of a run must use the same) and the shard's sample order"))
    batch_size: int = field(default=8, metadata=setting("samples per local step (one forward + backward)"))
    target_batch_size: int = field(default=256, metadata=setting(
        "samples the whole swarm processes per epoch (one global optimizer step)"))
    epochs: int = field(default=10, metadata=setting("stop when the swarm reaches this epoch"))
    min_peers: int = field(default=1, metadata=setting(
        "wait for this many trainers (this one included) before the first step"))
    lr: float = field(default=1e-3, metadata=setting("AdamW learning rate (tuned for target_batch_size)"))
    weight_decay: float = field(default=0.0, metadata=setting("AdamW weight decay"))
    local_updates: bool = field(default=False, metadata=setting(
        "DiLoCo-style: each step updates locally; parameters are averaged every average_state_every epochs"))
    average_state_every: int = field(default=1, metadata=setting(
        "average parameters and Adam statistics every this many epochs (epochs must be a multiple)"))
    matchmaking_time: float = field(default=5.0, metadata=setting(
        "seconds to wait for peers to form an averaging group"))
    averaging_timeout: float = field(default=60.0, metadata=setting(
        "an averaging round that takes longer (seconds) is abandoned (local results are kept)"))
    load_state_timeout: float = field(default=120.0, metadata=setting(
        "seconds to wait for a download of the swarm's state"))
    finish_timeout: float = field(default=120.0, metadata=setting(
        "at the end, seconds to wait for the others to finish and agree on the parameters"))
    progress_expiration: float = field(default=30.0, metadata=setting(
        "seconds a trainer's progress record lives in the DHT (dead peers vanish)"))
    save_dir: Optional[str] = field(default=None, metadata=setting(
        "write the final checkpoint here (and every save_every epochs; served by `swarmlm peer`)", flag="save",
        metavar="DIR"))
    save_every: int = field(default=0, metadata=setting("epochs between checkpoints (0: only at the end)"))
    show_progress: bool = field(default=True, metadata=setting("draw a progress bar on stderr", flag="progress"))

    def __post_init__(self):
        if self.batch_size < 1 or self.target_batch_size < 1:
            raise ValueError("batch_size and target_batch_size must be >= 1")
        if self.epochs < 1 or self.average_state_every < 1 or self.min_peers < 1:
            raise ValueError("epochs, average_state_every and min_peers must be >= 1")
        if self.epochs % self.average_state_every:
            raise ValueError(f"epochs ({self.epochs}) must be a multiple of average_state_every "
                             f"({self.average_state_every}), so that the run ends on an averaging round")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if self.save_every < 0:
            raise ValueError("save_every must be >= 0")
