"""Training config shape (mesh, optim, train, data, model), on a tiny LLaMA.

`get_config("connectors")` trains only the final norm and lm_head with the rest frozen (the shape of
Video-LLaMA's stages, where only Q-Formers/queries/projections train); `get_config("full")` trains
every parameter (the shape of Video-LLaVA stage 2, where the LLM trains too).
"""

import ml_collections


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """AdamW + warmup/cosine, Video-LLaMA stage 1 values by default."""
  cfg = ml_collections.ConfigDict(dict(
      trainable=("^norm/", "^lm_head/"),  # regexes over '/'-joined parameter paths
      frozen_dtype="bfloat16",            # frozen parameters are stored (and read) in this dtype
      lr=1e-4, min_lr=8e-5, warmup_start_lr=1e-6,
      warmup_steps=2500,
      warmup_ratio=0.0,                   # or the warm-up as a fraction of total_steps (not both)
      total_steps=0,                      # where the cosine ends; 0 = train.steps
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.05,
      no_decay=(r"(^|/)bias$", r"(^|/)scale$", r"norm", r"(^|/)ln_"),
      clip_norm=1.0,                      # 0 disables clipping
      grad_accum=1,                       # micro-batches per optimizer update
  ))
  cfg.update(overrides)
  return cfg


def train_section(**overrides) -> ml_collections.ConfigDict:
  """The `train` section: run length, batch, logging and checkpointing."""
  cfg = ml_collections.ConfigDict(dict(
      steps=100,
      batch_size=8,              # global, per optimizer update (all micro-batches, all processes)
      workdir="",                # checkpoints, TensorBoard events, metrics/; "" = none
      log_every=10,
      eval_every=0,              # 0 = no periodic eval
      eval_steps=2,
      checkpoint_every=50,
      keep_checkpoints=3,
      save_frozen=False,         # False: checkpoints hold only trainable params (frozen ones are reloaded)
      async_checkpoints=True,
      max_nan_skips=10,          # abort after this many non-finite steps were skipped
      peak_tflops=0.0,           # per-device peak for the MFU estimate; 0 = look up the device kind
  ))
  cfg.update(overrides)
  return cfg


def get_config(arg: str = "connectors") -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices

  cfg.model = ml_collections.ConfigDict(dict(
      vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=8, max_position_embeddings=64, dtype="float32", param_dtype="float32",
      remat_policy="none"))

  # A schedule of its own: the resume tests compare runs of different lengths.
  cfg.optim = optim_config(lr=1e-2, min_lr=1e-3, warmup_start_lr=1e-4, warmup_steps=5, total_steps=100)
  if arg == "full":
    cfg.optim.trainable = (".*",)
  elif arg != "connectors":
    raise ValueError(f"unknown config {arg!r}; use 'connectors' or 'full'")

  cfg.train = train_section()

  cfg.data = ml_collections.ConfigDict(dict(
      seq_len=16,
      shuffle=True,
      num_epochs=-1,             # -1 = repeat forever
      worker_count=0,            # decoding processes per host; 0 = in the main process
      max_skipped=100,           # abort after this many unreadable examples on a host; -1 = no limit
  ))
  return cfg
