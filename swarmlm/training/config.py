"""Every setting of a collaborative trainer, one comment each; `swarmlm train` maps onto these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ()  # text files, dirs of text files, `save_to_disk` dataset dirs; () = builtin corpus
    text_column: str = "text"  # the column that holds the text in a datasets directory
    seq_len: int = 128  # tokens per training sample (documents are joined with EOS, then cut into chunks)
    min_doc_chars: int = 64  # documents shorter than this after cleaning are dropped
    val_fraction: float = 0.1  # share of documents (chosen by a hash of their text) held out for validation
    max_val_samples: int = 64  # validation loss is measured on at most this many held-out samples
    num_shards: int = 1  # the training samples are split into this many disjoint shards
    shard_index: int = 0  # this volunteer trains only on shard `shard_index` (sample i belongs to shard i % num_shards)
    seed: int = 0  # shuffles the order of samples inside a shard (per pass over the shard)

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
    run_id: str  # every trainer with the same run_id trains the same model together (a DHT key prefix)
    model: str  # embedded model name (fresh, seeded weights), checkpoint directory (its weights) or config.json path
    data: DataConfig = field(default_factory=DataConfig)  # what to train on and how it is split
    num_layers: Optional[int] = None  # fresh models only: override the config's number of decoder layers
    seed: int = 0  # seeds the fresh model's weights (every trainer of a run must use the same seed)
    batch_size: int = 8  # samples per local step (one forward + backward)
    target_batch_size: int = 256  # samples the whole swarm processes per epoch (one global optimizer step)
    epochs: int = 10  # stop when the swarm reaches this epoch
    min_peers: int = 1  # wait until this many trainers (this one included) are in the run before the first step
    lr: float = 1e-3  # AdamW learning rate (tuned for target_batch_size)
    weight_decay: float = 0.0  # AdamW weight decay
    local_updates: bool = False  # DiLoCo-style: each step updates locally; the swarm averages parameters instead
    average_state_every: int = 1  # average parameters + Adam statistics every this many epochs
    matchmaking_time: float = 5.0  # seconds to wait for peers to form an averaging group
    averaging_timeout: float = 60.0  # an averaging round that takes longer is abandoned (local results are kept)
    load_state_timeout: float = 120.0  # seconds to wait for a download of the swarm's state
    finish_timeout: float = 120.0  # at the end, wait this long for the others to finish and agree on the parameters
    progress_expiration: float = 30.0  # a trainer's progress record lives this long in the DHT (dead peers vanish)
    save_dir: Optional[str] = None  # write the final checkpoint here (and every save_every epochs)
    save_every: int = 0  # epochs between checkpoints; 0 = only at the end
    show_progress: bool = True  # draw a progress bar on stderr

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
