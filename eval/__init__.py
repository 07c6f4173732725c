"""Evaluation: GenEval, DPG-Bench and ImageNet FID harnesses."""
