"""`vllm-jax cache-features`: Video-LLaMA's frozen encoders run once over a training config's data,
their outputs written as a feature cache (`vllm_jax.data.feature_cache`) that training reads with
`--config.data.feature_cache=DIR`."""

import sys

from vllm_jax import paths
from vllm_jax.cli import flags

HELP = """Run the frozen encoders of a Video-LLaMA training config (EVA ViT + ln_vision + image
Q-Former per frame; ImageBind with data.with_audio) once over its training data, the frames and
audio sampled exactly as training samples them, and write their outputs to --out (ArrayRecord
chunks read by grain, and features.json recording the encoder weights' fingerprint, the
preprocessing and the data files). Takes the same --config and --config.a.b=VALUE overrides as
`vllm-jax train`. Each process writes its share of the chunks, batches data parallel over its
devices; a rerun finishes an interrupted cache. Then train with the same flags and
--config.data.feature_cache=DIR: the loss is the same, without decoding videos or running the
encoders; a cache made for other weights, frames, audio settings or data files is refused.
"""


def add_parser(commands) -> None:
  parser = commands.add_parser("cache-features", help="run the frozen encoders once; write a feature cache",
                               description=HELP, formatter_class=flags.argparse.RawDescriptionHelpFormatter,
                               usage="vllm-jax cache-features --config FILE[:ARG] [--config.a.b=VALUE ...] --out DIR")
  flags.recipe_flag(parser)
  parser.add_argument("--out", required=True, metavar="DIR", help="the cache folder (created; resumed if present)")
  parser.add_argument("--batch-size", type=flags.number(int, 1), default=32,
                      help="examples per encoder batch on each process (rounded up to its device count)")
  parser.add_argument("--chunk-size", type=flags.number(int, 1), default=256,
                      help="examples per ArrayRecord file: the unit of resumption")
  parser.set_defaults(run=run, takes_overrides=True)


def model_config(cfg, system):
  """-> (model config, tokenizer folder), as `vllm-jax train` builds them, without loading weights."""
  from vllm_jax import pretrained
  from vllm_jax.data.tokenizer import load_tokenizer
  if cfg.init_from:
    if pretrained.model_type(cfg.init_from) != system.model_type:
      raise ValueError(f"{cfg.init_from} holds a {pretrained.model_type(cfg.init_from)!r} model, not a "
                       f"{system.model_type} one")
    config = paths.read_json(paths.join(cfg.init_from, "config.json"))[system.model_type]
    return system.config_class.from_dict(config), paths.join(cfg.init_from, "tokenizer")
  if not cfg.data.tokenizer:
    raise ValueError("set init_from (a converted model folder) or data.tokenizer (for a random init)")
  return system.prepare_init(cfg, load_tokenizer(cfg.data.tokenizer)), cfg.data.tokenizer


def cache_features(cfg, out_dir: str, batch_size: int = 32, chunk_size: int = 256, progress: bool = True) -> int:
  """Write (or finish) the feature cache of training config `cfg` in `out_dir` -> chunks written
  by this process."""
  from vllm_jax.data import feature_cache
  from vllm_jax.systems import video_llama
  if cfg.get("system") != video_llama.VideoLlamaSystem.model_type:
    raise ValueError(f"feature caches are made for Video-LLaMA configs, not system {cfg.get('system')!r}")
  config, tokenizer_dir = model_config(cfg, video_llama.VideoLlamaSystem)
  sources = video_llama.data_sources(cfg, config, tokenizer_dir)
  params = feature_cache.encoder_params(cfg, config)
  meta = feature_cache.describe(cfg, config, sources, params)
  encode, batch_size = feature_cache.make_encoder(config, params, batch_size)
  return feature_cache.write(out_dir, meta, sources, encode, batch_size, chunk_size=chunk_size,
                             worker_count=cfg.data.worker_count, progress=progress)


def run(args, overrides: list[str]) -> int:
  from vllm_jax.train import sharding
  try:
    cfg = flags.load_config(args.config, overrides)
  except (ValueError, KeyError, AttributeError, FileNotFoundError) as e:
    return flags.error(str(e))
  sharding.initialize_distributed()
  import jax
  written = cache_features(cfg, args.out, args.batch_size, args.chunk_size, progress=jax.process_index() == 0)
  print(f"process {jax.process_index()}: {written} chunks written to {args.out}", file=sys.stderr)
  return 0
