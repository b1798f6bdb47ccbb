"""LLaMA-VID, the whole model: `get_config("7b" | "7b-long" | "tiny")`, and its training recipes:
`get_config("stage1" | "stage2" | "stage3" | "stage2_lora")`, with a size prefix for other models
("tiny_stage1", "tiny_stage2", "tiny_stage2_lora", "7b-long_stage3"; no prefix: 7b, or 7b-long for
stage3).

  7b:      `llama-vid-7b-full-224-video-fps-1`: EVA ViT-g/14 at 224 px (`vit.EVA_VIT_G`, all 257
           tokens), the InstructBLIP Q-Former with its text path (32 queries, bert-base-uncased
           + [DEC]), one context and one mean-pooled content token per frame, Vicuna-7B v1.5
           (32000 tokens, 4096 positions; <image> is id 32000, outside the vocabulary).
  7b-long: `llama-vid-7b-full-224-long-video`: the same with a 65536-token context by linear RoPE
           scaling (factor 16), as the reference sets it when model_max_length exceeds the context.
  tiny:    a model of a few hundred kilobytes for tests (28 px frames, 2-block ViT, 2-layer
           Q-Former with a 512-word instruction vocabulary, 2-layer LLaMA).

`LlamaVidConfig.from_dict(cfg.model.to_dict())` gives the model config; `cfg.trainable` holds the
regexes (over '/'-joined parameter paths) of each training stage.

Training configs (`vllm-jax train --config configs/llama_vid.py:stage1`) add the sections of
`vllm_jax.train.trainer` (mesh, optim, train, data) and `init_from`, a LLaMA-VID model folder (its
config replaces `model`, whose `llama.lora` still adds adapters; its `instruction_tokenizer/` reads
the instructions; "" = random init of `model` with `data.tokenizer` and `data.instruction_tokenizer`):
  stage1: captions (LLaVA-558K + WebVid: about 790 K images and videos, one epoch at a global
          batch of 256), lr 1e-3: text = BOS, the media run, the caption + "\\n" (learned); the
          Q-Former reads the human message without `<image>` and newlines. Trains the projector
          and the context path's att/key/val projectors; the Q-Former, its queries and att_norm stay
          frozen.
  stage2: conversations (LLaVA-665K + Video-ChatGPT: about 763 K, one epoch at 128), lr 2e-5, in
          the reference's imgsp_v1 format (the vicuna_v1 template: llava_v1's separators, Vicuna
          v1's system prompt), every question carrying the media, read with that question. Trains
          everything but the ViT. The text-guided part is recomputed in the backward pass
          (`context_remat_policy`) and a step accumulates 16 micro-batches of 8, so that it fits
          v5p:2x2x1 (61 GiB of 95 per chip, `vllm-jax plan`).
  stage3: long videos (about 9 K movie conversations, one epoch at 8), lr 2e-5, up to 65536 tokens
          (the 7b-long context; `init_from` a stage-2 folder, as the reference starts it, has its
          4096 positions extended to 65536 by linear RoPE scaling, factor 16: `context_length`).
          As released, from feature files (`data.video_features`: `long_videoqa.json`, whose
          "video" entries name MovieNet `.pkl` files holding each frame's ViT features and the
          subtitles between frames; `vllm_jax.data.long_video`): the ViT does not run, and each
          movie's one question reads its frames. Trains the LLM and the projector; the context
          path stays frozen.
          The loss projects the vocabulary 4096 positions at a time (`loss_chunk`) and a step
          accumulates 2 micro-batches, one row per chip on v5p:2x2x1 (82 GiB of 95, `vllm-jax plan`).
  stage2_lora: stage 2 with LoRA adapters on the LLM in its place (`model.llama.lora`: rank 128,
          alpha 256, dropout 0.05 on all seven projections, the LLaVA family's published LoRA
          setting) trained with the projectors and the context path, the base LLM frozen; lr 2e-4,
          LLaVA's LoRA rate. `vllm-jax export` turns its checkpoints into a model folder or a
          PEFT adapter.
Every stage shards the parameters and optimizer state over every device (FSDP: mesh.fsdp=-1,
data 1), as the reference shards stages 2 and 3 with DeepSpeed ZeRO: a 7B LLM with fp32 AdamW state
outgrows one GPU, and a replicated bf16 one alone fills a 16 GiB TPU chip (stage 1 too, which
also takes 8 micro-batches: 11.6 GiB per v5e:2x4 chip). Tiny recipes train data parallel (their
widths do not divide over many devices).
All: frames at 1 per second (at most `data.max_frames`, evenly spread), AdamW b=(0.9, 0.999), no
weight decay, linear warm-up from 0 over 3% of the steps, then cosine decay to 0 at the last step
(both follow `train.steps`), gradient clipping at norm 1 (the transformers Trainer's default), text
cut at the reference's model_max_length with each placeholder counted once (2048; 65536 in stage
3). The ViT is always frozen (kept in bfloat16, like every frozen parameter).
"""

