"""The trainer loop: local forward/backward on this volunteer's shard, hivemind.Optimizer for the swarm.

Lifecycle: `Trainer(config, dht, starting_model, data)` does no I/O; `run()` joins the run (waits for
`min_peers` trainers; downloads the swarm's current state when others are already training), trains
until the swarm reaches `config.epochs`, evaluates the held-out split at every epoch, ends in agreement
with the other trainers (identical final parameters, see finish.py), optionally saves, and returns a
TrainResult.
`stop` (a threading.Event, e.g. set by SIGTERM) ends the loop early but still shuts down cleanly.

Hook for metrics: `on_step(StepStats)` after every local step and `on_epoch(EpochStats)` after every epoch;
EpochStats.averaging counts completed/failed averaging rounds (and the bytes put into them) by kind;
`swarmlm.training.metrics.TrainerMetrics` exports these as Prometheus metrics.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import hivemind
import torch

from swarmlm.errors import TrainingDivergedError
from swarmlm.training.checkpoint import save_checkpoint
from swarmlm.training.config import TrainConfig
from swarmlm.training.data import PreparedData, iterate_batches
from swarmlm.training.finish import finish_in_agreement
from swarmlm.training.model import StartingModel, parameter_hash
from swarmlm.training.optimizer import ObservedOptimizer, make_optimizer
from swarmlm.training.progress import ProgressBar, SwarmRate
from swarmlm.training.roster import Roster
from swarmlm.training.state_averager import all_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    step: int  # local steps done by this trainer
    epoch: int  # the swarm epoch this trainer is in
    loss: float  # training loss of this step's batch
    local_samples: int  # samples this trainer has processed
    num_peers: int  # trainers reporting progress in the swarm
    swarm_samples_per_second: float


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # the epoch just reached
    train_loss: float  # mean local training loss since the previous epoch (nan if no local step)
    val_loss: float  # mean token loss on the held-out samples
    val_perplexity: float  # exp(val_loss)
    num_peers: int
    swarm_samples_per_second: float
    averaging: dict  # {"completed": {"gradients": n, "state": n}, "failed": {...}, ...} since the start
    # (AveragingRounds.snapshot())
    elapsed: float  # seconds since run() began


@dataclass
class TrainResult:
    start_epoch: int  # the epoch this trainer started from (> 0: it downloaded the swarm's state)
    final_epoch: int
    initial_val_loss: float  # held-out loss of the starting parameters (after any download)
    final_val_loss: float
    steps: int
    local_samples: int
    param_hash: str  # parameter_hash() of the final parameters
    elapsed: float
    epochs: list[EpochStats] = field(default_factory=list)
    averaging: dict = field(default_factory=dict)  # completed/failed averaging rounds by kind, whole run
    agreed: bool = False  # every trainer that finished the run holds exactly these parameters (see finish.py)
    downloaded_final_state: bool = False  # this trainer adopted the canonical final parameters from a peer
    checkpoint: Optional[str] = None  # where the final checkpoint was saved

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    def __init__(self, config: TrainConfig, dht: hivemind.DHT, starting: StartingModel, data: PreparedData, *,
                 on_step: Optional[Callable[[StepStats], None]] = None,
                 on_epoch: Optional[Callable[[EpochStats], None]] = None,
                 stop: Optional[threading.Event] = None):
        self.config, self.dht, self.data = config, dht, data
        self.model, self.tokenizer = starting.model, starting.tokenizer
        self.on_step, self.on_epoch = on_step, on_epoch
        self.stop = stop if stop is not None else threading.Event()
        self.optimizer: Optional[ObservedOptimizer] = None

    def run(self) -> TrainResult:
        config, started = self.config, time.monotonic()
        self.optimizer = opt = make_optimizer(config, self.dht, self.model)
        roster = Roster(self.dht, config.run_id, config.data.shard_index, config.data.num_shards)
        try:
            self._join(roster)
            initial_val_loss = self.evaluate()
            result = TrainResult(start_epoch=opt.local_epoch, final_epoch=opt.local_epoch, steps=0, local_samples=0,
                                 initial_val_loss=initial_val_loss, final_val_loss=initial_val_loss, param_hash="",
                                 elapsed=0.0)
            self._train(result, started)
            if opt.local_epoch >= config.epochs and not self.stop.is_set():
                agreement = finish_in_agreement(opt, self.model, roster, config.finish_timeout, self.stop)
                result.agreed, result.downloaded_final_state = agreement.agreed, agreement.downloaded
                if agreement.downloaded:
                    result.final_val_loss = self.evaluate()
        finally:
            self.optimizer = None
            roster.shutdown()
            opt.shutdown()
        result.final_epoch = opt.local_epoch
        result.averaging = opt.rounds.snapshot()
        result.param_hash = parameter_hash(self.model)
        result.elapsed = time.monotonic() - started
        if config.save_dir:
            result.checkpoint = str(self.save(config.save_dir, result.final_epoch, result.final_val_loss))
        return result

    def _join(self, roster: Roster) -> None:
        """Announces this trainer, waits for min_peers, and downloads parameters, optimizer state and epoch
        from the swarm when other trainers are already training."""
        config, opt = self.config, self.optimizer
        roster.start()
        roster.wait_for(config.min_peers, self.stop)
        for peer_id in roster.shard_conflicts():
            logger.warning(f"Trainer {peer_id} also trains on shard {config.data.shard_index}/"
                           f"{config.data.num_shards}: give every trainer its own --shard-index")
        if opt.tracker.global_progress.num_peers > 0:
            logger.info(f"Run {config.run_id} has {opt.tracker.global_progress.num_peers} trainer(s) at epoch "
                        f"{opt.tracker.global_epoch}; downloading their state")
            opt.load_state_from_peers()

    def _train(self, result: TrainResult, started: float) -> None:
        config, opt = self.config, self.optimizer
        batches = iterate_batches(self.data, config.batch_size, config.data.seed, config.data.shard_index)
        rate = SwarmRate(config.target_batch_size)
        rate.mark(opt.local_epoch)
        bar = ProgressBar(config.epochs, config.run_id, config.show_progress, opt.local_epoch)
        epoch_losses: list[float] = []
        try:
            while opt.local_epoch < config.epochs and not self.stop.is_set():
                epoch_before = opt.local_epoch
                batch = next(batches)  # [batch_size, seq_len]
                loss = self.model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"training loss is {loss.item()} at epoch {epoch_before}")
                loss.backward()
                if not all_finite(param.grad for param in self.model.parameters() if param.grad is not None):
                    # never contributed to an average nor applied (a finite loss with inf gradients: overflow)
                    logger.warning(f"Skipped a batch at epoch {epoch_before}: its gradients are not finite")
                    opt.zero_grad()
                    continue
                opt.step()
                opt.zero_grad()
                result.steps += 1
                result.local_samples += len(batch)
                epoch_losses.append(loss.item())
                num_peers = max(opt.tracker.global_progress.num_peers, 1)  # this trainer counts before it is seen
                if self.on_step is not None:
                    self.on_step(StepStats(result.steps, opt.local_epoch, epoch_losses[-1], result.local_samples,
                                           num_peers, rate.samples_per_second))
                if opt.local_epoch != epoch_before:
                    rate.mark(opt.local_epoch)
                    stats = self._end_epoch(epoch_losses, num_peers, rate, started)
                    result.epochs.append(stats)
                    result.final_val_loss = stats.val_loss
                    epoch_losses = []
                    if config.save_dir and config.save_every and stats.epoch % config.save_every == 0 \
                            and stats.epoch < config.epochs:
                        self.save(config.save_dir, stats.epoch, stats.val_loss)
                bar.update(opt.local_epoch, epoch_losses[-1] if epoch_losses else result.final_val_loss,
                           rate.samples_per_second, num_peers)
        finally:
            bar.close()

    def _end_epoch(self, losses: list[float], num_peers: int, rate: SwarmRate, started: float) -> EpochStats:
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):
            raise TrainingDivergedError(f"validation loss is {val_loss} at epoch {self.optimizer.local_epoch}")
        stats = EpochStats(
            epoch=self.optimizer.local_epoch, train_loss=sum(losses) / len(losses) if losses else math.nan,
            val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)), num_peers=num_peers,
            swarm_samples_per_second=rate.samples_per_second, averaging=self.optimizer.rounds.snapshot(),
            elapsed=time.monotonic() - started,
        )
        if self.on_epoch is not None:
            self.on_epoch(stats)
        return stats

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss of the current parameters on the held-out samples."""
        self.model.eval()
        try:
            total, count = 0.0, 0
            for start in range(0, len(self.data.val), self.config.batch_size):
                batch = self.data.val[start:start + self.config.batch_size]  # [<= batch_size, seq_len]
                total += self.model(input_ids=batch, labels=batch).loss.item() * len(batch)
                count += len(batch)
            return total / count
        finally:
            self.model.train()

    def save(self, directory: str, epoch: int, val_loss: float):
        path = save_checkpoint(directory, self.model, self.tokenizer, training_state=dict(
            run_id=self.config.run_id, epoch=epoch, val_loss=val_loss, param_hash=parameter_hash(self.model)))
        logger.info(f"Saved the checkpoint of epoch {epoch} to {path}")
        return path
