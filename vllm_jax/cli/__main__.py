import sys

from vllm_jax.cli import main

sys.exit(main())
