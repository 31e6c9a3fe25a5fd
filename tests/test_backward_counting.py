"""A training peer counts a micro-batch's parameter gradients only when it answers the backward call.

A caller that gets no answer (its timeout passed, or it went away) retries the micro-batch on another peer, so a
peer that counted it anyway would count it twice in the swarm. These tests run a peer's request handler in this
process, on blocks 0:2 of the embedded model, with a trainer that records what it is given (the real trainer's
averaging is tested in test_span_training.py); the compute thread is held busy where a request must time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from transformers import AutoConfig

from swarmlm.client.rpc import _inputs
from swarmlm.errors import RemotePeerError
from swarmlm.experts.families import family_for_config
from swarmlm.experts.protocol import SpanRequest, check_response, deserialize_tensor, pack, serialize_all
from swarmlm.experts.span import BlockSpan
from swarmlm.peer.cache_budget import CacheBudget
from swarmlm.peer.compute import Counting
from swarmlm.peer.handler import CALLER_TIMEOUT_SHARE, SpanHandler
from swarmlm.peer.validation import Limits

MODEL, BATCH, SEQ = "unit-model", 2, 5


class RecordingTrainer:
    """What SpanHandler needs of a SpanTrainer; keeps each counted micro-batch (its gradients and size)."""

    def __init__(self, span: BlockSpan):
        self.span, self.parameters, self.epoch = span, list(span.parameters()), 0
        self.counted: list[tuple[list[torch.Tensor], int]] = []

    def accumulate(self, grads, batch_size: int) -> None:
        self.counted.append(([g.detach().clone() for g in grads], batch_size))


@pytest.fixture(scope="module")
def span(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    torch.manual_seed(0)
    return BlockSpan(family_for_config(config), config, 0, 2).requires_grad_(True)


@contextlib.contextmanager
def training_handler(span: BlockSpan, request_timeout: float = 60.0):
    limits = Limits(hidden_size=span.config.hidden_size, max_batch_size=8, max_request_tokens=4096,
                    max_session_length=512, request_timeout=request_timeout, session_timeout=60.0)
    trainer = RecordingTrainer(span)
    handler = SpanHandler(span, MODEL, limits, CacheBudget(4096), torch.float32, torch.device("cpu"), trainer=trainer)
    try:
        yield handler, trainer
    finally:
        handler.shutdown()


@contextlib.contextmanager
def busy_compute_thread(handler: SpanHandler):
    """Holds the handler's compute thread until the block ends; yields an event set once a job is queued behind
    the holder (the request under test). On exit, waits until the thread ran every queued job."""
    release, queued = threading.Event(), threading.Event()
    handler.compute.submit(release.wait)
    submit = handler.compute.submit

    def submit_and_tell(*args, **kwargs):
        future = submit(*args, **kwargs)
        queued.set()
        return future

    handler.compute.submit = submit_and_tell
    try:
        yield queued
    finally:
        handler.compute.submit = submit
        release.set()
        submit(lambda: None).result(timeout=60)


def inputs(span: BlockSpan):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(BATCH, SEQ, span.config.hidden_size, generator=generator)
    grad = torch.randn(BATCH, SEQ, span.config.hidden_size, generator=generator)
    return hidden, grad, torch.arange(SEQ).expand(BATCH, SEQ)


async def backward_call(handler: SpanHandler, span: BlockSpan, caller_timeout: float | None) -> list[torch.Tensor]:
    """One rpc_backward call as a client makes it -> the gradients answered; RemotePeerError for an error answer."""
    hidden, grad, position_ids = inputs(span)
    request = runtime_pb2.ExpertRequest(
        tensors=serialize_all(_inputs(hidden, position_ids, None, grad)),
        metadata=pack(SpanRequest(model=MODEL, start=0, end=2, timeout=caller_timeout)))

    async def requests():
        yield request

    context = P2PContext(handle_name="rpc_backward", local_id="peer", remote_id="caller")
    async for response in handler.rpc_backward(requests(), context):
        return [deserialize_tensor(t) for t in check_response("peer", response).tensors]
    raise AssertionError("no answer")


def local_gradients(span: BlockSpan) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The oracle: (grad of hidden, grads of the span's parameters) by local autograd."""
    hidden, grad, position_ids = inputs(span)
    hidden.requires_grad_(True)
    grads = torch.autograd.grad(span(hidden, position_ids), [hidden, *span.parameters()], grad)
    return grads[0], list(grads[1:])


