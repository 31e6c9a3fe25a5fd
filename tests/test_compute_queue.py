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


def test_state_downloads_are_limited_while_they_hold_copies_of_the_blocks(tiny_model_path):
    """MAX_STATE_STREAMS block downloads run at once (each holds a copy of its blocks until read); one more is
    answered busy; once one ends, a new one is served."""
    from hivemind.p2p import P2PContext
    from hivemind.proto import runtime_pb2
    from transformers import AutoConfig

    from swarmlm.errors import RemotePeerError
    from swarmlm.experts.families import family_for_config
    from swarmlm.experts.protocol import SpanRequest, check_response, pack
    from swarmlm.experts.span import BlockSpan
    from swarmlm.peer.cache_budget import CacheBudget
    from swarmlm.peer.handler import MAX_STATE_STREAMS, SpanHandler
    from swarmlm.peer.validation import Limits

    config = AutoConfig.from_pretrained(tiny_model_path)
    span = BlockSpan(family_for_config(config), config, 0, 2)
    limits = Limits(hidden_size=config.hidden_size, max_batch_size=8, max_request_tokens=4096, max_session_length=512,
                    request_timeout=30.0, session_timeout=60.0)
    handler = SpanHandler(span, "unit-model", limits, CacheBudget(4096), torch.float32, torch.device("cpu"))
    context = P2PContext(handle_name="rpc_state", local_id="peer", remote_id="caller")

    def download():
        async def requests():
            yield runtime_pb2.ExpertRequest(metadata=pack(SpanRequest(model="unit-model", start=0, end=2)))
        return handler.rpc_state(requests(), context)

    async def run():
        held = [download() for _ in range(MAX_STATE_STREAMS)]
        for stream in held:
            check_response("peer", await stream.__anext__())  # its first chunk: it holds its snapshot
        with pytest.raises(RemotePeerError, match="state downloads run here already") as busy:
            check_response("peer", await download().__anext__())
        assert busy.value.code == "busy"
        await held[0].aclose()  # one caller leaves
        check_response("peer", await download().__anext__())
        for stream in held[1:]:
            await stream.aclose()

    try:
        asyncio.run(run())
    finally:
        handler.shutdown()