import math

import ml_collections

from vllm_jax.configs.train_llama_tiny import optim_config, train_section
from vllm_jax.models.llama import LlamaConfig, extend_context
from vllm_jax.models.llama_vid import INSTRUCT_QFORMER, LlamaVidConfig
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_llava import VICUNA_7B_V15
from vllm_jax.models.vit import EVA_VIT_G
from vllm_jax.nn.lora import LoraConfig

SIZES = ("7b", "7b-long", "tiny")
STAGES = ("stage1", "stage2", "stage3")
# Parameter groups: the reference's mm_projector, vlm_att_{projector, key_projector, val_projector}
# and the frozen-in-stage-1 vlm_att_{encoder, query, ln}.
PROJECTORS = r"^(projector|att_projector|key_projector|val_projector)/"
CONTEXT_PATH = r"^(qformer|att_norm)/"
LLM = r"^llm/"
LORA_ADAPTERS = r"^llm/.*/lora_(a|b)$"
# The LLaVA family's LoRA (LLaVA-1.5's finetune_lora): rank 128, alpha 256, dropout 0.05 on every
# linear layer of the LLM, lr 2e-4.
LORA = LoraConfig(rank=128, alpha=256.0, dropout=0.05)
LORA_STAGES = ("stage2_lora",)  # trained on the data of the stage they name
EXAMPLES = {"stage1": 790_000, "stage2": 763_000, "stage3": 9_000}  # about; sets the schedule length
BATCH = {"stage1": 256, "stage2": 128, "stage3": 8}
LONG_CONTEXT = 65536
TINY_LONG_CONTEXT = 2048  # the tiny stage 3's (the tiny model has 1024 positions)
VICUNA_CONTEXT = 4096  # the positions Vicuna v1.5's RoPE was trained on


def model_config(arg: str) -> LlamaVidConfig:
  if arg in ("7b", "7b-long"):
    llama = VICUNA_7B_V15.replace(vocab_size=32000, max_position_embeddings=4096)
    if arg == "7b-long":
      llama = extend_context(llama, LONG_CONTEXT)
    return LlamaVidConfig(llama=llama, vit=EVA_VIT_G, qformer=INSTRUCT_QFORMER, content_grid=0)
  if arg == "tiny":
    llama = LlamaConfig(vocab_size=320, hidden_size=40, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=10, max_position_embeddings=1024, remat_policy="none")
    vit = EVA_VIT_G.replace(image_size=28, patch_size=14, width=32, depth=2, num_heads=4, mlp_dim=64)
    qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=32,
                            num_queries=4, vocab_size=512, max_position_embeddings=32)
    return LlamaVidConfig(llama=llama, vit=vit, qformer=qformer, image_token_id=320, max_instruction_len=16)
  raise ValueError(f"unknown size {arg!r}; expected one of {', '.join(SIZES)}")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  if arg.split("_")[0] in SIZES:
    size, _, stage = arg.partition("_")
  else:
    size, stage = ("7b-long" if arg == "stage3" else "7b"), arg
  cfg = ml_collections.ConfigDict()
  cfg.model = ml_collections.ConfigDict(model_config(size).to_dict())
  cfg.trainable = ml_collections.ConfigDict(dict(
      stage1=(PROJECTORS,), stage2=(PROJECTORS, CONTEXT_PATH, LLM), stage3=(r"^projector/", LLM),
      stage2_lora=(PROJECTORS, CONTEXT_PATH, LORA_ADAPTERS)))
  if stage:
    train_config(cfg, stage, tiny=size == "tiny")
  return cfg


