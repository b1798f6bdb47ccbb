"""`vllm-jax cache-features`: a system's frozen encoders (Video-LLaMA, Video-LLaVA, LLaMA-VID) run
once over a training config's data, their outputs written as a feature cache
(`vllm_jax.data.feature_cache`) that training reads with `--config.data.feature_cache=DIR`."""

import sys

from vllm_jax.cli import flags

HELP = """Run the frozen encoders of a training config once over its training data, the media
loaded exactly as training loads them, and write their outputs to --out (ArrayRecord chunks read
by grain, and features.json recording the encoder weights' fingerprint, the preprocessing and the
data files). Video-LLaMA: EVA ViT + ln_vision + image Q-Former per frame (ImageBind with
data.with_audio); Video-LLaVA: the image tower per image, the video tower per video; LLaMA-VID:
the EVA ViT per frame (its question-guided context token still runs in training). Takes the same
--config and --config.a.b=VALUE overrides as `vllm-jax train`. Each process writes its share of
the chunks, batches data parallel over its devices; a rerun finishes an interrupted cache. Then
train with the same flags and --config.data.feature_cache=DIR: the loss is the same, without
decoding media or running the encoders; a cache made for other weights, frames, audio settings
or data files is refused. --batch-size counts examples (LLaMA-VID's, whose frames vary: frames).
"""


def add_parser(commands) -> None:
  parser = commands.add_parser("cache-features", help="run the frozen encoders once; write a feature cache",
                               description=HELP, formatter_class=flags.argparse.RawDescriptionHelpFormatter,
                               usage="vllm-jax cache-features --config FILE[:ARG] [--config.a.b=VALUE ...] --out DIR")
  flags.recipe_flag(parser)
  parser.add_argument("--out", required=True, metavar="DIR", help="the cache folder (created; resumed if present)")
  parser.add_argument("--batch-size", type=flags.number(int, 1), default=32,
                      help="examples (LLaMA-VID: frames) per encoder batch on each process (rounded up to "
                           "its device count)")
  parser.add_argument("--chunk-size", type=flags.number(int, 1), default=256,
                      help="examples per ArrayRecord file: the unit of resumption")
  parser.set_defaults(run=run, takes_overrides=True)


def cache_features(cfg, out_dir: str, batch_size: int = 32, chunk_size: int = 256, progress: bool = True) -> int:
  """Write (or finish) the feature cache of training config `cfg` in `out_dir` -> chunks written
  by this process."""
  from vllm_jax import systems
  from vllm_jax.data import feature_cache
  from vllm_jax.train import run as run_lib
  if not cfg.get("system"):
    raise ValueError("the config names no system (a training config from configs/ does)")
  system = systems.get(cfg.system)
  config, tokenizer_dir = run_lib.model_config(cfg, system)  # the encoders compute as training computes them
  feature_cache.check_system(cfg, system, config)
  sources = system.feature_sources(cfg, config, tokenizer_dir)
  params = feature_cache.encoder_params(cfg, system, config)
  meta = feature_cache.describe(cfg, system, config, sources, params)
  encode = feature_cache.make_encoder(system, config, params, system.feature_shapes(cfg, config), batch_size)
  return feature_cache.write(out_dir, meta, sources, encode, batch_size, chunk_size=chunk_size,
                             worker_count=cfg.data.worker_count, progress=progress)


def run(args, overrides: list[str]) -> int:
  from vllm_jax.data.feature_cache import META
  from vllm_jax.train import sharding
  cfg = flags.load_config(args.config, overrides)
  flags.check_resumable_folder("--out", args.out, META, {"--config.init_from": cfg.get("init_from")})
  sharding.initialize_distributed()
  import jax
  written = cache_features(cfg, args.out, args.batch_size, args.chunk_size, progress=jax.process_index() == 0)
  print(f"process {jax.process_index()}: {written} chunks written to {args.out}", file=sys.stderr)
  return 0
