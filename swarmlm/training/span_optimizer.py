"""hivemind.Optimizer adapted to a peer that trains its span while serving requests (hivemind 1.1.12).

  SpanOptimizer            `step` split into `accumulate` (per micro-batch) and `end_epoch` (the transition);
                           epochs end on counted samples only; a stale pre-scheduled round is replaced, not
                           a reason to skip averaging; `leave` (non-finite averages are refused by
                           ObservedOptimizer)
  ReplicaProgressTracker   an idle replica keeps reporting, so its replicas keep averaging with it

These override private methods of hivemind 1.1.12 (the version pyproject.toml pins), like ObservedOptimizer
does; revisit them when upgrading hivemind. Used by `swarmlm.training.span_trainer.SpanTrainer`.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from swarmlm.training.optimizer import ObservedOptimizer

logger = logging.getLogger(__name__)


class ReplicaProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker (1.1.12), except that a replica reports its progress even while it gets no
    micro-batches. hivemind stops reporting a peer two epochs after its last sample; but clients route
    micro-batches to replicas as they please, and an idle replica must still count as a member of the run,
    so that the others average with it (it joins with weight 0) and it stays identical to them."""

    async def _progress_reporter(self):
        """Reports at once (a new replica counts from the start), then on every change and every half expiration."""
        store_task = None
        try:
            while not self.shutdown_triggered.is_set():
                reported_at = get_dht_time()
                store_task = asyncio.create_task(asyncio.wait_for(self.dht.store(
                    key=self.training_progress_key, subkey=self._local_public_key, value=self.local_progress.dict(),
                    expiration_time=reported_at + self.metadata_expiration, return_future=True,
                ), timeout=self.metadata_expiration))
                await asyncio.get_running_loop().run_in_executor(None, self.should_report_progress.wait,
                                                                 self.metadata_expiration / 2)
                self.should_report_progress.clear()
        finally:
            if store_task is not None:
                store_task.cancel()


class SpanOptimizer(ObservedOptimizer):
    """hivemind.Optimizer.step split into its two halves, for a peer that serves requests: `accumulate` (per
    micro-batch: add gradients, report progress, pre-schedule averaging) and `end_epoch` (the transition,
    when `epoch_is_over`). An epoch ends on counted samples only, not on hivemind's time estimate, which
    would move an idle replica to the next epoch with no gradients. Call every method on one thread."""

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return ReplicaProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                      client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                      **kwargs)

    def accumulate(self, batch_size: int) -> None:
        """Adds the parameters' .grad (the mean gradient of `batch_size` samples) to this epoch's sum."""
        self.grad_averager.accumulate_grads_(batch_size)
        self.tracker.report_local_progress(self.local_epoch, self.grad_averager.local_samples_accumulated)
        self.prepare()

    @property
    def epochs_behind(self) -> int:
        return self.tracker.global_epoch - self.local_epoch

    def epoch_is_over(self) -> bool:
        """The replicas reached target_batch_size, or one of them already moved on (join its round)."""
        progress = self.tracker.global_progress
        return self.epochs_behind >= 1 or progress.samples_accumulated >= self.target_batch_size

    def prepare(self) -> None:
        """Pre-schedules the averaging rounds while the replicas accumulate this epoch (not when alone: the
        round would only be cancelled at the end of the epoch)."""
        progress = self.tracker.global_progress
        if progress.samples_accumulated > 0 and progress.num_peers > 1:
            self._maybe_schedule_gradient_averaging()
            self._maybe_schedule_state_averaging()

    def end_epoch(self) -> None:
        """All-reduces gradients, applies the optimizer step, averages the state when due."""
        stale = self.scheduled_grads
        if stale is not None and (stale.triggered or stale.done()):
            # its matchmaking ended before the epoch did; hivemind would then skip this epoch's gradient
            # averaging altogether (while the other replicas wait for this one): start a fresh round instead
            self.scheduled_grads = None
        self._update_global_epoch(None)

    def leave(self) -> None:
        """Leaves the run: cancels rounds that were only pre-scheduled (hivemind's shutdown would otherwise wait
        for them with weight 0 until the averaging timeout, though no replica will start them), shuts down."""
        for control in (self.scheduled_grads, self.scheduled_state):
            if control is not None and not control.triggered and not control.done():
                control.cancel()
        self.scheduled_grads = self.scheduled_state = None
        self.shutdown()
