"""Training the blocks a peer hosts, together with the other peers that host the same span (SWARM-style).

Trainer clients send micro-batches forward and backward through chains of peers. On a training peer, the
backward pass also computes the gradients of the span's parameters and hands them to its `SpanTrainer`,
which accumulates them in a hivemind.Optimizer whose run id names the run, the model and the span
(`span_run_id`): only replicas of the same span average together. An epoch of a span ends when its
replicas together have accumulated `target_batch_size` samples (counted by micro-batch size); then the
replicas all-reduce their gradients and each applies the same AdamW step, so they stay identical.
Parameters and Adam statistics are also averaged every `average_state_every` epochs, which repairs a
replica that missed a gradient round. A replica that joins late, or falls two epochs behind, downloads
the state (parameters, Adam statistics, epoch) of the others.

Threads: every method that reads or writes the span's parameters (`accumulate`, `advance`) runs on the
peer's compute thread, the thread that also runs forward and backward, so a step never interleaves with
a request. A ticker thread only submits `advance` there (every `tick_period`, and at once after a
micro-batch): an epoch transition is never part of a request, and a replica that receives no
micro-batches still follows its replicas into the next epoch. The all-reduce runs in hivemind's averager
processes; at an epoch boundary the compute thread waits for it, as synchronous data-parallel training
does (the next gradients must be computed with the new parameters).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import hivemind
import torch

from swarmlm.dht.node import sign_hivemind_records_as
from swarmlm.errors import RequestError
from swarmlm.experts.span import BlockSpan
from swarmlm.peer.config import SpanTrainingConfig  # re-exported: the settings of a training peer
from swarmlm.training.optimizer import ADAM_STATISTICS
from swarmlm.training.span_optimizer import SpanOptimizer

logger = logging.getLogger(__name__)


def span_run_id(run_id: str, model: str, start: int, end: int) -> str:
    """The hivemind run id of one span: only peers hosting exactly blocks [start, end) of `model` share it.

    Readable, and unique through a hash of the exact names (hivemind prefixes allow no "." and are DHT keys)."""
    digest = hashlib.sha256(f"{run_id}\0{model}\0{start}\0{end}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{run_id}_{model}")
    return f"{readable}_blocks{start}-{end}_{digest}"


@dataclass(frozen=True)
class RoundStarted:
    """A replica begins the averaging at the end of an epoch."""

    start: int
    end: int
    epoch: int  # the epoch that ends

    def line(self) -> str:
        return f"AVERAGING blocks {self.start}:{self.end} epoch {self.epoch}"


@dataclass(frozen=True)
class EpochFinished:
    """A replica reached a new epoch (after averaging, or after downloading its replicas' state)."""

    start: int
    end: int
    epoch: int  # the epoch just reached
    local_samples: int  # samples this replica contributed to the finished epoch
    swarm_samples: int  # samples all replicas reported for it (as this replica saw them)
    gradient_peers: int  # replicas in this epoch's gradient all-reduce; 0 = failed, or no other replica
    state_peers: int  # replicas in this epoch's parameter averaging; 0 = none this epoch, or failed
    rounds_completed: int  # gradient averaging rounds completed since the start
    rounds_failed: int  # gradient averaging rounds failed since the start (local gradients were used)
    downloaded: bool = False  # the replica was behind and downloaded the others' state instead

    def line(self) -> str:
        return (f"EPOCH {self.epoch} blocks {self.start}:{self.end} samples={self.local_samples}/{self.swarm_samples} "
                f"grad_peers={self.gradient_peers} state_peers={self.state_peers} rounds_ok={self.rounds_completed} "
                f"rounds_failed={self.rounds_failed} downloaded={int(self.downloaded)}")


TrainingReport = Union[RoundStarted, EpochFinished]


class SpanTrainer:
    """Accumulates the gradients of one span and steps with its replicas; see the module docstring.

    Lifecycle: `SpanTrainer(...)` creates the optimizer (it forks hivemind's averager processes: create it
    before starting threads that must not be forked mid-operation), `join()` catches up with running
    replicas, `start(compute)` starts ticking on the compute executor, `shutdown(compute)` leaves the run.
    """

    def __init__(self, span: BlockSpan, model: str, dht: hivemind.DHT, config: SpanTrainingConfig, *,
                 on_report: Optional[Callable[[TrainingReport], None]] = None,
                 on_rounds: Optional[Callable[[dict], None]] = None):
        self.span, self.config = span, config
        self.on_report = on_report
        self.on_rounds = on_rounds  # called with the optimizer's AveragingRounds.snapshot() after every epoch
        self.parameters = [param for param in span.parameters()]
        for param in self.parameters:
            if param.dtype != torch.float32 or not param.requires_grad:
                raise ValueError("a trained span needs float32 parameters that require grad")
        self.run_id = span_run_id(config.run_id, model, span.start, span.end)
        verbose = logger.isEnabledFor(logging.DEBUG)
        if verbose:  # hivemind's own reports of each round (its logger is kept at WARNING otherwise)
            for name in ("hivemind.optim", "hivemind.averaging"):
                logging.getLogger(name).setLevel(logging.DEBUG)
        sign_hivemind_records_as(dht)
        self.optimizer = SpanOptimizer(
            dht=dht, run_id=self.run_id, target_batch_size=config.target_batch_size, params=self.parameters,
            optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
            matchmaking_time=config.matchmaking_time, averaging_timeout=config.averaging_timeout,
            # a replica that starts its part late (a progress fetch + a tick + a busy machine) must stay in the
            # all-reduce: hivemind drops a part that times out and still reports the round as done. A replica that
            # dies resets its streams, so this wait only holds for one that hangs
            next_chunk_timeout=config.averaging_timeout,
            load_state_timeout=config.load_state_timeout,
            delay_state_averaging=False,  # synchronous: every replica leaves the round with the same state
            average_state_every=config.average_state_every, average_opt_statistics=ADAM_STATISTICS,
            tracker_opts=dict(metadata_expiration=config.progress_expiration, min_refresh_period=config.tick_period,
                              max_refresh_period=max(config.matchmaking_time, 1.0)),
            averager_opts=dict(request_timeout=min(3.0, config.matchmaking_time / 2)),  # hivemind: below matchmaking
            verbose=verbose,
        )
        self._stop, self._wake = threading.Event(), threading.Event()
        self._ticker: Optional[threading.Thread] = None

    @property
    def epoch(self) -> int:
        """The span's epoch on this replica (optimizer steps the replicas have taken together)."""
        return self.optimizer.local_epoch

    # ---- lifecycle ----------------------------------------------------------------------------------

    def join(self) -> None:
        """Downloads parameters, Adam statistics and epoch from replicas that are already training, so a
        late replica starts from their state (call before serving)."""
        tracker = self.optimizer.tracker
        if tracker.global_progress.num_peers > 0:
            logger.info(f"{self.run_id}: {tracker.global_progress.num_peers} replica(s) at epoch "
                        f"{tracker.global_epoch}; downloading their state")
            self._report(self._download())

    def start(self, compute: Executor) -> None:
        """Starts submitting `advance` to `compute` (the executor of the compute thread)."""
        self._ticker = threading.Thread(target=self._tick_loop, args=(compute,), name="swarmlm-span-trainer",
                                        daemon=True)
        self._ticker.start()
        logger.info(f"Training blocks {self.span.start}:{self.span.end} with run {self.run_id}: "
                    f"{self.config.target_batch_size} samples per epoch, lr {self.config.lr}")

    def shutdown(self, compute: Optional[Executor] = None, timeout: float = 30.0) -> None:
        """Stops ticking and leaves the run (on the compute thread when `compute` still runs)."""
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join(timeout)
        try:
            if compute is None:
                raise RuntimeError("no compute executor")
            compute.submit(self.optimizer.leave).result(timeout)
        except Exception:
            self.optimizer.leave()

    # ---- on the compute thread ----------------------------------------------------------------------

    def accumulate(self, grads: Sequence[Optional[torch.Tensor]], batch_size: int) -> None:
        """Adds one micro-batch's parameter gradients (the mean over its `batch_size` samples; None = zero,
        for blocks the request did not run) to this epoch's sum. Raises RequestError for non-finite ones."""
        if len(grads) != len(self.parameters):
            raise ValueError(f"expected {len(self.parameters)} gradients, got {len(grads)}")
        if not all(grad is None or bool(torch.isfinite(grad).all()) for grad in grads):
            raise RequestError("the micro-batch's parameter gradients are not finite; it was not accumulated")
        try:
            for param, grad in zip(self.parameters, grads):
                param.grad = grad.detach() if grad is not None else torch.zeros_like(param)
            self.optimizer.accumulate(batch_size)
        finally:
            for param in self.parameters:
                param.grad = None
        self._wake.set()

    def advance(self) -> Optional[EpochFinished]:
        """Moves to the next epoch when the replicas finished this one (or downloads their state when this
        replica fell 2+ epochs behind); returns what happened, or None when the epoch goes on."""
        opt = self.optimizer
        if opt.epochs_behind >= 2:
            return self._report(self._download())
        if not opt.epoch_is_over():
            opt.prepare()
            return None
        epoch, local, swarm = opt.local_epoch, opt.grad_averager.local_samples_accumulated, \
            opt.tracker.global_progress.samples_accumulated
        before = opt.rounds.snapshot()
        self._emit(RoundStarted(self.span.start, self.span.end, epoch))
        opt.end_epoch()
        after = opt.rounds.snapshot()
        report = EpochFinished(
            self.span.start, self.span.end, opt.local_epoch, local_samples=local, swarm_samples=swarm,
            gradient_peers=_new_round_size(before, after, "gradients"),
            state_peers=_new_round_size(before, after, "state"),
            rounds_completed=after["completed"]["gradients"], rounds_failed=after["failed"]["gradients"])
        if self.on_rounds is not None:
            self.on_rounds(after)
        if not all(bool(torch.isfinite(param).all()) for param in self.parameters):
            logger.error(f"{self.run_id}: parameters are not finite after epoch {epoch}; lower the learning rate")
        return self._report(report)

    # ---- internals -----------------------------------------------------------------------------------

    def _download(self) -> EpochFinished:
        opt = self.optimizer
        before = opt.local_epoch
        opt.load_state_from_peers()
        if opt.local_epoch == before and opt.epochs_behind > 0:
            logger.warning(f"{self.run_id}: could not download the replicas' state; training on from epoch {before}")
        rounds = opt.rounds.snapshot()
        return EpochFinished(self.span.start, self.span.end, opt.local_epoch, local_samples=0, swarm_samples=0,
                             gradient_peers=0, state_peers=0, rounds_completed=rounds["completed"]["gradients"],
                             rounds_failed=rounds["failed"]["gradients"], downloaded=True)

    def _report(self, report: EpochFinished) -> EpochFinished:
        logger.info(f"{self.run_id}: " + report.line())
        self._emit(report)
        return report

    def _emit(self, report: TrainingReport) -> None:
        if self.on_report is not None:
            try:
                self.on_report(report)
            except Exception as e:
                logger.warning(f"Training report callback failed: {e!r}")

    def _tick_loop(self, compute: Executor) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_period)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                future = compute.submit(self.advance)
            except RuntimeError:  # the compute executor was shut down: the peer is stopping
                break
            try:
                future.result()
            except Exception as e:
                logger.warning(f"{self.run_id}: ending the epoch failed: {e!r}; retrying", exc_info=True)


def _new_round_size(before: dict, after: dict, kind: str) -> int:
    """Group size of the `kind` round that completed between two snapshots (0 if none did)."""
    return after["last_group_size"][kind] if after["completed"][kind] > before["completed"][kind] else 0


__all__ = ["EpochFinished", "RoundStarted", "SpanTrainer", "SpanTrainingConfig", "TrainingReport", "span_run_id"]