def train_config(cfg: ml_collections.ConfigDict, stage: str, tiny: bool = False) -> None:
  """Add the training sections of `stage` (one of `STAGES` or `LORA_STAGES`) to `cfg`."""
  if stage not in STAGES + LORA_STAGES:
    raise ValueError(f"unknown training stage {stage!r}; expected one of {', '.join(STAGES + LORA_STAGES)}")
  trainable, lora = tuple(cfg.trainable[stage]), stage in LORA_STAGES
  stage = stage.removesuffix("_lora")  # whose data, schedule and batch it keeps
  stage1 = stage == "stage1"
  cfg.system = "llama_vid"  # `vllm_jax.systems` name
  cfg.seed = 0
  cfg.init_from = ""  # a LLaMA-VID model folder; "" = random init of `model`
  # Full-size models compute in bfloat16 (fp32 master weights of the trained parameters, fp32 loss,
  # softmax and norms); the tiny ones in float32, as their parity tests do.
  cfg.compute_dtype = "float32" if tiny else "bfloat16"
  # The LLM's attention kernel: splash on TPU, cuDNN on GPU in bfloat16, XLA otherwise.
  cfg.attention_impl = "auto"
  # FSDP (see the docstring). -1: the remaining devices.
  cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  # What the text-guided part keeps for the backward pass (`LlamaVidSystem.stage_config`, over
  # init_from's config too; "" = the model's). Stage 2 trains the Q-Former, which runs once per
  # (question, frame): 2,400 passes an example, whose activations outgrow any chip unless each
  # question's pass and each Q-Former layer are recomputed in the backward pass.
  cfg.context_remat_policy = "nothing_saveable" if stage == "stage2" and not tiny else ""
  # Positions the loss projects to the vocabulary at once (0: all). A 65,536-token row's float32
  # logits are 8 GiB, and their gradient as much again.
  cfg.loss_chunk = 4096 if stage == "stage3" and not tiny else 0
  # The LLM's context in this stage (0: the model's). A longer one than init_from's is reached as
  # the reference's train.py reaches a model_max_length beyond the LLM's positions: linear RoPE
  # scaling, factor ceil(context_length / rope_context) (`llama.extend_context`), so stage 3 takes
  # a stage-2 folder's 4096 positions to 65536 at factor 16. rope_context: the positions the LLM's
  # RoPE was trained on (0: the folder's context; a converted LLaMA-VID folder states its
  # model_max_length, 2048, instead of Vicuna's 4096).
  cfg.context_length = (TINY_LONG_CONTEXT if tiny else LONG_CONTEXT) if stage == "stage3" else 0
  cfg.rope_context = 0 if tiny else VICUNA_CONTEXT
  cfg.optim = optim_config(trainable=trainable, lr=1e-3 if stage1 else 2e-4 if lora else 2e-5, min_lr=0.0,
                           warmup_start_lr=0.0, warmup_steps=0, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1.0)
  if lora:
    cfg.model.llama.lora = ml_collections.ConfigDict(LORA.to_dict())
  if stage1 and not tiny:
    # Micro-batches of 32 (4 examples of 64 frames per chip on v5e:2x4: 11.6 GiB of 16, `vllm-jax plan`;
    # all 256 at once need 37 GiB of temporaries per chip).
    cfg.optim.grad_accum = 8
  if stage == "stage3" and not tiny:
    # Micro-batches of 4: one row per chip on a v5p:2x2x1 (on 8 chips pass --config.optim.grad_accum=1).
    cfg.optim.grad_accum = 2
  if stage == "stage2" and not tiny:
    # Micro-batches of 8 (2 examples per chip on a v5p:2x2x1): with the context remat one example
    # still holds about 18 GiB of temporaries, and 4 per chip outgrow its 95 GiB (`vllm-jax plan`).
    cfg.optim.grad_accum = 16
  cfg.train = train_section(steps=math.ceil(EXAMPLES[stage] / BATCH[stage]), batch_size=BATCH[stage],
                            log_every=50, checkpoint_every=1000 if stage != "stage3" else 200)
  # Examples have fixed shapes: every video is padded to max_frames frames and every text to
  # max_len tokens. A video's run takes frames x 2 tokens in each of its questions.
  cfg.data = ml_collections.ConfigDict(dict(
      instruct_json="",          # conversations with an "image" or "video" path, or neither (text only);
                                 # or their manifest folder (`vllm-jax make-manifest --format llava`)
      instruct_dir="",           # media paths in the JSON are relative to this folder
      text_format="caption" if stage1 else "conversation",  # stage 1's captions, or vicuna_v1 chats
      tokenizer="",              # LLaMA tokenizer folder for a random init (init_from brings its own)
      instruction_tokenizer="",  # BERT tokenizer folder for a random init (init_from's instruction_tokenizer/)
      max_text_len=2048,         # text tokens, each placeholder counted once (the reference's model_max_length)
      # Tokens after the placeholders are expanded: a caption after 64 frames (stage 1); 2048 text
      # tokens and a 5-minute video asked about once (stage 2).
      max_len=384 if stage1 else 2688,
      max_frames=64 if stage1 else 300,  # frames of a video (1 per second; longer videos evenly thinned)
      # Questions of a conversation (later ones are dropped). Costs Q-Former runs: every example
      # of a video batch reads max_turns x max_frames frames.
      max_turns=1 if stage1 else 8,
      # Images: "pad" to a square of the CLIP mean colour before the resize, as the reference's
      # stage-2 and stage-3 scripts set it (--image_aspect_ratio pad); stage 1 keeps the
      # processor's resize and centre crop ("square").
      image_aspect_ratio="square" if stage1 else "pad",
      shuffle=True,
      num_epochs=-1,             # -1 = repeat forever
      worker_count=0,            # decoding processes per host; 0 = in the main process
      max_skipped=10000,         # abort after this many unreadable examples on a host; -1 = no limit
      cache_examples=False,      # keep every decoded example in memory (small datasets only)
      feature_cache="",          # a `vllm-jax cache-features` folder: the frozen encoders' outputs replace the media
      # Videos are feature files (long_video.py: each frame's ViT features and the subtitles
      # between frames), as the reference's long-video stage has them; False: video files.
      video_features=stage == "stage3",
  ))
  if stage == "stage3":
    # The reference counts frame tokens in its model_max_length: 3600 frames take 7200 of the
    # 65536, a movie's subtitles much of the rest. A movie asks one question (its features are
    # read once); 3600 frames are 2.6 GB of bfloat16 features an example (longer movies thinned).
    cfg.data.update(max_text_len=LONG_CONTEXT, max_len=LONG_CONTEXT, max_frames=3600, max_turns=1)
  if tiny:
    # A schedule of its own, so that runs of any length share it.
    cfg.optim.update(warmup_steps=5, warmup_ratio=0.0, total_steps=100, lr=1e-3 if stage1 else 1e-4)
    cfg.mesh.update(data=-1, fsdp=1)
    cfg.train.update(steps=20, batch_size=8, log_every=10, checkpoint_every=10)
    cfg.data.update(max_text_len=384, max_len=448, max_frames=4, max_turns=3 if stage == "stage2" else 1)
