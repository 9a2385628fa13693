"""Data: document sources, tokenizers, cached token shards and the batch loader."""
