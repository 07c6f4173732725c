"""Cluster: launch scripts and helpers for Ray clusters and multi-node torchrun jobs."""
