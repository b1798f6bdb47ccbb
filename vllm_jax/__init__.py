"""vllm_jax: video LLMs (Video-LLaMA, Video-LLaVA, LLaMA-VID) in JAX/Flax."""

import os

__version__ = "0.1.0"


def quiet() -> bool:
  """Quiet mode (`vllm-jax -q`, VLLM_JAX_QUIET=1): no progress bars, only answers, notes and errors."""
  return os.environ.get("VLLM_JAX_QUIET", "") not in ("", "0")
