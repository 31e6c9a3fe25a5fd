"""hivemind.Optimizer configured for swarmlm trainers, reporting how each averaging round ended.

Two modes (TrainConfig.local_updates):
  synchronous (default)  gradients are accumulated until the swarm has processed target_batch_size samples,
                         averaged with all-reduce, and every trainer applies the same AdamW step;
  local updates          DiLoCo-style: every step updates the local parameters; at each epoch boundary the
                         parameters (and Adam statistics) are averaged, i.e. an outer step with SGD lr=1.
In both modes parameters and Adam statistics are averaged synchronously every `average_state_every`
epochs, which also repairs any drift left by a failed round (a peer that died mid-all-reduce).
Averages and downloaded state that are not finite are refused (swarmlm.training.state_averager), and so
are averaged gradients: the trainer keeps its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import hivemind
import torch

from swarmlm.dht.node import sign_hivemind_records_as
from swarmlm.training.config import TrainConfig
from swarmlm.training.state_averager import GuardedStateAverager, all_finite

logger = logging.getLogger(__name__)

ADAM_STATISTICS = ("exp_avg", "exp_avg_sq")
AVERAGING_KINDS = ("gradients", "state")  # what AveragingRounds counts (and the metrics' `kind` label)


def _per_kind() -> dict[str, int]:
    return dict.fromkeys(AVERAGING_KINDS, 0)


@dataclass
class AveragingRounds:
    """How averaging rounds ended, by kind ("gradients", "state"); the source of training metrics.

    `tensor_bytes[kind]`: bytes of this node's tensors in one round of that kind (elements x element size,
    uncompressed); `contributed_bytes[kind]` adds them up over the rounds whose all-reduce finished."""

    completed: dict[str, int] = field(default_factory=_per_kind)
    failed: dict[str, int] = field(default_factory=_per_kind)
    last_group_size: dict[str, int] = field(default_factory=_per_kind)
    tensor_bytes: dict[str, int] = field(default_factory=_per_kind)
    contributed_bytes: dict[str, int] = field(default_factory=_per_kind)

    def record(self, kind: str, control, refused: bool = False) -> None:
        """Counts a finished round from its StepControl (a cancelled round never ran: not counted). A round whose
        all-reduce finished but whose average this node `refused` (not finite) counts as failed."""
        if control.cancelled():
            return
        error = control.exception() if control.done() else TimeoutError("round did not finish")
        if error is None:
            self.contributed_bytes[kind] += self.tensor_bytes[kind]
        if error is None and not refused:
            self.completed[kind] += 1
            self.last_group_size[kind] = len(control.result())
        else:
            self.failed[kind] += 1
            self.last_group_size[kind] = 0
            reason = "its average is not finite: refused" if error is None else repr(error)
            logger.info(f"Averaging {kind} failed ({reason}); continuing with local results")

    def snapshot(self) -> dict:
        return dict(completed=dict(self.completed), failed=dict(self.failed),
                    last_group_size=dict(self.last_group_size), contributed_bytes=dict(self.contributed_bytes))


class ObservedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that records the outcome of every gradient and state averaging round in `.rounds`,
    averages state with a GuardedStateAverager and refuses non-finite averaged gradients.

    State rounds are pre-scheduled here when hivemind would start them itself, so that their StepControl
    can be inspected after the (synchronous) round; nothing else changes. Overrides private methods
    of hivemind 1.1.12 (the version pyproject.toml pins); revisit them when upgrading hivemind.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds = AveragingRounds(tensor_bytes=dict(gradients=_tensor_bytes(self.grad_averager),
                                                        state=_tensor_bytes(self.state_averager)))

    def _make_state_averager(self, **kwargs) -> GuardedStateAverager:
        # hivemind 1.1.12's Optimizer._make_state_averager, with the guarded class
        return GuardedStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _load_averaged_gradients_into_optimizer_(self) -> None:
        """Refuses non-finite averaged gradients; hivemind then falls back to this trainer's own gradients.
        (A peer may send inf or NaN; and hivemind divides each part by the total weight of the contributions
        that arrived: 0/0 when only a weight-0 peer's part arrived, e.g. an idle replica whose partner timed
        out mid-round.)"""
        with torch.no_grad(), self.grad_averager.get_tensors() as averaged:
            finite = all_finite(averaged)
        if not finite:
            self._refused_average = True
            raise FloatingPointError("the averaged gradients are not finite")
        super()._load_averaged_gradients_into_optimizer_()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        self._refused_average = False
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if self._refused_average:
            logger.warning(f"{self.run_id}: refused non-finite averaged gradients; used this peer's own")
        if maybe_step_control is not None:
            self.rounds.record("gradients", maybe_step_control, refused=self._refused_average)

    def _update_global_epoch(self, grad_scaler) -> None:
        control = None
        if not self.auxiliary and self._will_average_state():
            if self.scheduled_state is None or self.scheduled_state.triggered or self.scheduled_state.done():
                next_epoch = max(self.local_epoch + 1, self.tracker.global_epoch)
                self.scheduled_state = self.state_averager.schedule_step(gather=next_epoch,
                                                                         timeout=self.averaging_timeout)
            control = self.scheduled_state
        refused_before = self.state_averager.refused_rounds
        super()._update_global_epoch(grad_scaler)
        if control is not None:
            self.rounds.record("state", control, refused=self.state_averager.refused_rounds > refused_before)

    def _will_average_state(self) -> bool:
        next_epoch = max(self.local_epoch + 1, self.tracker.global_epoch)
        return (self.tracker.global_progress.num_peers > 1 and next_epoch % self.average_state_every == 0
                and not self.state_averager.averaging_in_progress)


def _tensor_bytes(averager) -> int:
    """Bytes of the tensors `averager` puts into each of its rounds (0 without an averager)."""
    if averager is None:  # local updates: no gradient averager
        return 0
    with averager.get_tensors() as tensors:
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def make_optimizer(config: TrainConfig, dht: hivemind.DHT, model: torch.nn.Module) -> ObservedOptimizer:
    """The collaborative optimizer for `model` (AdamW) in the mode `config` asks for."""
    sign_hivemind_records_as(dht)
    return ObservedOptimizer(
        dht=dht,
        run_id=config.run_id,
        target_batch_size=config.target_batch_size,
        batch_size_per_step=config.batch_size,
        params=model.parameters(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
        matchmaking_time=config.matchmaking_time,
        averaging_timeout=config.averaging_timeout,
        load_state_timeout=config.load_state_timeout,
        use_local_updates=config.local_updates,
        delay_state_averaging=False,  # synchronous: every participant leaves the round with the same state
        average_state_every=config.average_state_every,
        average_opt_statistics=ADAM_STATISTICS,
        tracker_opts=dict(metadata_expiration=config.progress_expiration),
        averager_opts=dict(request_timeout=min(3.0, config.matchmaking_time / 2)),  # hivemind: keep below matchmaking
        verbose=logger.isEnabledFor(logging.DEBUG),
    )
