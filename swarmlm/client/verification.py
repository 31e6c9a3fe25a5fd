"""Verifying what peers answer: a peer may return well-shaped, finite, wrong hidden states.

An audit recomputes a route segment (blocks [a, b)) for every token the session holds, from the inputs the client
recorded, on peers other than the ones that produced the recorded outputs (or with the client's own copy of those
blocks, when its checkpoint holds them), and compares token by token: relative L2 error at most `verify_tolerance`.
When the two disagree, a third computation decides (local blocks when held, else yet other peers): the side it
contradicts lied. A liar is banned for the client's lifetime; the session rolls back to the first wrong token.

Because an audit covers every token from the last verified one on, one audit after the last token (generate() runs
it before returning) catches every corrupted answer beyond the tolerance, whatever fraction of answers a peer
corrupts, provided an honest independent computation exists. Audits during decoding (each step with probability
`verify_rate`) catch a liar earlier, so less work is redone. A stateless forward pass (model(...), training) is
audited hop by hop with probability `verify_rate` (`audit_chain`) and run again after a caught lie; a peer that
corrupts its forward answers is so caught with probability verify_rate per corrupted call. Backward passes
(gradients) are not audited.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from swarmlm.errors import MissingBlocksError, RemotePeerError, SwarmError, VerificationError
from swarmlm.experts.families import ModelFamily
from swarmlm.experts.span import BlockSpan

if TYPE_CHECKING:
    from swarmlm.client.swarm import RemoteSequential

logger = logging.getLogger(__name__)

LOCAL = "local blocks"  # who computed a result that the client computed itself


def relative_errors(claimed: torch.Tensor, computed: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, tokens, hidden] x 2 -> [tokens]: the worst relative L2 error over the batch at each token (inf where
    `claimed` is not finite). Padding (False in `mask`, [batch, tokens]) counts as agreeing: what a block computes
    for a token nothing attends to depends on the kernel."""
    claimed, computed = claimed.float(), computed.float()
    error = (claimed - computed).norm(dim=-1) / computed.norm(dim=-1).clamp_min(1e-6)
    error = torch.where(torch.isfinite(claimed).all(dim=-1), error, torch.full_like(error, float("inf")))
    if mask is not None:
        error = torch.where(mask.to(torch.bool), error, torch.zeros_like(error))
    return error.amax(dim=0)


def first_mismatch(claimed: torch.Tensor, computed: torch.Tensor, tolerance: float,
                   mask: Optional[torch.Tensor] = None) -> Optional[tuple[int, float]]:
    """(index of the first token whose error exceeds `tolerance`, its error), or None when all agree."""
    errors = relative_errors(claimed, computed, mask)
    bad = (~(errors <= tolerance)).nonzero()
    if bad.numel() == 0:
        return None
    index = int(bad[0, 0])
    return index, float(errors[index])


class LocalBlocks:
    """The client's own copy of some blocks, loaded from its checkpoint when first needed (only for audits that no
    other peer can do, or to settle a dispute)."""

    def __init__(self, checkpoint: Path, family: ModelFamily, model_config, dtype: torch.dtype = torch.float32):
        self.checkpoint, self.family, self.model_config, self.dtype = checkpoint, family, model_config, dtype
        self._spans: dict[tuple[int, int], Optional[BlockSpan]] = {}

    def span(self, start: int, end: int) -> Optional[BlockSpan]:
        """Blocks [start, end), or None when the checkpoint does not hold all their weights."""
        if (start, end) not in self._spans:
            try:
                self._spans[start, end] = BlockSpan.from_checkpoint(self.checkpoint, self.family, self.model_config,
                                                                    start, end, self.dtype)
                logger.info(f"Verifying blocks {start}:{end} with the local checkpoint's weights")
            except (ValueError, OSError) as e:
                logger.info(f"The local checkpoint cannot verify blocks {start}:{end}: {e}")
                self._spans[start, end] = None
        return self._spans[start, end]


@dataclass
class Segment:
    """What an audit checks: blocks [start, end) took `inputs` and the session recorded `claimed` as their output,
    for tokens [0, n); tokens from `verified` on are checked."""

    start: int
    end: int
    inputs: torch.Tensor  # [batch, n, hidden]
    claimed: torch.Tensor  # [batch, n, hidden]
    position_ids: torch.Tensor  # [batch, n]
    mask: Optional[torch.Tensor]  # [batch, n] bool, None when every token is attended
    prompts: Optional[torch.Tensor]  # [num_blocks, prompt_tokens, hidden]: the session's deep prompts, or None
    verified: int
    producers: frozenset[str]  # peers that produced claimed[:, verified:]


