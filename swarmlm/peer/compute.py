"""Block compute of a peer: forward, backward, inference steps and state snapshots, on one compute thread.

Every job runs on `BlockCompute.executor` (one thread: optimizer steps of a training peer run there too, so no
job sees half-updated weights) under a timeout; tiny inference steps of a frozen CPU peer may run inline on the
event loop instead (`runs_inline`). A backward job of a training peer hands its parameter gradients to the
trainer only if its request still waits for the answer (`Counting`). At most `max_jobs` jobs wait or run at once
(each holds its request's tensors): more are refused as busy, so a flood of calls cannot grow the peer's memory
without bound or delay everyone by minutes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Optional

import torch

from swarmlm.errors import LimitError, RequestError
from swarmlm.experts.span import BlockSpan
from swarmlm.monitoring.metrics import PeerMetrics

if TYPE_CHECKING:
    from swarmlm.peer.sessions import Session
    from swarmlm.peer.trainer_hook import BlockTrainer

logger = logging.getLogger(__name__)

INLINE_MAX_TOKENS = 8  # inference steps of at most this many tokens (batch x seq) may run on the event loop...
INLINE_STEP_SECONDS = 0.02  # ...if such steps took at most this long (see runs_inline)
MAX_JOBS = 64  # jobs waiting for or running on the compute thread at most, by default


class Counting:
    """Decides once, between a backward job on the compute thread and its request on the event loop, whether
    the job's parameter gradients count: the job calls `begin` right before it counts them, the request calls
    `abandon` when it runs out of time or its caller goes away; whichever comes first wins. So a micro-batch is
    counted only by a peer that answers it (a caller that got no answer retries it on another peer)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counted: Optional[bool] = None

    def begin(self) -> bool:
        """The job may count its gradients (True), or the request gave up (False)."""
        with self._lock:
            if self._counted is None:
                self._counted = True
            return self._counted

    def abandon(self) -> bool:
        """The job will count nothing (True), or it began counting already (False: its answer must follow)."""
        with self._lock:
            if self._counted is None:
                self._counted = False
            return not self._counted


