"""Video-LLaMA, the whole model: `get_config("7b" | "13b" | "tiny")`, and its training recipes:
`get_config("stage1" | "stage2" | "stage2_full" | "stage2_lora")`, with a size prefix for other
models ("13b_stage1", "tiny_stage1", "tiny_stage2", "tiny_stage2_lora"; no prefix: 7b).

  7b / 13b: EVA ViT-g/14 + BLIP-2 Q-Former + video Q-Former (32 tokens) + ImageBind-Huge audio
            branch (8 tokens) + Vicuna/LLaMA-2 7B or 13B. The LLaMA part is read from the
            converted folder's config; the sizes here document it.
  tiny:     a few-hundred-kilobyte model for tests (vocabulary set by the test's tokenizer).

`VideoLlamaConfig.from_dict(cfg.model.to_dict())` gives the model config. `cfg.checkpoints`
names the files `vllm-jax convert video-llama` assembles (command-line flags override them);
`cfg.trainable` holds the regexes (over '/'-joined parameter paths) of each training stage.

Training configs (`vllm-jax train --config configs/video_llama.py:stage1`) add the sections of
`vllm_jax.train.trainer` (mesh, optim, train, data) and `init_from`, a folder written by
`vllm-jax convert video-llama` (its config replaces `model`, whose `llama.lora` still adds adapters;
"" = random init of `model`):
  stage1:      vision connector on WebVid captions (lr 1e-4 -> 8e-5, warmup from 1e-6, batch 32 per
               GPU on 8 GPUs, captions cut at 32 tokens); ViT, image Q-Former and LLM frozen.
  stage2:      the same connector on instruction conversations (lr 3e-5 -> 1e-5, batch 4 per GPU,
               320 tokens; 512 for the audio branch: data.with_audio=True, optim.trainable=AUDIO).
  stage2_full: stage 2 with the LLM trained too (Video-LLaVA's stage 2: lr 2e-5 -> 0, 3% warmup,
               no weight decay, clipping at norm 1).
  stage2_lora: stage 2 with LoRA adapters on the LLM (`model.llama.lora`: rank 128, alpha 256,
               dropout 0.05 on all seven projections, the LLaVA family's published LoRA setting)
               trained with the vision connector, the base LLM frozen; LLaVA's LoRA optimizer (lr
               2e-4 -> 0, 3% warmup, no weight decay, clipping at norm 1; one rate for adapters
               and connector). `vllm-jax export` turns its checkpoints into a model folder or a PEFT
               adapter.
The 7B recipes compute in bfloat16 (`compute_dtype`) and, in stages 1 and 2, keep the frozen LLM's
matmul outputs for the backward pass (`llm_remat_policy`; the others recompute its layers).
AdamW b=(0.9, 0.999), weight decay 0.05 except on biases, norms and 1-D tensors; no gradient
clipping (the reference's runner has none), unless said otherwise above. Frozen parameters are kept
in bfloat16. The cosine ends at the last step, `train.steps` (12500 in stage 1, 3000 in stage 2);
the warm-up is a number of steps, except stage2_full's and stage2_lora's 3%. Every stage shards
parameters, gradients and optimizer state over all devices (FSDP: mesh.fsdp=-1, data 1): at 7B,
data parallelism does not fit a 16 GiB chip even in stage 1 (`vllm-jax plan` on v5e:2x4: 35.2 GiB
per chip data-parallel, 8.4 GiB with FSDP). Tiny recipes train data parallel (their widths do not
divide over many devices)."""

import ml_collections

from vllm_jax.configs.train_llama_tiny import optim_config, train_section

from vllm_jax.models.audio_branch import AudioBranchConfig
from vllm_jax.models.imagebind_audio import ImageBindAudioConfig
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_branch import VideoBranchConfig
from vllm_jax.models.video_llama import VideoLlamaConfig
from vllm_jax.models.vit import ViTConfig
from vllm_jax.nn.lora import LoraConfig

LLAMA_7B = LlamaConfig()
LLAMA_13B = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)

# Video-LLaMA trains only the connectors; ViT, image Q-Former, ImageBind and the LLM stay frozen.
VISION_CONNECTOR = r"^vision/(video_qformer|frame_position_embedding|llama_proj)/"
AUDIO_CONNECTOR = r"^audio/(position_embedding|qformer|llama_proj)/"
LORA_ADAPTERS = r"^llm/.*/lora_(a|b)$"
# The LLaVA family's LoRA (LLaVA-1.5 finetune_lora: lora_r 128, lora_alpha 256, lora_dropout 0.05,
# every linear layer of the LLM, lr 2e-4).
LORA = LoraConfig(rank=128, alpha=256.0, dropout=0.05)
STAGES = ("stage1", "stage2", "stage2_full", "stage2_lora")


