"""Video-LLaMA, the whole model: `get_config("7b" | "13b" | "tiny")`.

  7b / 13b: EVA ViT-g/14 + BLIP-2 Q-Former + video Q-Former (32 tokens) + ImageBind-Huge audio
            branch (8 tokens) + Vicuna/LLaMA-2 7B or 13B. The LLaMA part is read from the
            converted folder's config; the sizes here document it.
  tiny:     a few-hundred-kilobyte model for tests (vocabulary set by the test's tokenizer).

`VideoLlamaConfig.from_dict(cfg.model.to_dict())` gives the model config. `cfg.checkpoints`
names the files `vllm-jax convert video-llama` assembles (command-line flags override them);
`cfg.trainable` holds the regexes (over '/'-joined parameter paths) of each training stage.
"""

import ml_collections

from vllm_jax.models.audio_branch import AudioBranchConfig
from vllm_jax.models.imagebind_audio import ImageBindAudioConfig
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_branch import VideoBranchConfig
from vllm_jax.models.video_llama import VideoLlamaConfig
from vllm_jax.models.vit import ViTConfig

LLAMA_7B = LlamaConfig()
LLAMA_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)

# Video-LLaMA trains only the connectors; ViT, image Q-Former, ImageBind and the LLM stay frozen.
VISION_CONNECTOR = r"^vision/(video_qformer|frame_position_embedding|llama_proj)/"
AUDIO_CONNECTOR = r"^audio/(position_embedding|qformer|llama_proj)/"


def model_config(arg: str) -> VideoLlamaConfig:
  if arg in ("7b", "13b"):
    llama = LLAMA_7B if arg == "7b" else LLAMA_13B
    return VideoLlamaConfig(llama=llama, vision=VideoBranchConfig(llm_hidden_size=llama.hidden_size),
                            audio=AudioBranchConfig(llm_hidden=llama.hidden_size))
  if arg == "tiny":
    hidden = 40
    llama = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=10, max_position_embeddings=1024, remat_policy="none")
    vision = VideoBranchConfig(
        vit=ViTConfig(image_size=28, width=48, depth=2, num_heads=4, mlp_dim=64),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=48,
                              num_queries=8),
        video_qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                    encoder_width=32, cross_attention_frequency=1, num_queries=4),
        max_frames=4, llm_hidden_size=hidden)
    encoder = ImageBindAudioConfig(width=32, num_layers=1, num_heads=2, mlp_dim=64, out_dim=24)
    audio = AudioBranchConfig(
        encoder=encoder, llm_hidden=hidden,
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=24,
                              cross_attention_frequency=1, num_queries=8))
    return VideoLlamaConfig(llama=llama, vision=vision, audio=audio, video_token_id=320, audio_token_id=321,
                            num_frames=4)
  raise ValueError(f"unknown size {arg!r}; expected '7b', '13b' or 'tiny'")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(model_config(arg).to_dict())
  cfg.checkpoints = ml_collections.ConfigDict(dict(
      llama_dir="",    # HF LLaMA/Vicuna/LLaMA-2 folder (weights, config.json, tokenizer)
      eva_vit="",      # eva_vit_g.pth
      blip2="",        # LAVIS BLIP-2 .pth (image Q-Former, query tokens, ln_vision)
      hf_blip2="",     # or a transformers Blip2 folder/file (ViT, ln_vision, image Q-Former)
      vl="",           # Video-LLaMA VL finetuned .pth
      al="",           # Video-LLaMA AL finetuned .pth ("" for a vision-only model)
      imagebind="",    # imagebind_huge.pth (else the AL file's audio_encoder.* keys)
  ))
  cfg.trainable = ml_collections.ConfigDict(dict(
      vision_stage1=(VISION_CONNECTOR,), vision_stage2=(VISION_CONNECTOR,),
      audio_stage1=(AUDIO_CONNECTOR,), audio_stage2=(AUDIO_CONNECTOR,)))
  return cfg
