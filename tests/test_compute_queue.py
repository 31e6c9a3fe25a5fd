"""A peer's compute queue is bounded: beyond --max-queued-jobs, jobs are refused as busy (counted in
swarmlm_refused_jobs_total) instead of piling up with their tensors; a queued job whose caller gave up leaves the
queue and frees its place. In-process, on a real BlockCompute."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import generate_latest

from swarmlm.errors import LimitError, RequestError
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.peer.compute import BlockCompute


def test_a_full_compute_queue_refuses_jobs_and_given_up_jobs_free_their_places():
    metrics = PeerMetrics()
    compute = BlockCompute(torch.device("cpu"), request_timeout=30.0, metrics=metrics, max_jobs=3)
    gate = threading.Event()

    async def run():
        running = asyncio.create_task(compute.run(gate.wait))  # holds the compute thread
        waiting = [asyncio.create_task(compute.run(gate.wait, timeout=0.2)) for _ in range(2)]
        await asyncio.sleep(0)  # every task has submitted its job
        assert compute.jobs == 3
        with pytest.raises(LimitError, match="compute queue is full"):
            await compute.run(gate.wait)
        for task in waiting:  # their callers give up: they leave the queue without running
            with pytest.raises(RequestError, match="longer than its timeout"):
                await task
        assert compute.jobs == 1
        gate.set()
        assert await running is True
        assert await compute.run(lambda: 42) == 42 and compute.jobs == 0

    try:
        asyncio.run(run())
    finally:
        gate.set()
        compute.shutdown()
    text = generate_latest(metrics.registry).decode()
    assert "swarmlm_refused_jobs_total 1.0" in text and "swarmlm_compute_jobs 0.0" in text
