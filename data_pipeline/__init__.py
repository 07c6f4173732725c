"""Data pipeline: Ray tokenization of raw image-text data into binary-token shards, and the packing loader."""
