"""Training: the loop, engines (DeepSpeed, megatron-core), checkpoints and logging."""
