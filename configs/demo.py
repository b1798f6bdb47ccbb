"""The `vllm-jax demo` run: a tiny audio-visual Video-LLaMA trained on the synthetic shapes-and-sounds
videos of `vllm_jax.data.synthetic`, sized to learn them in a few minutes on a 2-core CPU.

The encoders (EVA ViT, ImageBind audio) are random and stay frozen: their features still carry
colour, shape, place and spectrum (the ViT's position table is drawn at std 1 rather than 0.02, so
that where a patch lies shows through its features, as in a pretrained ViT). Everything after the
encoders is trained: the image and video Q-Formers, the frame position embedding, the audio
connector, both projections, and the LLM (a frozen random LLM could not learn to write captions).

Ablations (`vllm-jax demo --config.model.use_frame_pos=False`, `--config.model.use_audio=False`):
  model.use_frame_pos=False  the frame position embedding is zeroed: the video Q-Former sees the
                             frames as a set, so "left" and "right" (and "up"/"down") look alike.
  model.use_audio=False      no audio branch and no audio input: the sound cannot be told.
`resolve(cfg)` maps them onto the model and data sections; the rest is a `vllm-jax train` config
(configs/video_llama.py's sections) plus `demo` (dataset size, evaluation, output folder).
"""

import ml_collections

from vllm_jax.configs import video_llama
from vllm_jax.models.audio_branch import AudioBranchConfig
from vllm_jax.models.imagebind_audio import ImageBindAudioConfig
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_branch import VideoBranchConfig
from vllm_jax.models.video_llama import VideoLlamaConfig
from vllm_jax.models.vit import ViTConfig

# The image Q-Former too: random queries keep too little of where the shape is.
TRAINABLE = (video_llama.VISION_CONNECTOR, r"^vision/qformer/", video_llama.AUDIO_CONNECTOR, r"^llm/")


def model_config() -> VideoLlamaConfig:
  hidden = 128
  llama = LlamaConfig(vocab_size=640, hidden_size=hidden, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=32, max_position_embeddings=256, remat_policy="none")
  vision = VideoBranchConfig(
      vit=ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128,
                    pos_embed_init_std=1.0),
      qformer=QFormerConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128, encoder_width=64,
                            num_queries=8),
      video_qformer=QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                  encoder_width=64, cross_attention_frequency=1, num_queries=8),
      max_frames=8, llm_hidden_size=hidden)
  # ImageBind's fbank input (128 mel bins x 204 frames per 2 s clip), so any video file works.
  audio = AudioBranchConfig(
      encoder=ImageBindAudioConfig(width=64, num_layers=1, num_heads=4, mlp_dim=128, out_dim=64, drop_path=0.0),
      qformer=QFormerConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128, encoder_width=64,
                            cross_attention_frequency=1, num_queries=4),
      max_clips=2, llm_hidden_size=hidden)
  return VideoLlamaConfig(llama=llama, vision=vision, audio=audio, num_frames=8)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(model_config().to_dict())
  cfg.model.use_frame_pos = True
  cfg.model.use_audio = True
  video_llama.train_config(cfg, "stage2_full", tiny=True)
  # At 2e-3 the random LLM settles on colour, shape and sound and never learns to read the
  # direction out of the video tokens (chance after 1000 steps); at 5e-4 it does by step ~400.
  cfg.optim.update(trainable=TRAINABLE, lr=5e-4, min_lr=5e-5, warmup_start_lr=1e-5, warmup_steps=30,
                   total_steps=0, weight_decay=0.0, clip_norm=1.0,  # 0: the cosine ends with train.steps
                   frozen_dtype="float32")  # bfloat16 matmuls are slow on CPUs
  cfg.train.update(steps=700, batch_size=16, log_every=25, checkpoint_every=700, keep_checkpoints=1,
                   async_checkpoints=False, save_frozen=True)  # no init_from to bring the frozen parts back
  cfg.data.update(
      tokenizer="",                 # set by the demo: trained on the dataset's text
      max_text_len=192,             # a five-turn conversation, placeholders included
      weights=(1.0, 1.0),           # captions (CSV) and conversations (JSON) about the same videos
      with_audio=True, sampling="uniform", train_crop=False,  # the shape must stay in the frame
      cache_examples=True)          # decode each video once: the examples repeat every epoch
  cfg.demo = ml_collections.ConfigDict(dict(
      workdir="runs/demo",          # dataset/, tokenizer/, train/ (checkpoints), model/, report.png
      num_train=480, num_val=96,    # videos per split
      eval_batch_size=16,
      question="What do you see and hear?",  # asked about the first held-out video at the end
  ))
  return cfg


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `vllm-jax train` config of `cfg`: its ablation flags mapped onto model and data."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  model = cfg.model.to_dict()
  use_frame_pos, use_audio = model.pop("use_frame_pos"), model.pop("use_audio")
  config = VideoLlamaConfig.from_dict(model)
  config = config.replace(vision=config.vision.replace(use_frame_pos=use_frame_pos and config.vision.use_frame_pos),
                          audio=config.audio if use_audio else None)
  with cfg.unlocked():
    del cfg.model
    cfg.model = ml_collections.ConfigDict(config.to_dict())
  cfg.data.with_audio = use_audio and cfg.data.with_audio
  return cfg
