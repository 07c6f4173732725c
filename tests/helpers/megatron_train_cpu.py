"""`torchrun ... tests/helpers/megatron_train_cpu.py --config <yaml> [overrides]`: `python -m training.train` with
megatron-core's CUDA lookups redirected to the CPU first (the test harness of tests/helpers/megatron_cpu.py, installed
for the life of the process), so that a README megatron training command runs as its tiny CPU stand-in
(tests/test_readme_commands.py). Test-only: product code never redirects CUDA."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for `helpers`
    from helpers.megatron_cpu import CudaAsCpu, redirect_to_cpu

    redirect_to_cpu(setattr)
    CudaAsCpu().__enter__()  # for the life of this process, as megatron_cpu's spawned workers do

    from training.train import main

    main()