@dataclass
class Verdict:
    """An audit's outcome for one segment: `wrong` is None when the claimed outputs hold; else the index of the
    first wrong token and its error (the session knows which peer produced that token)."""

    wrong: Optional[int] = None
    error: float = 0.0


class Auditor:
    """Recomputes segments independently and decides who is right (see the module docstring)."""

    def __init__(self, remote: "RemoteSequential", local: Optional[LocalBlocks] = None):
        self.remote, self.local = remote, local
        self.checks = 0  # segments audited
        self.mismatches = 0  # audits where the recomputation disagreed with the recorded outputs
        self.unverified = 0  # segments that nothing independent could recompute
        self._warned: set = set()  # (start, end, producers) already reported as unverifiable

    @property
    def tolerance(self) -> float:
        return self.remote.config.verify_tolerance

    async def audit(self, segment: Segment, on_shared) -> Verdict:
        """Checks `segment`; `on_shared(coro)` runs a coroutine on the client's network loop (for peer calls).
        Raises VerificationError when nothing can tell who is right (or, with verify="required", when nothing
        independent can recompute the segment)."""
        self.checks += 1
        training = segment.producers & self.remote.training_peers
        first = None if training else await self._recompute(segment, segment.producers, on_shared)
        if first is None:
            self.unverified += 1
            message = (f"blocks {segment.start}:{segment.end}: no peer other than {sorted(segment.producers)} serves "
                       f"them and the local checkpoint does not hold them, so their outputs are not verified")
            if training:
                message = (f"blocks {segment.start}:{segment.end}: {sorted(training)} train them (their weights change "
                           f"every epoch, so nothing can recompute their answers), so their outputs are not verified")
            if self.remote.config.verify == "required":
                raise VerificationError(message)
            if (segment.start, segment.end, segment.producers) not in self._warned:
                self._warned.add((segment.start, segment.end, segment.producers))
                logger.warning(message + ' (ClientConfig(verify="required") fails instead)')
            self.remote.metrics.audited("unverified")
            return Verdict()
        output, by = first
        lo = segment.verified
        mask = segment.mask[:, lo:] if segment.mask is not None else None
        mismatch = first_mismatch(segment.claimed[:, lo:], output[:, lo:], self.tolerance, mask)
        if mismatch is None:
            self.remote.metrics.audited("agreed", segment.claimed.shape[1] - lo)
            return Verdict()
        self.mismatches += 1
        self.remote.metrics.audited("mismatch", segment.claimed.shape[1] - lo)
        index, error = mismatch
        logger.warning(f"Blocks {segment.start}:{segment.end}: the outputs of {sorted(segment.producers)} and of "
                       f"{sorted(by)} differ at token {lo + index} (relative error {error:.3g}); asking a third")
        referee = await self._recompute(segment, segment.producers | by, on_shared, prefer_local=True)
        if referee is None:
            raise VerificationError(
                f"blocks {segment.start}:{segment.end}: {sorted(segment.producers)} and {sorted(by)} disagree at "
                f"token {lo + index} and no third computation (another replica, local blocks) can tell who is right")
        judged, _ = referee
        claimed_ok = first_mismatch(segment.claimed[:, lo:], judged[:, lo:], self.tolerance, mask)
        recomputed_ok = first_mismatch(output[:, lo:], judged[:, lo:], self.tolerance, mask)
        if claimed_ok is not None and recomputed_ok is None:
            index, error = claimed_ok
            return Verdict(lo + index, error)
        if claimed_ok is None and recomputed_ok is not None:
            for peer in by - {LOCAL}:
                self.remote.bans.convict(peer)
                logger.warning(f"Peer {peer} answered wrong hidden states for blocks {segment.start}:{segment.end} "
                               f"while verifying; it is banned for this client")
            return Verdict()
        raise VerificationError(f"blocks {segment.start}:{segment.end}: three computations disagree at token "
                                f"{lo + index}; refusing to go on")

    async def audit_chain(self, hops: list, output: torch.Tensor, position_ids, mask, prompts, on_shared) -> set[str]:
        """Audits each hop of a stateless forward pass (`hops`: (RouteHop, its input), `output`: the last hop's);
        returns the peers caught answering wrong numbers (banned for good)."""
        outputs = [hop_input for _, hop_input in hops[1:]] + [output]
        mask = mask.to(torch.bool) if mask is not None else None
        liars = set()
        for (hop, hop_input), hop_output in zip(hops, outputs):
            segment = Segment(hop.start, hop.end, hop_input, hop_output, position_ids, mask, prompts, 0,
                              frozenset({hop.peer_id}))
            if (await self.audit(segment, on_shared)).wrong is not None:
                self.remote.bans.convict(hop.peer_id)
                logger.warning(f"Peer {hop.peer_id} answered a forward pass through blocks {hop.start}:{hop.end} "
                               f"with wrong hidden states; it is banned for this client")
                liars.add(hop.peer_id)
        return liars

    async def _recompute(self, segment: Segment, exclude: frozenset[str], on_shared, prefer_local: bool = False):
        """(output [batch, n, hidden], who computed it) from peers outside `exclude` (or local blocks: first when
        `prefer_local`, else when no such peers cover the segment); None when neither can."""
        exclude = exclude | self.remote.training_peers  # their weights are not the ones being checked
        local = self.local.span(segment.start, segment.end) if self.local is not None and (
            prefer_local or not self._routable(segment, exclude)) else None
        if local is not None:
            output = await asyncio.get_running_loop().run_in_executor(None, self._run_local, local, segment)
            return output, frozenset({LOCAL})
        if not self._routable(segment, exclude):
            return None
        try:
            output, hops = await on_shared(self.remote.forward_blocks(
                segment.inputs, segment.position_ids, segment.mask, segment.start, segment.end, segment.prompts,
                exclude=exclude))
        except (MissingBlocksError, RemotePeerError, SwarmError) as e:
            logger.info(f"Could not recompute blocks {segment.start}:{segment.end} on other peers: {e}")
            return None
        return output, frozenset(hop.peer_id for hop, _ in hops)

    def _routable(self, segment: Segment, exclude: frozenset[str]) -> bool:
        return self.remote.manager.covers(segment.start, segment.end, exclude | self.remote.bans.banned())

    @staticmethod
    def _run_local(span: BlockSpan, segment: Segment) -> torch.Tensor:
        with torch.inference_mode():
            hidden = segment.inputs.to(next(span.parameters()).dtype)
            prompts = segment.prompts[segment.start:segment.end] if segment.prompts is not None else None
            return span(hidden, segment.position_ids, segment.mask, prompts=prompts).float()


