"""Test helpers shared by the test modules (no helper imports a test module): datasets, megatron on CPU, cases."""
