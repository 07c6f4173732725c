"""Evaluation: image generation for the registered benchmarks (`benchmarks/`: GenEval, DPG-Bench, ImageNet, the shapes
benchmark, free prompts), their scorers and reports."""