class BlockCompute:
    def __init__(self, device: torch.device, request_timeout: float, metrics: PeerMetrics,
                 trainer: Optional["BlockTrainer"] = None, max_jobs: int = MAX_JOBS):
        self.device, self.request_timeout, self.metrics, self.trainer = device, request_timeout, metrics, trainer
        self.max_jobs, self.jobs = max_jobs, 0  # jobs submitted and not finished
        self._jobs_lock = threading.Lock()
        metrics.watch_jobs(lambda: self.jobs)
        # torch's intra-op thread count is per thread under OpenMP: carry the process setting over
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="swarmlm-compute", initializer=torch.set_num_threads,
                                           initargs=(torch.get_num_threads(),))
        self.small_step_block_seconds = float("inf")  # observed time per block of recent small inference steps

    def runs_inline(self, hidden: torch.Tensor, num_blocks: int) -> bool:
        """Whether an inference step runs right on the event loop instead of the compute thread: only a
        few tokens on a frozen CPU peer whose recent small steps took under INLINE_STEP_SECONDS for these
        blocks (the first ones always go to the compute thread, which measures them). The hand-off to the
        compute thread and back costs about 0.25 ms per step on a busy 2-core machine, a tenth of a small
        model's step; a step this short holds up the loop's other streams only briefly."""
        return (self.trainer is None and self.device.type == "cpu" and hidden.shape[0] * hidden.shape[1] <= INLINE_MAX_TOKENS
                and num_blocks * self.small_step_block_seconds <= INLINE_STEP_SECONDS)

    async def run(self, fn, *args, timeout: Optional[float] = None, counting: Optional[Counting] = None):
        """Runs `fn` on the compute thread under `timeout` (default: the request timeout). A job that runs out of
        time, or whose caller goes away, before it started is taken off the queue (it never runs). With
        `counting` (passed on to `fn`), one that already runs counts nothing: unless `fn` already began
        counting, then its result is awaited and answered (see Counting)."""
        timeout = self.request_timeout if timeout is None else timeout
        if self.jobs >= self.max_jobs:
            self.metrics.job_refused()
            raise LimitError(f"the peer's compute queue is full ({self.max_jobs} jobs wait or run); retry later or "
                             f"use another peer")
        queued = self.executor.submit(fn if counting is None else partial(fn, counting=counting), *args)
        with self._jobs_lock:
            self.jobs += 1
        queued.add_done_callback(self._job_done)
        job = asyncio.wrap_future(queued)  # cancelling it cancels `queued` if it has not started
        try:
            return await asyncio.wait_for(job if counting is None else asyncio.shield(job), timeout)
        except asyncio.TimeoutError:
            if counting is None or counting.abandon():
                self._unqueue(queued, counting)
                raise RequestError(f"the request took longer than its timeout of {timeout:.3g} s (the peer's "
                                   f"request timeout, or less if the caller waits less)") from None
            return await job  # it is counting its gradients already: they go back to the caller
        except asyncio.CancelledError:
            if counting is not None and counting.abandon():
                self._unqueue(queued, counting)
            raise

    def _job_done(self, queued) -> None:
        """A job finished or was taken off the queue (called on the compute thread or the loop's)."""
        with self._jobs_lock:
            self.jobs -= 1

    def _unqueue(self, queued, counting: Optional[Counting]) -> None:
        """Takes a job whose request gave up off the compute thread's queue, if it has not started."""
        if queued.cancel() and counting is not None:
            self.metrics.micro_batch_dropped()
            logger.info("Dropped a queued backward job before it ran: its request gave up")

    def forward(self, span: BlockSpan, hidden, position_ids, mask, first, last, prompts=None):
        with torch.inference_mode():
            return span(hidden, position_ids, mask, first=first, last=last, prompts=prompts).float()

    def backward(self, span: BlockSpan, hidden, grad, position_ids, mask, first, last, prompts=None,
                 counting: Optional[Counting] = None) -> list[torch.Tensor]:
        """-> [grad of hidden] (+ [grad of prompts] when deep prompts were sent). On a training peer, the
        gradients of the span's parameters go to the trainer (the micro-batch counts hidden.shape[0] samples),
        unless `counting` says that the request gave up meanwhile (its caller retries elsewhere)."""
        trainer = self.trainer if self.trainer is not None and span is self.trainer.span else None
        params = trainer.parameters if trainer is not None else []
        with torch.enable_grad():
            inputs = [hidden.detach().requires_grad_(True)]
            if prompts is not None:
                inputs.append(prompts.detach().requires_grad_(True))
            output = span(inputs[0], position_ids, mask, first=first, last=last,
                          prompts=inputs[1] if prompts is not None else None)
            grads = torch.autograd.grad(output, inputs + params, grad, allow_unused=bool(params))
        if trainer is not None:
            if counting is not None and not counting.begin():
                self.metrics.micro_batch_dropped()
                logger.info(f"Dropped the parameter gradients of a micro-batch of {hidden.shape[0]}: its request "
                            f"gave up before they were ready")
            else:
                trainer.accumulate(grads[len(inputs):], batch_size=hidden.shape[0])  # blocks outside [first, last): None
        return [g.float() for g in grads[:len(inputs)]]

    def snapshot(self, span: BlockSpan, first: int, last: int) -> tuple[Optional[int], list[tuple[str, torch.Tensor]]]:
        """(training epoch, [(checkpoint name, CPU copy)]) of blocks [first, last) of `span`, taken on the compute
        thread, so that no optimizer step falls between two tensors."""
        epoch = self.trainer.epoch if self.trainer is not None and span is self.trainer.span else None
        named = []
        for j in range(first, last):
            prefix = f"{span.family.block_prefix}{span.start + j}."
            named += [(prefix + name, tensor.detach().to("cpu", copy=True))
                      for name, tensor in span.layers[j].state_dict().items()]
        return epoch, named

    async def inference_step(self, session: "Session", position: int, hidden, position_ids, mask, prompts):
        """One step of `session` (inline or on the compute thread, see runs_inline) -> its output (float32)."""
        if self.runs_inline(hidden, session.last - session.first):
            return self._timed_step(session, position, hidden, position_ids, mask, prompts)
        return await self.run(self._timed_step, session, position, hidden, position_ids, mask, prompts)

    def _timed_step(self, session: "Session", position: int, hidden, position_ids, new_mask, prompts=None):
        started = time.perf_counter()
        output = self._step(session, position, hidden, position_ids, new_mask, prompts)
        if hidden.shape[0] * hidden.shape[1] <= INLINE_MAX_TOKENS:  # exponential average, for runs_inline
            seconds = (time.perf_counter() - started) / (session.last - session.first)
            previous = self.small_step_block_seconds
            self.small_step_block_seconds = seconds if previous == float("inf") else 0.8 * previous + 0.2 * seconds
        return output

    def _step(self, session: "Session", position: int, hidden, position_ids, new_mask, prompts=None):
        with torch.inference_mode():
            if position < session.length:
                session.cache.truncate(position)
                session.mask = session.mask[:, :position] if session.mask is not None else None
            seq = hidden.shape[1]
            if new_mask is not None or session.mask is not None:
                old = session.mask if session.mask is not None else torch.ones(session.batch, position, dtype=torch.bool)
                new = new_mask if new_mask is not None else torch.ones(session.batch, seq, dtype=torch.bool)
                session.mask = torch.cat([old, new], dim=1)
            output = session.span(hidden, position_ids, session.mask, session.cache, first=session.first,
                                  last=session.last, prompts=prompts)
            session.length = position + seq
            return output.float()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
