"""A training peer: a volunteer peer (swarmlm.peer) whose blocks train with their replicas (SpanTrainer).

The peer knows trainers only by the shape it needs (swarmlm.peer.trainer_hook.BlockTrainer); this module,
on top of both, hands it the real one.
"""

from __future__ import annotations

from typing import Callable, Optional

import hivemind

from swarmlm.experts.span import BlockSpan
from swarmlm.monitoring.metrics import PeerMetrics
from swarmlm.peer.config import PeerConfig
from swarmlm.peer.server import Peer, TrainerFactory
from swarmlm.training.span_trainer import SpanTrainer, SpanTrainingConfig, TrainingReport


def span_trainer_factory(config: SpanTrainingConfig,
                         on_report: Optional[Callable[[TrainingReport], None]] = None) -> TrainerFactory:
    """Peer(make_trainer=...): a SpanTrainer of the peer's span that joined its replicas' run (downloading
    their state if they are already training); its averaging rounds count in the peer's metrics."""
    def make(span: BlockSpan, model: str, dht: hivemind.DHT, metrics: PeerMetrics) -> SpanTrainer:
        trainer = SpanTrainer(span, model, dht, config, on_report=on_report, on_rounds=metrics.averaging.observe)
        trainer.join()
        return trainer

    return make


def make_peer(config: PeerConfig, on_training_report: Optional[Callable[[TrainingReport], None]] = None) -> Peer:
    """The peer `config` describes: a training peer where config.training is set (`on_training_report` is
    called at each of its averaging rounds and epochs), a frozen one otherwise."""
    if config.training is None:
        return Peer(config)
    return Peer(config, make_trainer=span_trainer_factory(config.training, on_training_report))
