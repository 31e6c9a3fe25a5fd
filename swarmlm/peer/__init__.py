"""The volunteer peer daemon: choose blocks, load their weights, serve RPCs, announce, rebalance."""
