"""Parsing and validation of what callers send a peer: every tensor and field is checked before use.

`RequestParser` turns a request's tensors into tensors on the peer's device and dtype, or raises
`RequestError` with what is wrong (never `assert`). The checks run on numpy views of the message
(array_bounded); torch tensors are made once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from swarmlm.errors import RequestError
from swarmlm.experts.protocol import InferenceStep, SpanRequest, all_finite, array_bounded, as_tensor, deserialize_bounded
from swarmlm.experts.span import BlockSpan

if TYPE_CHECKING:
    from swarmlm.peer.sessions import Session

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, np.float32, np.float16)  # torch's, or numpy's
INDEX_DTYPES = (torch.int64, torch.int32, np.int64, np.int32)  # position ids
MASK_DTYPES = (torch.bool, torch.int64, torch.int32, torch.uint8, torch.int8,
               np.bool_, np.int64, np.int32, np.uint8, np.int8)


@dataclass(frozen=True)
class Limits:
    hidden_size: int
    max_batch_size: int
    max_request_tokens: int
    max_session_length: int
    request_timeout: float
    session_timeout: float
    open_timeout: float = 10.0  # seconds a new inference channel may take to send its session request
    max_queued_jobs: int = 64  # jobs waiting for or running on the compute thread at most (more: busy)

    def max_message_bytes(self, prompts: bool = True) -> int:
        """The largest inference message read: float32 hidden states of max_request_tokens tokens, as much
        again for deep prompts (see parse_prompts; pushed steps carry none: `prompts=False`), 16 bytes per
        token for position ids and mask, and 1 MiB for metadata and framing."""
        tokens = self.max_request_tokens
        return 4 * tokens * self.hidden_size * (2 if prompts else 1) + 16 * tokens + 2**20

    def max_call_bytes(self) -> int:
        """The largest forward/backward/state request read: an inference message's, plus the gradients of a
        backward call (float32, as large as the hidden states)."""
        return self.max_message_bytes() + 4 * self.max_request_tokens * self.hidden_size


class RequestParser:
    """Validates requests against `limits` and places their tensors on `device` in `dtype` (the blocks')."""

    def __init__(self, model: str, limits: Limits, dtype: torch.dtype, device: torch.device):
        self.model, self.limits, self.dtype, self.device = model, limits, dtype, device

    def check_span(self, request: SpanRequest, span: BlockSpan) -> tuple[int, int]:
        """Returns the requested blocks relative to `span` (the peer's span when the request came;
        a request keeps using it even if the peer moves meanwhile)."""
        if request.model != self.model:
            raise RequestError(f"this peer serves model {self.model!r}, not {request.model!r}")
        if not span.start <= request.start < request.end <= span.end:
            raise RequestError(
                f"blocks {request.start}:{request.end} of {self.model} are not served here "
                f"(this peer serves {span.start}:{span.end})"
            )
        return request.start - span.start, request.end - span.start

    def check_session(self, request: SpanRequest) -> tuple[int, int]:
        """(max_length, batch) of a session request, within this peer's limits."""
        max_length, batch = request.max_length, request.batch_size
        if max_length is None or batch is None:
            raise RequestError("an inference session needs max_length and batch_size")
        if max_length > self.limits.max_session_length or batch > self.limits.max_batch_size:
            raise RequestError(
                f"session of batch {batch} x max_length {max_length} exceeds this peer's limits "
                f"(batch <= {self.limits.max_batch_size}, max_length <= {self.limits.max_session_length})"
            )
        return max_length, batch

    def parse_prompts(self, tensors, prompt_tokens: int, num_blocks: int):
        """Splits off the trailing deep-prompts tensor [num_blocks, prompt_tokens, hidden] (if announced)."""
        if prompt_tokens == 0:
            return tensors, None
        if len(tensors) < 1:
            raise RequestError("the request announces deep prompts but carries no tensors")
        hidden_size, max_tokens = self.limits.hidden_size, self.limits.max_request_tokens
        if num_blocks * prompt_tokens > max_tokens:
            raise RequestError(f"deep prompts for {num_blocks} blocks x {prompt_tokens} tokens exceed this peer's "
                               f"limit of {max_tokens} (blocks x prompt tokens)")
        prompts = deserialize_bounded(tensors[-1], num_blocks * prompt_tokens * hidden_size, "prompts")
        if prompts.shape != (num_blocks, prompt_tokens, hidden_size):
            raise RequestError(f"prompts must be [{num_blocks}, {prompt_tokens}, {hidden_size}], got {list(prompts.shape)}")
        if prompts.dtype not in FLOAT_DTYPES or not all_finite(prompts):
            raise RequestError(f"prompts must be finite float32/float16/bfloat16, got {prompts.dtype}")
        return tensors[:-1], prompts.to(self.device, self.dtype)

    def parse_inputs(self, tensors, expect_grad: bool = False, mask_offset: int = 0, prompts=None):
        """[hidden, (grad,) position_ids, (attention_mask)] -> (hidden, grad or None, position_ids, mask or None)."""
        limits = self.limits
        n_required = 3 if expect_grad else 2
        if not n_required <= len(tensors) <= n_required + 1:
            raise RequestError(f"expected {n_required} or {n_required + 1} tensors, got {len(tensors)}")
        max_elems = limits.max_request_tokens * limits.hidden_size
        hidden = array_bounded(tensors[0], max_elems, "hidden_states")
        if hidden.ndim != 3 or hidden.shape[-1] != limits.hidden_size:
            raise RequestError(f"hidden_states must be [batch, seq, {limits.hidden_size}], got {list(hidden.shape)}")
        batch, seq = hidden.shape[:2]
        if batch < 1 or seq < 1 or batch > limits.max_batch_size or batch * seq > limits.max_request_tokens:
            raise RequestError(
                f"hidden_states shape {list(hidden.shape)} is outside limits (batch <= {limits.max_batch_size}, "
                f"batch x seq <= {limits.max_request_tokens}, both >= 1)"
            )
        if hidden.dtype not in FLOAT_DTYPES or not all_finite(hidden):
            raise RequestError(f"hidden_states must be finite float32/float16/bfloat16, got {hidden.dtype}")
        grad = None
        if expect_grad:
            grad = array_bounded(tensors[1], max_elems, "grad_outputs")
            if tuple(grad.shape) != tuple(hidden.shape) or grad.dtype not in FLOAT_DTYPES:
                raise RequestError(f"grad_outputs must match hidden_states {list(hidden.shape)}, got {list(grad.shape)}")
        position_ids = array_bounded(tensors[n_required - 1], batch * seq, "position_ids")
        if tuple(position_ids.shape) != (batch, seq) or position_ids.dtype not in INDEX_DTYPES:
            raise RequestError(f"position_ids must be int64 [{batch}, {seq}], got {position_ids.dtype} {list(position_ids.shape)}")
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= limits.max_session_length:
            raise RequestError(f"position_ids must lie in [0, {limits.max_session_length})")
        mask = None
        if len(tensors) == n_required + 1:
            mask = array_bounded(tensors[-1], batch * (mask_offset + seq), "attention_mask")
            if tuple(mask.shape) != (batch, mask_offset + seq):
                raise RequestError(f"attention_mask must be [{batch}, {mask_offset + seq}], got {list(mask.shape)}")
            if mask.dtype not in MASK_DTYPES or bool(((mask != 0) & (mask != 1)).any()):
                raise RequestError("attention_mask must hold only 0 and 1")
            mask = as_tensor(mask).to(torch.bool)
        if prompts is not None and prompts.shape[1] > seq:
            raise RequestError(f"{prompts.shape[1]} prompt tokens do not fit in a sequence of {seq}")
        return (self._placed(as_tensor(hidden)), self._placed(as_tensor(grad)) if grad is not None else None,
                self._placed(as_tensor(position_ids), torch.int64), mask)

    def parse_step(self, session: "Session", step: InferenceStep, tensors):
        """Validates a step against its session -> (hidden, position_ids, mask, prompts)."""
        if step.position > session.length:
            raise RequestError(f"step starts at position {step.position} but the session holds {session.length} tokens")
        if step.prompt_tokens and step.position != 0:
            raise RequestError("deep prompts can only come with a step at position 0")
        tensors, prompts = self.parse_prompts(tensors, step.prompt_tokens, session.last - session.first)
        hidden, _, position_ids, mask = self.parse_inputs(tensors, prompts=prompts)
        if hidden.shape[0] != session.batch:
            raise RequestError(f"session batch is {session.batch}, step has batch {hidden.shape[0]}")
        if step.position + hidden.shape[1] > session.max_length:
            raise RequestError(
                f"step would grow the session to {step.position + hidden.shape[1]} tokens, beyond its max_length {session.max_length}"
            )
        return hidden, position_ids, mask, prompts

    def _placed(self, tensor: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
        """`tensor` on the peer's device in `dtype` (default: the blocks' dtype); no torch call when it already is."""
        dtype = self.dtype if dtype is None else dtype
        if tensor is None or (tensor.dtype == dtype and tensor.device == self.device):
            return tensor
        return tensor.to(self.device, dtype)
