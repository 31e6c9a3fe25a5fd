"""TrainerMetrics: the Prometheus metrics of one `swarmlm train` process, in a registry of its own.

Fed by the Trainer's hooks: `observe_step(StepStats)` after every local step, `observe_epoch(EpochStats)`
after every epoch (the averaging rounds end at epoch transitions). The number of known DHT peers is read
from the DHT by a scrape, at most every DHT_REFRESH seconds (each read is a call into the DHT process,
which also allocates shared memory: frequent scrapes must not multiply them). Averaging rounds and
contributed bytes are the same metrics a training peer exports (`AveragingMetrics`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

import hivemind
from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from swarmlm.dht.registry import count_dht_peers
from swarmlm.monitoring.metrics import AveragingMetrics, dht_peers_gauge

if TYPE_CHECKING:
    from swarmlm.training.config import TrainConfig
    from swarmlm.training.pretrain import EpochStats, StepStats

logger = logging.getLogger(__name__)

DHT_REFRESH = 10.0  # seconds a count of the known DHT peers is reused by scrapes
DHT_TIMEOUT = 5.0  # seconds a scrape waits for the DHT's count of its peers


class TrainerMetrics:
    """The metrics of one trainer. The observe_* methods are thread-safe, cheap and do no I/O."""

    def __init__(self, config: TrainConfig, dht: hivemind.DHT, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, self._dht, self._seq_len = self.registry, dht, config.data.seq_len
        Info("swarmlm_trainer", "The run, model and data shard this trainer trains", registry=r).info({
            "run_id": config.run_id, "model": config.model, "shard_index": str(config.data.shard_index),
            "num_shards": str(config.data.num_shards),
        })
        self._epoch = Gauge("swarmlm_training_epoch", "The swarm epoch this trainer is in (optimizer steps taken "
                            "together)", registry=r)
        self._steps = Counter("swarmlm_training_steps", "Local steps (forward + backward of one batch) of this "
                              "trainer", registry=r)
        self._samples = Counter("swarmlm_training_samples", "Samples this trainer ran forward and backward",
                                registry=r)
        self._tokens = Counter("swarmlm_training_tokens", "Tokens (samples x sequence length) this trainer ran "
                               "forward and backward", registry=r)
        self._loss = Gauge("swarmlm_training_loss", "Training loss of this trainer's latest batch", registry=r)
        self._val_loss = Gauge("swarmlm_validation_loss", "Mean token loss on the held-out samples at the latest "
                               "epoch (NaN before the first epoch)", registry=r)
        self._run_peers = Gauge("swarmlm_training_peers", "Trainers in the run, as this trainer's progress tracker "
                                "sees them", registry=r)
        dht_peers_gauge(r, f"read by scrapes, at most every {DHT_REFRESH:.0f} s").set_function(self._known_dht_peers)
        self.averaging = AveragingMetrics(r)
        self._val_loss.set(math.nan)
        self._done = dict(steps=0, samples=0)  # StepStats counts are cumulative: counters add the difference
        self._lock = threading.Lock()
        self._dht_peers, self._dht_peers_read_at = math.nan, -math.inf  # the latest count and when it was read
        self._dht_lock = threading.Lock()

    def observe_step(self, stats: StepStats) -> None:
        with self._lock:
            new_steps, new_samples = stats.step - self._done["steps"], stats.local_samples - self._done["samples"]
            self._done.update(steps=stats.step, samples=stats.local_samples)
            self._steps.inc(new_steps)
            self._samples.inc(new_samples)
            self._tokens.inc(new_samples * self._seq_len)
        self._epoch.set(stats.epoch)
        self._loss.set(stats.loss)
        self._run_peers.set(stats.num_peers)

    def observe_epoch(self, stats: EpochStats) -> None:
        self._epoch.set(stats.epoch)
        self._val_loss.set(stats.val_loss)
        self._run_peers.set(stats.num_peers)
        self.averaging.observe(stats.averaging)

    def _known_dht_peers(self) -> float:
        with self._dht_lock:  # scrapes run on the HTTP server's threads
            if time.monotonic() - self._dht_peers_read_at >= DHT_REFRESH:
                self._dht_peers_read_at = time.monotonic()
                try:
                    self._dht_peers = count_dht_peers(self._dht, timeout=DHT_TIMEOUT)
                except Exception as e:  # the DHT is shutting down: the scrape still answers
                    logger.debug(f"Could not count DHT peers: {e!r}")
                    self._dht_peers = math.nan
            return self._dht_peers
