"""Video-LLaVA, the whole model: `get_config("7b" | "7b-original" | "tiny")`, and its training
recipes: `get_config("stage1" | "stage2" | "stage2_lora")`, with a size prefix for other models
("tiny_stage1", "tiny_stage2", "tiny_stage2_lora", "7b-original_stage2"; no prefix: 7b).

  7b:          `LanguageBind/Video-LLaVA-7B-hf` (transformers `VideoLlavaForConditionalGeneration`):
               CLIP ViT-L/14 image and video towers (layer -2 of 24, so 23 layers each; plain CLIP
               per frame for videos), projector 1024 -> 4096 -> 4096, Vicuna-7B v1.5 with the
               vocabulary grown to 32064 (<image> 32000, <video> 32001, <pad> 32002).
  7b-original: `LanguageBind/Video-LLaVA-7B` (the PKU-YuanGroup code): the same, but a LanguageBind
               video tower (temporal attention across 8 frames in every layer) and Vicuna's 32000
               tokens (the placeholders are outside the vocabulary).
  tiny:        a few-hundred-kilobyte model for tests (28 px images, 2-layer towers, a tiny LLaMA).

`VideoLlavaConfig.from_dict(cfg.model.to_dict())` gives the model config. `cfg.checkpoints`
names what `vllm-jax convert video-llava` reads; `cfg.trainable` holds the regexes (over
'/'-joined parameter paths) of each training stage.

Training configs (`vllm-jax train --config configs/video_llava.py:stage1`) add the sections of
`vllm_jax.train.trainer` (mesh, optim, train, data) and `init_from`, a converted model folder (its
config replaces `model`, whose `llama.lora` still adds adapters; "" = random init of `model`):
  stage1:      the projector only, on image and video captions (LCS-558K + Valley-702K: ~1.26 M
               examples, one epoch at a global batch of 256), lr 1e-3.
  stage2:      the projector and the LLM, on instructions (LLaVA-665K + Video-ChatGPT-100K: ~765 K
               examples, one epoch at 128), lr 2e-5; parameters and optimizer state sharded over
               every device (FSDP: mesh.fsdp=-1, data 1), as the reference shards them with
               DeepSpeed ZeRO: a 7B LLM with fp32 AdamW state outgrows one GPU.
  stage2_lora: stage 2 with LoRA adapters on the LLM in its place (`model.llama.lora`: rank 128,
               alpha 256, dropout 0.05 on all seven projections, the LLaVA family's published
               LoRA setting, LLaVA-1.5's finetune_lora) trained with the projector, the base LLM
               frozen; lr 2e-4, LLaVA's LoRA rate (which gives the projector 2e-5 apart, here one
               rate trains both). Sharded as stage 2: a replicated 7B LLM (14 GB in bfloat16)
               alone fills a 16 GiB TPU chip. `vllm-jax export` turns its checkpoints into a model
               folder or a PEFT adapter.
All: AdamW b=(0.9, 0.999), no weight decay, linear warm-up from 0 over 3% of the steps, then
cosine decay to 0 at the last step (both follow `train.steps`), gradient clipping at norm 1 (the
transformers Trainer's default), text up to 2048 tokens (3072 once the media placeholders are
expanded). The towers stay frozen (kept in bfloat16). Stages 2 accumulate 4 micro-batches per
step (32 examples, 4 per device on 8 GPUs as the reference: `vllm-jax plan` shows 32 per device
outgrowing a v5p's 95 GiB); on 16 GiB v5e chips use --config.optim.grad_accum=16. The full-size
models compute in bfloat16 (`compute_dtype`). Tiny recipes train data parallel (their widths do
not divide over many devices).
"""

import math

import ml_collections

from vllm_jax.configs.train_llama_tiny import optim_config, train_section
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.video_llava import VICUNA_7B_V15, VideoLlavaConfig
from vllm_jax.models.vit import CLIP_VIT_L
from vllm_jax.nn.lora import LoraConfig

PROJECTOR = r"^projector/"
LLM = r"^llm/"
LORA_ADAPTERS = r"^llm/.*/lora_(a|b)$"
# LLaVA-1.5's finetune_lora: lora_r 128, lora_alpha 256, lora_dropout 0.05 on every linear layer of
# the LLM, lr 2e-4.
LORA = LoraConfig(rank=128, alpha=256.0, dropout=0.05)
STAGES = ("stage1", "stage2", "stage2_lora")
SIZES = ("7b", "7b-original", "tiny")
EXAMPLES = {"stage1": 558_000 + 702_000, "stage2": 665_000 + 100_000}  # about; sets the schedule length
BATCH = {"stage1": 256, "stage2": 128}