def test_an_answered_backward_call_counts_its_micro_batch_once(span):
    expected_input_grad, expected_param_grads = local_gradients(span)
    with training_handler(span) as (handler, trainer):
        (input_grad,) = asyncio.run(backward_call(handler, span, caller_timeout=30.0))
    torch.testing.assert_close(input_grad, expected_input_grad, atol=1e-5, rtol=1e-4)
    assert len(trainer.counted) == 1
    param_grads, batch_size = trainer.counted[0]
    assert batch_size == BATCH
    for got, expected in zip(param_grads, expected_param_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_backward_call_past_its_callers_timeout_counts_nothing(span, caplog):
    """The caller waits 0.5 s (less than the peer's 60 s); its call waits behind a busy compute thread, is
    answered with a timeout error after CALLER_TIMEOUT_SHARE of that, and its job is taken off the queue:
    it never runs (a flood of such calls costs no compute and frees its inputs)."""
    caplog.set_level(logging.INFO, logger="swarmlm.peer.compute")
    with training_handler(span, request_timeout=60.0) as (handler, trainer):
        ran = []
        real = handler.blocks.backward
        handler.blocks.backward = lambda *args, **kwargs: ran.append(1) or real(*args, **kwargs)
        with busy_compute_thread(handler):
            with pytest.raises(RemotePeerError, match=f"longer than its timeout of {0.5 * CALLER_TIMEOUT_SHARE:.3g} s"):
                asyncio.run(backward_call(handler, span, caller_timeout=0.5))
        assert trainer.counted == [] and ran == []
        assert "Dropped a queued backward job before it ran" in caplog.text
        assert handler.metrics.registry.get_sample_value("swarmlm_dropped_micro_batches_total") == 1
        handler.blocks.backward = real
        asyncio.run(backward_call(handler, span, caller_timeout=30.0))  # the peer keeps serving and counting
        assert len(trainer.counted) == 1


def test_a_backward_job_that_ran_past_its_callers_timeout_drops_its_gradients(span, caplog):
    """The job had started when its caller's time ran out: it runs to its end, but counts nothing."""
    caplog.set_level(logging.INFO, logger="swarmlm.peer.compute")
    with training_handler(span, request_timeout=60.0) as (handler, trainer):
        started, release = threading.Event(), threading.Event()
        real = handler.blocks.backward

        def slow(*args, **kwargs):
            started.set()
            release.wait(60)
            return real(*args, **kwargs)

        handler.blocks.backward = slow
        with pytest.raises(RemotePeerError, match="longer than its timeout"):
            asyncio.run(backward_call(handler, span, caller_timeout=0.5))
        assert started.is_set()
        release.set()
        handler.compute.submit(lambda: None).result(timeout=60)  # the job has ended
        assert trainer.counted == []
        assert "Dropped the parameter gradients of a micro-batch of 2" in caplog.text
        assert handler.metrics.registry.get_sample_value("swarmlm_dropped_micro_batches_total") == 1


def test_a_backward_call_whose_caller_left_counts_nothing(span):
    """The request is cancelled (its caller's stream closed) while its job waits for the compute thread."""
    with training_handler(span) as (handler, trainer):
        async def call_then_leave(queued: threading.Event):
            call = asyncio.create_task(backward_call(handler, span, caller_timeout=30.0))
            while not queued.is_set():  # until the job waits behind the holder
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

        with busy_compute_thread(handler) as queued:
            asyncio.run(asyncio.wait_for(call_then_leave(queued), 60))
        assert trainer.counted == []


def test_counting_is_decided_once_by_whichever_side_comes_first():
    began = Counting()
    assert began.begin() and not began.abandon()  # the job counts: the request awaits its answer
    assert began.begin()
    abandoned = Counting()
    assert abandoned.abandon() and not abandoned.begin()  # the request gave up: the job drops its gradients
    assert abandoned.abandon()
