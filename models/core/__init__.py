"""Pieces every BitDance family shares: bits, patch order, attention, KV cache, RoPE, the binary diffusion head and
its sampler, the next-patch sampling loop and its settings."""
