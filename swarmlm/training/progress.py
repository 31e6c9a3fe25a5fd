"""What a trainer shows: a progress bar on stderr (epoch, swarm samples/s, loss, peers) and one
machine-readable report line per epoch on stdout."""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm.auto import tqdm


class SwarmRate:
    """Swarm-wide samples/s: target_batch_size samples per epoch over the wall time of recent epochs
    (this includes averaging, so it is what the swarm really achieves)."""

    def __init__(self, target_batch_size: int, window: int = 5):
        self.target_batch_size, self.window = target_batch_size, window
        self._marks: list[tuple[int, float]] = []  # (epoch, time.monotonic() when it began)

    def mark(self, epoch: int) -> None:
        self._marks = (self._marks + [(epoch, time.monotonic())])[-(self.window + 1):]

    @property
    def samples_per_second(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (first_epoch, first_time), (last_epoch, last_time) = self._marks[0], self._marks[-1]
        return (last_epoch - first_epoch) * self.target_batch_size / max(last_time - first_time, 1e-9)


class ProgressBar:
    """A tqdm bar over epochs; `enabled=False` makes every method a no-op."""

    def __init__(self, total_epochs: int, run_id: str, enabled: bool = True, initial_epoch: int = 0):
        self._bar: Optional[tqdm] = None
        if enabled:
            self._bar = tqdm(total=total_epochs, initial=initial_epoch, desc=f"train {run_id}", unit="epoch",
                             file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def update(self, epoch: int, loss: float, samples_per_second: float, num_peers: int) -> None:
        if self._bar is None:
            return
        if epoch > self._bar.n:
            self._bar.update(epoch - self._bar.n)
        self._bar.set_postfix_str(f"epoch={epoch} loss={loss:.3f} swarm={samples_per_second:.1f} samples/s "
                                  f"peers={num_peers}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def epoch_line(stats) -> str:
    """The machine-readable report of one epoch (an EpochStats), e.g.
    `EPOCH 3 train_loss=6.9 val_loss=6.8 val_ppl=898.1 peers=3 samples_per_s=41.2 rounds_ok=6 rounds_failed=0`."""
    return (f"EPOCH {stats.epoch} train_loss={stats.train_loss:.4f} val_loss={stats.val_loss:.4f} "
            f"val_ppl={stats.val_perplexity:.2f} peers={stats.num_peers} "
            f"samples_per_s={stats.swarm_samples_per_second:.1f} "
            f"rounds_ok={sum(stats.averaging['completed'].values())} "
            f"rounds_failed={sum(stats.averaging['failed'].values())}")
