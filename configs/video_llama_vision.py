"""Video-LLaMA's vision-language branch: `get_config("full" | "mid" | "tiny")`.

  full: EVA ViT-g/14 (39 blocks, 1408 wide), BLIP-2 Q-Former, 2-layer video Q-Former, LLaMA-7B width.
  mid:  a ViT-S-sized encoder (384 wide, 12 blocks) and Q-Formers of the same width (benchmarks).
  tiny: a few-kilobyte branch for tests.
`VideoBranchConfig.from_dict(cfg.model.to_dict())` gives the model config.
"""

import ml_collections

from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_branch import VideoBranchConfig
from vllm_jax.models.vit import ViTConfig


def branch_config(arg: str) -> VideoBranchConfig:
  if arg == "full":
    return VideoBranchConfig()
  if arg == "mid":
    return VideoBranchConfig(
        vit=ViTConfig(width=384, depth=12, num_heads=6, mlp_dim=1536),
        qformer=QFormerConfig(hidden_size=384, num_heads=6, intermediate_size=1536, encoder_width=384),
        video_qformer=QFormerConfig(hidden_size=384, num_layers=2, num_heads=6, intermediate_size=1536,
                                    encoder_width=384, cross_attention_frequency=1),
        llm_hidden_size=1024)
  if arg == "tiny":
    return VideoBranchConfig(
        vit=ViTConfig(image_size=28, width=48, depth=2, num_heads=4, mlp_dim=64),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=48,
                              num_queries=8),
        video_qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                    encoder_width=32, cross_attention_frequency=1, num_queries=4),
        max_frames=4, llm_hidden_size=64)
  raise ValueError(f"unknown size {arg!r}; expected 'full', 'mid' or 'tiny'")


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(branch_config(arg).to_dict())
  cfg.num_frames = 8
  return cfg
