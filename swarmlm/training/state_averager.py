"""hivemind's TrainingStateAverager (1.1.12) made safe to share and to average with strangers.

`GuardedStateAverager` changes three things, and nothing else:

  snapshots      `get_current_state` (what a peer downloads from us) returns copies taken between optimizer
                 steps. hivemind returns the live parameter and Adam tensors; its host thread then sends them
                 through a multiprocessing pipe to the averager process, and pickling a CPU tensor for a pipe
                 moves its storage into shared memory in place (allocate, copy, swap, free the old buffer).
                 The training thread keeps stepping the optimizer meanwhile: updates are lost, or written into
                 the freed buffer, which the allocator hands to the next tensor. That is how a trainer in the
                 local-updates test got NaN parameters after a lagging partner downloaded its state.
  finite in      a state round whose averaged tensors are not all finite is refused: the local tensors stay
                 as they were (a peer may send inf or NaN, and hivemind divides each part by the weight that
                 arrived: 0/0 when only weight-0 parts did). So is downloaded state that is not finite.
  finite out     local tensors that are not finite are never contributed to a round or shared for download
                 (FloatingPointError: the round is skipped, the trainer's own loss check stops it).

It keeps hivemind's RPC names, so it averages with plain hivemind peers and older swarmlm trainers. It
overrides private methods of hivemind 1.1.12 (pinned in pyproject.toml), like ObservedOptimizer;
tests/test_state_averager.py pins them.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim.state_averager import TrainingStateAverager

logger = logging.getLogger(__name__)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point())


class _FiniteDownloads(DecentralizedAverager):
    """Sits between TrainingStateAverager and DecentralizedAverager in GuardedStateAverager's MRO, so that
    TrainingStateAverager.load_state_from_peers, which downloads with `super().load_state_from_peers()` and
    applies what it gets unless that is None, gets None for a state that is not finite: nothing is applied."""

    def load_state_from_peers(self, *args, **kwargs):
        loaded = super().load_state_from_peers(*args, **kwargs)
        if loaded is not None and not all_finite(loaded[1]):
            self.refused_downloads += 1
            logger.warning("Refused the training state downloaded from a peer: it is not finite; keeping ours")
            return None
        return loaded


class GuardedStateAverager(TrainingStateAverager, _FiniteDownloads):
    """TrainingStateAverager with snapshots for sharing and finiteness checks both ways (module docstring)."""

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        """The RPC names of hivemind's class (they embed the class name): peers running plain hivemind or an
        older swarmlm still average with and download from this one."""
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    def __init__(self, **kwargs):
        self._state_lock = threading.RLock()  # held while the live tensors are copied or averaged in
        self.refused_rounds = 0  # state rounds whose average was refused (not finite)
        self.refused_downloads = 0  # downloaded states refused (not finite)
        super().__init__(**kwargs)

    @contextmanager
    def _between_steps(self):
        """Holds off the writers of the live tensors: the optimizer step (hivemind's lock_optimizer, taken on
        its step thread) and applied averages (self._state_lock, taken on the training thread). A download
        applies under hivemind's lock_averaged_tensors, which hivemind's get_current_state takes too; it
        happens only while this trainer is out of sync, when others prefer peers further ahead."""
        with self._state_lock, self.lock_optimizer:
            yield

    def get_current_state(self):
        """hivemind's state for download, as copies taken between optimizer steps; refuses to share non-finite
        tensors (raises, so the downloading peer gets an error and tries another peer)."""
        with torch.no_grad(), self._between_steps():
            metadata, tensors, infos = super().get_current_state()
            snapshot = [tensor.detach().clone() for tensor in tensors]
        if not all_finite(snapshot):
            raise FloatingPointError("refusing to share non-finite training state")
        return metadata, snapshot, infos

    def _load_local_tensors_into_averager_(self):
        """Before a round (and after a download): refuses to contribute non-finite local tensors."""
        if not all_finite(self._local_tensors()):
            raise FloatingPointError("refusing to average non-finite local parameters or optimizer statistics")
        super()._load_local_tensors_into_averager_()

    def _apply_averaging_results_(self):
        """After a round: applies its average only if it is finite; otherwise the local tensors stay."""
        with torch.no_grad(), self._state_lock:
            with self.get_tensors() as averaged:
                finite = all_finite(averaged)
            if finite:
                super()._apply_averaging_results_()
                return
            self.refused_rounds += 1
            logger.warning("Refused a state averaging round: the averaged tensors are not finite; keeping ours")
            super()._load_local_tensors_into_averager_()  # the averager's buffers hold our tensors again
