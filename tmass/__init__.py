"""tmass: distributed T-MASS text-video retrieval (shards, streaming, DeepSpeed training, sharded evaluation)."""

__version__ = "0.1.0"
