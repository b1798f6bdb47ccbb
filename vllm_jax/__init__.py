"""vllm_jax: video LLMs (Video-LLaMA, Video-LLaVA, LLaMA-VID) in JAX/Flax."""

__version__ = "0.1.0"
