"""Training on the swarm, two ways.

Collaborative pretraining (`swarmlm train`): every volunteer trains a full copy of a small model on its own
data shard, and the swarm averages with hivemind.Optimizer. Training the hosted blocks (`swarmlm peer
--train`, SWARM-style): trainer clients send micro-batches through chains of training peers, and the
replicas of each span average their gradients and step together. (Prompt tuning, with frozen peers,
lives on the client: swarmlm.client.prompt_tuning.)

Modules, one job each:
  config.py      TrainConfig / DataConfig: every setting of a trainer, one comment each
  data.py        corpus loading, cleaning, de-duplication, held-out split, tokenizing, chunking, shards
  model.py       the starting model and tokenizer for --model; a parameter hash
  optimizer.py   hivemind.Optimizer configured for swarmlm, counting completed/failed averaging rounds
  roster.py      who trains in a run (DHT records): waiting for --min-peers, shard conflicts
  finish.py      ending a run with bit-identical parameters on every trainer
  pretrain.py    the trainer loop, returning stats, with per-step/epoch callbacks (the metrics hook)
  progress.py    the progress bar and the per-epoch report line
  checkpoint.py  atomic checkpoint writes (save_pretrained layout + tokenizer)
  lifetime.py    helper processes that die with their trainer
  span_trainer.py    a training peer's SpanTrainer: accumulates its span's gradients, steps with its replicas
  span_optimizer.py  hivemind.Optimizer split into per-micro-batch and per-epoch halves for a serving peer
  export.py          `swarmlm export`: the swarm's current blocks (rpc_state) as a save_pretrained checkpoint
"""
