"""GuardedStateAverager (swarmlm/training/state_averager.py) against hivemind's TrainingStateAverager, in-process.

Two or three real averagers on a loopback DHT: downloads, averaging rounds, and peers that send NaN. The
first test also pins the hivemind behaviour the guard exists for: a download from a plain averager moves
its live parameters into shared memory, in place (while a training thread may be updating them).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from swarmlm.dht.node import create_dht, shutdown_dht
from swarmlm.training.state_averager import GuardedStateAverager

PREFIX = "unit_state"
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def dhts():
    first = create_dht([], ["/ip4/127.0.0.1/tcp/0"])
    others = [create_dht(first.get_visible_maddrs(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2)]
    yield [first, *others]
    for dht in [first, *others]:
        shutdown_dht(dht)


def _averager(cls, dht, prefix: str, fill: float | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    if fill is not None:
        with torch.no_grad():
            model[0].weight.fill_(fill)
    averager = cls(dht=dht, prefix=prefix, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
                   params=model.parameters(), average_opt_statistics=("exp_avg", "exp_avg_sq"),
                   min_matchmaking_time=1.0, request_timeout=1.0, allreduce_timeout=TIMEOUT, start=True)
    return averager, model


def _params(model) -> list[torch.Tensor]:
    return [param.detach().clone() for param in model.parameters()]


def test_a_download_gets_a_snapshot_and_leaves_the_live_tensors_alone(dhts):
    for source_class, shares_live_tensors in ((TrainingStateAverager, True), (GuardedStateAverager, False)):
        prefix = f"{PREFIX}_download_{source_class.__name__}"
        source, source_model = _averager(source_class, dhts[0], prefix, seed=1)
        target, target_model = _averager(GuardedStateAverager, dhts[1], prefix, seed=2)
        try:
            target.load_state_from_peers(timeout=TIMEOUT)
            assert all(torch.equal(a, b) for a, b in zip(_params(source_model), _params(target_model)))
            # hivemind hands the live tensors to its pipe, which moves them into shared memory in place
            assert all(param.is_shared() for param in source_model.parameters()) == shares_live_tensors
        finally:
            source.shutdown()
            target.shutdown()


def test_the_snapshot_waits_for_a_running_optimizer_step(dhts):
    averager, model = _averager(GuardedStateAverager, dhts[0], f"{PREFIX}_lock")
    try:
        taken = threading.Event()
        with averager.lock_optimizer:  # what hivemind holds while it steps the optimizer
            thread = threading.Thread(target=lambda: (averager.get_current_state(), taken.set()))
            thread.start()
            assert not taken.wait(0.5)
        thread.join(TIMEOUT)
        assert taken.is_set()
        _, tensors, _ = averager.get_current_state()
        live = {param.data_ptr() for param in model.parameters()}
        assert not live & {tensor.data_ptr() for tensor in tensors}  # copies, not the live tensors
    finally:
        averager.shutdown()


def test_non_finite_local_state_is_neither_shared_nor_averaged(dhts):
    averager, _ = _averager(GuardedStateAverager, dhts[0], f"{PREFIX}_local_nan", fill=float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="refusing to share"):
            averager.get_current_state()
        with pytest.raises(FloatingPointError, match="refusing to average"):
            averager._load_local_tensors_into_averager_()
    finally:
        averager.shutdown()


def test_a_nan_state_from_a_peer_is_refused(dhts):
    prefix = f"{PREFIX}_download_nan"
    liar, _ = _averager(TrainingStateAverager, dhts[0], prefix, fill=float("nan"))  # hivemind shares anything
    target, target_model = _averager(GuardedStateAverager, dhts[1], prefix, seed=3)
    before, epoch = _params(target_model), target.local_epoch
    try:
        liar.local_epoch = 5  # a newer epoch: hivemind would take its state
        target.load_state_from_peers(timeout=TIMEOUT)
        assert target.refused_downloads == 1 and target.local_epoch == epoch
        assert all(torch.equal(a, b) for a, b in zip(before, _params(target_model)))
    finally:
        liar.shutdown()
        target.shutdown()


def test_a_round_with_a_nan_peer_leaves_the_honest_peers_as_they_were(dhts):
    prefix = f"{PREFIX}_round_nan"
    honest = [_averager(GuardedStateAverager, dhts[i], prefix, seed=10 + i) for i in range(2)]
    liar = _averager(TrainingStateAverager, dhts[2], prefix, fill=float("nan"))
    before = [_params(model) for _, model in honest]
    try:
        with ThreadPoolExecutor(3) as pool:
            rounds = [pool.submit(averager.step, averaging_round=True, averaging_opts=dict(timeout=TIMEOUT))
                      for averager, _ in [*honest, liar]]
            for future in rounds:
                future.result(TIMEOUT * 2)
        for (averager, model), old in zip(honest, before):
            assert averager.refused_rounds == 1
            assert all(torch.equal(a, b) for a, b in zip(old, _params(model)))
        with torch.no_grad():
            assert not torch.isfinite(liar[1][0].weight).all()  # an unguarded peer took the NaN average
    finally:
        for averager, _ in [*honest, liar]:
            averager.shutdown()


def test_a_round_between_honest_peers_averages_them(dhts):
    prefix = f"{PREFIX}_round_ok"
    peers = [_averager(GuardedStateAverager, dhts[i], prefix, seed=20 + i) for i in range(2)]
    expected = [(a + b) / 2 for a, b in zip(_params(peers[0][1]), _params(peers[1][1]))]
    try:
        with ThreadPoolExecutor(2) as pool:
            rounds = [pool.submit(averager.step, averaging_round=True, averaging_opts=dict(timeout=TIMEOUT))
                      for averager, _ in peers]
            for future in rounds:
                future.result(TIMEOUT * 2)
        for averager, model in peers:
            assert averager.refused_rounds == 0
            for got, want in zip(_params(model), expected):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    finally:
        for averager, _ in peers:
            averager.shutdown()


class _Round:
    """Stands in for a finished hivemind StepControl (only what AveragingRounds.record reads)."""

    def __init__(self, error: Exception | None = None):
        self.error = error

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def exception(self):
        return self.error

    def result(self):
        return {"peer a": 0, "peer b": 0}


def test_a_refused_average_counts_as_one_failed_round():
    from swarmlm.training.optimizer import AveragingRounds

    rounds = AveragingRounds(tensor_bytes=dict(gradients=10, state=20))
    rounds.record("state", _Round())
    rounds.record("state", _Round(), refused=True)  # the all-reduce finished, its average was not finite
    rounds.record("state", _Round(TimeoutError()), refused=True)  # failed, and its partial average refused too
    assert rounds.completed["state"] == 1 and rounds.failed["state"] == 2
    assert rounds.contributed_bytes["state"] == 40  # ours went out in both finished all-reduces
    assert rounds.last_group_size["state"] == 0
