"""`python -m cluster.gpu_check`: the megatron one-GPU check (`cluster.gpu_check.megatron`)."""

import sys

from cluster.gpu_check.megatron import main

if __name__ == "__main__":
    sys.exit(main())