class VerifiedStreamer:
    """Wraps a transformers streamer so that it only ever sees verified tokens: generate()'s tokens are held back
    until an audit covers the logits they were sampled from, and a rerun after a rollback repeats nothing.

    `session.verified` counts verified positions; the token at sequence index j was sampled from the logits at
    j - 1, so it is released once j + prefix <= verified."""

    def __init__(self, inner, session):
        self.inner, self.session = inner, session
        self._pending: list = []  # (sequence index of the item's last token, value) not released yet
        self._released = 0  # items passed on, over all runs
        self._seen = 0  # items received in the current run
        self._length = 0  # sequence index after the items received in the current run

    def restart(self) -> None:
        """A rerun of generate() begins: its items repeat the released ones first (the same tokens: verified)."""
        self._pending, self._seen, self._length = [], 0, 0

    def put(self, value) -> None:
        self._length += value.shape[-1] if value.ndim > 1 or self._seen == 0 else 1
        self._seen += 1
        if self._seen > self._released:
            self._pending.append((self._length - 1, value))
        self.release()

    def release(self, everything: bool = False) -> None:
        """Passes on the items whose tokens are verified (all of them with `everything`: after the final audit)."""
        limit = self.session.verified - self.session.prefix_tokens
        while self._pending and (everything or self._pending[0][0] <= limit):
            self.inner.put(self._pending.pop(0)[1])
            self._released += 1

    def end(self) -> None:
        """Called by generate() when its loop ends, before the final audit: nothing is released here."""

    def finish(self) -> None:
        """After the final audit: releases the rest and ends the wrapped streamer."""
        self.release(everything=True)
        self.inner.end()
