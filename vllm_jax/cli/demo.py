"""`vllm-jax make-dataset` and `vllm-jax demo`: the synthetic shapes-and-sounds videos, and the
tiny audio-visual Video-LLaMA trained on them."""

from vllm_jax.cli import flags


def add_parser(commands) -> None:
  make = commands.add_parser(
      "make-dataset", help="write the synthetic shapes-and-sounds video dataset (mp4 + WebVid CSV + JSON)",
      description="Short mp4 videos (H.264 + AAC) of a coloured shape moving left/right/up/down while a low "
                  "tone, a high tone or noise plays, captioned with all four; train and val splits from "
                  "different seeds, as WebVid-style CSVs and LLaVA-style conversation JSON. Reproducible from "
                  "the seed; an existing identical dataset is kept.")
  make.add_argument("--out", required=True, help="output folder")
  make.add_argument("--num-train", type=int, default=480)
  make.add_argument("--num-val", type=int, default=96)
  make.add_argument("--seed", type=int, default=0, help="the train split's seed (val: seed + 1)")
  make.set_defaults(run=make_dataset)

  demo = commands.add_parser(
      "demo", help="train a tiny audio-visual Video-LLaMA on synthetic videos, evaluate it and chat",
      description="Generate the synthetic dataset (cached), train a tiny Video-LLaMA with `vllm-jax train`'s "
                  "code, save the model, caption the held-out videos with `vllm-jax eval --format "
                  "synthetic`, print the exact-caption and per-attribute accuracy, write report.png and answer "
                  "a question with `vllm-jax chat`. "
                  "Ablations: --config.model.use_frame_pos=False, --config.model.use_audio=False; other "
                  "--config.a.b=VALUE flags as for `train` (e.g. --config.demo.workdir=DIR, "
                  "--config.train.steps=N).",
      usage="vllm-jax demo [--config FILE[:ARG]] [--config.a.b=VALUE ...]")
  demo.add_argument("--config", default=None, metavar="FILE[:ARG]", help="default: configs/demo.py")
  demo.set_defaults(run=demo_run, takes_overrides=True)


def make_dataset(args) -> int:
  from vllm_jax.data import synthetic
  try:
    paths = synthetic.make_dataset(args.out, args.num_train, args.num_val, seed=args.seed)
  except ValueError as e:
    return flags.error(str(e))
  print("\n".join(f"{k}: {v}" for k, v in paths.items()))
  return 0


def demo_run(args, overrides: list[str]) -> int:
  from vllm_jax import demo
  from vllm_jax.configs import demo as demo_config
  try:
    cfg = flags.load_config(args.config or demo_config.__file__, overrides)
  except (ValueError, KeyError, FileNotFoundError) as e:
    return flags.error(str(e))
  return demo.main(cfg)
