"""Ending a run with bit-identical parameters on every trainer that finishes it.

All-reduce leaves its participants equal only up to float rounding (hivemind applies `x + (avg - x)`),
and a trainer that missed the last round may differ more. So a trainer that reaches the last epoch:
  1. announces (final epoch, parameter hash) in the roster and keeps serving its state to peers;
  2. waits until every live trainer of the run has finished (a straggler catches up meanwhile: the
     finished trainers still report the final epoch, so it downloads their state);
  3. computes the canonical hash: the most common one among finished trainers, ties broken by the
     smallest peer id (every trainer computes the same answer from the same roster);
  4. if its own hash differs, downloads the state of a trainer that holds the canonical one (holders
     raise their state-sharing priority so that downloads go to them) and announces the new hash;
  5. waits until every finished trainer holds the canonical hash, then leaves.
Every wait is bounded by `timeout`; a trainer that times out keeps its own parameters and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from swarmlm.training.model import parameter_hash
from swarmlm.training.optimizer import ObservedOptimizer
from swarmlm.training.roster import Roster, TrainerEntry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalAgreement:
    agreed: bool  # every finished trainer ended with the same parameters
    downloaded: bool  # this trainer replaced its parameters with the canonical ones
    param_hash: str  # this trainer's final parameter hash


def canonical_hash(entries: list[TrainerEntry]) -> str:
    """The most common hash among trainers that finished the latest epoch; ties go to the smallest peer id."""
    finished = [e for e in entries if e.finished_epoch is not None and e.param_hash is not None]
    last_epoch = max(e.finished_epoch for e in finished)
    finished = [e for e in finished if e.finished_epoch == last_epoch]
    counts = Counter(e.param_hash for e in finished)
    return min(finished, key=lambda e: (-counts[e.param_hash], e.peer_id)).param_hash


def finish_in_agreement(opt: ObservedOptimizer, model: torch.nn.Module, roster: Roster, timeout: float,
                        stop: threading.Event, poll: float = 0.5) -> FinalAgreement:
    """Runs the protocol above; returns whether the finished trainers agree."""
    deadline = time.monotonic() + timeout
    my_hash = parameter_hash(model)
    roster.announce_finished(opt.local_epoch, my_hash)
    entries = _wait_until(roster, lambda es: all(e.finished_epoch is not None for e in es), deadline, stop, poll)
    if entries is None:
        logger.warning("Not every trainer finished in time; keeping this trainer's parameters")
        return FinalAgreement(False, False, my_hash)
    canonical, downloaded = canonical_hash(entries), False
    if my_hash == canonical:
        opt.state_averager.state_sharing_priority = opt.local_epoch + 0.5  # download from holders of the canonical
    else:
        my_hash, downloaded = _download(opt, model, canonical, deadline, stop, poll), True
        roster.announce_finished(opt.local_epoch, my_hash)
    agreed = _wait_until(roster, lambda es: all(e.param_hash == canonical for e in es if e.finished_epoch is not None),
                         deadline, stop, poll)
    if agreed is None or my_hash != canonical:
        logger.warning("The finished trainers did not all reach the same parameters in time")
    return FinalAgreement(agreed is not None and my_hash == canonical, downloaded, my_hash)


def _download(opt: ObservedOptimizer, model: torch.nn.Module, canonical: str, deadline: float,
              stop: threading.Event, poll: float) -> str:
    """Loads the swarm's state until this trainer holds the canonical parameters (or time runs out)."""
    current = parameter_hash(model)
    while current != canonical and time.monotonic() < deadline and not stop.is_set():
        try:
            opt.state_averager.load_state_from_peers(timeout=max(1.0, deadline - time.monotonic()))
        except Exception as e:  # a peer left or timed out mid-download: try again while time remains
            logger.info(f"Downloading the final state failed ({e!r}); retrying")
        current = parameter_hash(model)
        if current != canonical:
            logger.info("The downloaded state is not the canonical one yet (priorities still spreading); retrying")
            stop.wait(poll)
    return current


def _wait_until(roster: Roster, condition, deadline: float, stop: threading.Event, poll: float):
    """Polls the roster until `condition(entries)` holds; returns the entries, or None on timeout/stop."""
    while time.monotonic() < deadline and not stop.is_set():
        entries = roster.members()
        if entries and condition(entries):
            return entries
        stop.wait(poll)
    return None