def model_config(arg: str) -> VideoLlamaConfig:
  if arg in ("7b", "13b"):
    llama = LLAMA_7B if arg == "7b" else LLAMA_13B
    return VideoLlamaConfig(llama=llama, vision=VideoBranchConfig(llm_hidden_size=llama.hidden_size),
                            audio=AudioBranchConfig(llm_hidden_size=llama.hidden_size))
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
        encoder=encoder, llm_hidden_size=hidden,
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=24,
                              cross_attention_frequency=1, num_queries=8))
    return VideoLlamaConfig(llama=llama, vision=vision, audio=audio, video_token_id=320, audio_token_id=321,
                            num_frames=4)
  raise ValueError(f"unknown size {arg!r}; expected '7b', '13b' or 'tiny'")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  size, _, stage = arg.partition("_") if arg.split("_")[0] in ("7b", "13b", "tiny") else ("7b", "", arg)
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(model_config(size).to_dict())
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
      audio_stage1=(AUDIO_CONNECTOR,), audio_stage2=(AUDIO_CONNECTOR,),
      vision_stage2_lora=(VISION_CONNECTOR, LORA_ADAPTERS)))
  if stage:
    train_config(cfg, stage, tiny=size == "tiny")
  return cfg


def train_config(cfg: ml_collections.ConfigDict, stage: str, tiny: bool = False) -> None:
  """Add the training sections of `stage` (one of `STAGES`) to `cfg`."""
  if stage not in STAGES:
    raise ValueError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES)}")
  stage1 = stage == "stage1"
  cfg.system = "video_llama"  # `vllm_jax.systems` name
  cfg.seed = 0
  cfg.init_from = ""  # a `vllm-jax convert video-llama` folder; "" = random init of `model`
  # Full-size models compute in bfloat16 (fp32 master weights of the trained parameters, fp32 loss,
  # softmax and norms); the tiny ones in float32, as their parity tests do.
  cfg.compute_dtype = "float32" if tiny else "bfloat16"
  # The LLM's attention kernel: splash on TPU, cuDNN on GPU in bfloat16, XLA otherwise.
  cfg.attention_impl = "auto"
  # The frozen LLM of the connector stages keeps its matmul outputs for the backward pass (input
  # gradients only) instead of recomputing its layers: stage 1 at 256 on v5e:2x4 peaks at 9.8 GiB
  # instead of 9.1 and needs 10% fewer FLOPs (`vllm-jax plan`; nothing kept at all: 18 GiB).
  cfg.llm_remat_policy = "dots_with_no_batch_dims_saveable" if stage in ("stage1", "stage2") and not tiny else ""
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the remaining devices
  if stage1:
    cfg.optim = optim_config(trainable=(VISION_CONNECTOR,), clip_norm=0.0)
  elif stage == "stage2":
    cfg.optim = optim_config(trainable=(VISION_CONNECTOR,), clip_norm=0.0, lr=3e-5, min_lr=1e-5,
                             warmup_steps=1000)
  elif stage == "stage2_full":
    cfg.optim = optim_config(trainable=(VISION_CONNECTOR, r"^llm/"), lr=2e-5, min_lr=0.0, warmup_start_lr=0.0,
                             warmup_steps=0, warmup_ratio=0.03, weight_decay=0.0)
  else:
    cfg.model.llama.lora = ml_collections.ConfigDict(LORA.to_dict())
    cfg.optim = optim_config(trainable=tuple(cfg.trainable.vision_stage2_lora), lr=2e-4, min_lr=0.0,
                             warmup_start_lr=0.0, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.0)
  cfg.train = train_section(steps=12500 if stage1 else 3000, batch_size=256 if stage1 else 32, log_every=50,
                            checkpoint_every=1000)
  cfg.data = ml_collections.ConfigDict(dict(
      webvid_csv="",             # WebVid-style CSV: captions (stage 1 examples), or its manifest folder
                                 # (`vllm-jax make-manifest`: a 10M-row CSV read a record at a time)
      webvid_dir="",             # videos at {webvid_dir}/{page_dir}/{videoid}.mp4
      instruct_json="",          # instruction conversations (stage 2 examples), or their manifest folder
      instruct_dir="",           # media paths in the JSON are relative to this folder
      instruct_format="llava",   # "llava" (LLaVA / Video-ChatGPT JSON) or "videochat"
      weights=(1.0, 1.0),        # mixture weights (captions, instructions) when both are set
      tokenizer="",              # tokenizer folder for a random init (init_from brings its own)
      max_text_len=32 if stage1 else 320,
      end_sym="\n",              # appended to captions
      with_audio=False,          # audio clips as input (the audio branch's stages)
      sampling="headtail",       # training frame sampling ("uniform" for evaluation-style)
      train_crop=True,           # RandomResizedCrop(scale 0.5-1) on the frames
      shuffle=True,
      num_epochs=-1,             # -1 = repeat forever
      worker_count=0,            # decoding processes per host; 0 = in the main process
      max_skipped=10000,         # abort after this many unreadable examples on a host (WebVid
                                 # dumps miss some videos); -1 = no limit
      feature_cache="",          # a `vllm-jax cache-features` folder: its frozen-encoder features replace
                                 # decoding and the ViT / ImageBind (a cache made otherwise is refused)
  ))
  if tiny:
    # A schedule of its own, so that runs of any length (a test resumes a shorter one) share it.
    cfg.optim.update(warmup_steps=5, warmup_ratio=0.0, total_steps=100, lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-5)
    cfg.mesh.update(data=-1, fsdp=1)  # tiny widths do not divide over many devices
    cfg.train.update(steps=20, batch_size=8, log_every=10, checkpoint_every=10)
    cfg.data.update(max_text_len=16 if stage1 else 96)