def model_config(arg: str) -> VideoLlavaConfig:
  if arg == "7b":
    return VideoLlavaConfig(llama=VICUNA_7B_V15, image_tower=CLIP_VIT_L, video_tower=CLIP_VIT_L)
  if arg == "7b-original":
    return VideoLlavaConfig(llama=VICUNA_7B_V15.replace(vocab_size=32000), image_tower=CLIP_VIT_L,
                            video_tower=CLIP_VIT_L.replace(temporal_frames=8), num_frames=8)
  if arg == "tiny":
    hidden = 40
    llama = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=10, max_position_embeddings=1024, remat_policy="none")
    tower = CLIP_VIT_L.replace(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64)
    return VideoLlavaConfig(llama=llama, image_tower=tower, video_tower=tower, image_token_id=320,
                            video_token_id=321, num_frames=4)
  raise ValueError(f"unknown size {arg!r}; expected one of {', '.join(SIZES)}")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  size, _, stage = arg.partition("_") if arg.split("_")[0] in SIZES else ("7b", "", arg)
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(model_config(size).to_dict())
  cfg.checkpoints = ml_collections.ConfigDict(dict(
      hf_dir="",       # a transformers VideoLlavaForConditionalGeneration folder (Video-LLaVA-7B-hf)
      original="",     # or an original Video-LLaVA folder/file (LanguageBind towers, mm_projector)
  ))
  cfg.trainable = ml_collections.ConfigDict(dict(stage1=(PROJECTOR,), stage2=(PROJECTOR, LLM),
                                                 stage2_lora=(PROJECTOR, LORA_ADAPTERS)))
  if stage:
    train_config(cfg, stage, tiny=size == "tiny")
  return cfg


def train_config(cfg: ml_collections.ConfigDict, stage: str, tiny: bool = False) -> None:
  """Add the training sections of `stage` (one of `STAGES`) to `cfg`."""
  if stage not in STAGES:
    raise ValueError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES)}")
  stage1 = stage == "stage1"
  data_stage = stage.removesuffix("_lora")  # LoRA trains on the stage's data
  steps = math.ceil(EXAMPLES[data_stage] / BATCH[data_stage])
  cfg.system = "video_llava"  # `vllm_jax.systems` name
  cfg.seed = 0
  cfg.init_from = ""  # a `vllm-jax convert video-llava` folder; "" = random init of `model`
  # Full-size models compute in bfloat16 (fp32 master weights of the trained parameters, fp32 loss,
  # softmax and norms); the tiny ones in float32, as their parity tests do.
  cfg.compute_dtype = "float32" if tiny else "bfloat16"
  # The LLM's attention kernel: splash on TPU, cuDNN on GPU in bfloat16, XLA otherwise.
  cfg.attention_impl = "auto"
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
  lr = {"stage1": 1e-3, "stage2": 2e-5, "stage2_lora": 2e-4}[stage]
  cfg.optim = optim_config(trainable=tuple(cfg.trainable[stage]), lr=lr, min_lr=0.0,
                           warmup_start_lr=0.0, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1.0)
  if stage != "stage1":
    # FSDP, and micro-batches of 32 (4 per device on 8): at 3072 tokens a step's activations,
    # attention scores and logits outgrow even a v5p's 95 GiB at 32 examples per device, and a
    # replicated 7B LLM alone fills a 16 GiB chip (`vllm-jax plan`).
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.optim.grad_accum = 4
  if stage == "stage2_lora":
    cfg.model.llama.lora = ml_collections.ConfigDict(LORA.to_dict())
  cfg.train = train_section(steps=steps, batch_size=BATCH[data_stage], log_every=50, checkpoint_every=1000)
  cfg.data = ml_collections.ConfigDict(dict(
      instruct_json="",          # conversations with an "image" or "video" path, or neither (text only);
                                 # or their manifest folder (`vllm-jax make-manifest --format llava`)
      instruct_dir="",           # media paths in the JSON are relative to this folder
      instruct_format="llava",   # "llava" (LLaVA / Video-ChatGPT JSON)
      tokenizer="",              # tokenizer folder for a random init (init_from brings its own)
      max_text_len=2048,         # text tokens, each placeholder counted once (the reference's model_max_length)
      max_len=3072,              # tokens after the placeholders are expanded (its tokenizer_model_max_length)
      # Images: "pad" to a square of the CLIP mean colour before the resize, as the reference's
      # finetune scripts set it (--image_aspect_ratio pad); pretraining keeps the processor's
      # resize and centre crop ("square").
      image_aspect_ratio="square" if stage1 else "pad",
      shuffle=True,
      num_epochs=-1,             # -1 = repeat forever
      worker_count=0,            # decoding processes per host; 0 = in the main process
      max_skipped=10000,         # abort after this many unreadable examples on a host; -1 = no limit
      cache_examples=False,      # keep every decoded example in memory (small datasets only)
      feature_cache="",          # a `vllm-jax cache-features` folder: the frozen encoders' outputs replace the media
  ))
  if tiny:
    # A schedule of its own, so that runs of any length share it.
    cfg.optim.update(warmup_steps=5, warmup_ratio=0.0, total_steps=100, lr=1e-3 if stage1 else 1e-4)
    cfg.mesh.update(data=-1, fsdp=1)
    cfg.train.update(steps=20, batch_size=8, log_every=10, checkpoint_every=10)
    cfg.optim.grad_accum = 1
    cfg.data.update(max_text_len=256, max_len=320)
