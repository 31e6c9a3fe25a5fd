"""Collaborative pretraining: every volunteer trains a full copy of a small model on its own data shard,
and the swarm averages with hivemind.Optimizer.

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
"""
