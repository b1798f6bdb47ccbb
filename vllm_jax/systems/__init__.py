"""The systems (Video-LLaMA, Video-LLaVA, LLaMA-VID) behind one interface, `base.System`, by the
`model_type` their model folders record."""

from vllm_jax import pretrained
from vllm_jax.systems.base import System
from vllm_jax.systems.llama_vid import LlamaVidSystem
from vllm_jax.systems.video_llama import VideoLlamaSystem
from vllm_jax.systems.video_llava import VideoLlavaSystem

SYSTEMS: dict[str, type[System]] = {s.model_type: s for s in (VideoLlamaSystem, VideoLlavaSystem, LlamaVidSystem)}


def get(model_type: str) -> type[System]:
  if model_type not in SYSTEMS:
    raise ValueError(f"unknown system {model_type!r}; expected one of {', '.join(sorted(SYSTEMS))}")
  return SYSTEMS[model_type]


def load(model_dir: str, mesh=None, **llama_overrides) -> System:
  """The model in `model_dir`, as the system its config.json names."""
  return get(pretrained.model_type(model_dir)).load(model_dir, mesh=mesh, **llama_overrides)
