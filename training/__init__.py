"""Training: the one config tree, the loop, tasks (one per model family), engines (DeepSpeed, megatron-core: a
registry), checkpoints and logging."""
