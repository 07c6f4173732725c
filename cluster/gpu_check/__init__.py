"""One-GPU checks: `megatron` (the megatron T2I training path through the product's `MegatronEngine`: schedule,
FlexAttention vs dense SDPA, BF16 and Transformer Engine FP8 training speed; `python -m cluster.gpu_check --out DIR`)
and `fp8` (BF16 vs torchao FP8 for the DeepSpeed path's plain PyTorch model; `python -m cluster.gpu_check.fp8`),
with their shared check model, synthetic rows, device helpers and peak FLOP/s in `common`."""
