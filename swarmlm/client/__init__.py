"""The client: local embeddings and LM head, remote blocks, routing and inference sessions."""
