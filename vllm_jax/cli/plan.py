"""`vllm-jax plan`: compile a recipe's train step for target devices, without weights, and
report its per-device memory, FLOPs and the step time they bound."""

import os
import subprocess
import sys

from vllm_jax.cli import flags

CHILD = "VLLM_JAX_PLAN_CHILD"  # set in the subprocess that compiles for a TPU topology
DEFAULT_LIBTPU_DIR = "~/.cache/vllm_jax/libtpu"

HELP = """Will a recipe's train step (or, with --generate, its model's generation) fit the chips, and
how fast could it go? Builds the trainer of
`--config FILE:ARG` (with `--config.a.b=VALUE` overrides, as `vllm-jax train`) WITHOUT weights
(abstract parameters; with init_from set only its config.json is read), lowers the real jitted
train step on a global batch of the system's example shapes, compiles it for the target devices
and prints, per device: argument, output, temporary and peak memory against the chip's HBM; the
FLOPs per step (the matmuls of the step's jaxpr, a scanned layer stack times its depth); the lower
bounds on the step time (FLOPs / bf16 peak, bytes / HBM bandwidth) and the MFU ceiling they imply;
when it does not fit, by how much and what would (a larger fsdp axis, a smaller batch, a remat
policy).

Chips (Google Cloud TPU docs, per chip): v4 32 GiB 275 TFLOP/s 1200 GB/s; v5e 16 GiB 197
TFLOP/s 819 GB/s; v5p 95 GiB 459 TFLOP/s 2765 GB/s; v6e 32 GiB 918 TFLOP/s 1640 GB/s.

Targets:
  --topology v5e:2x4   TPU chips compiled for ahead of time on this host (no TPU needed): needs
                       libtpu at the version jax pins, installed OUTSIDE the venv (a libtpu in the
                       venv makes every jax process take /tmp/libtpu_lockfile):
                         pip install --target ~/.cache/vllm_jax/libtpu 'libtpu==0.0.42.*'
                       (there is deliberately no setup.py extra for it: an extra would install
                       libtpu into the venv). The compile runs in a subprocess with libtpu on its
                       PYTHONPATH, so this process never loads it. A 7B step takes minutes.
                       Without libtpu in --libtpu-dir it prints that command and exits 2.
  --cpu-devices N      N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
                       in a subprocess when this one has fewer); no HBM to compare with.
  neither              this process's devices, as they are.
The mesh is the recipe's `mesh` (or --mesh); the global batch is train.batch_size (or --batch),
which must divide over data x fsdp (x optim.grad_accum).

--generate: instead of the train step, compile generation with the recipe's LLM (weights, KV cache
and compute in its compute_dtype): one prefill piece (512 prompt tokens of every row into the
cache) and one decode step, for --batch rows (default 8) of a --context-slot cache (default the
LLM's max_position_embeddings), sharded as `vllm-jax infer --mesh` shards them. Prints weights and
cache per device, each step's temporaries and peak, and the decode-speed bound (a decode step reads
every weight and the whole cache from HBM).

Reading the table: memory is XLA's per-device analysis of the compiled step (the state is
donated, so outputs alias arguments); peak is the compiler's own figure on TPU. When the TPU
compiler refuses the step for want of HBM, the arguments come from the shard shapes and the
temporaries from its message. FLOPs are matmul FLOPs of the whole step (forward, backward,
rematerialisation), all devices. Step time >= max(FLOPs per device / peak, bytes / bandwidth),
the bytes being XLA's bytes accessed or at least the arguments and outputs; the MFU ceiling is
the compute time over that bound. Errors (bad batch, mesh or topology) are one `error:` line,
exit status 2.
"""


def add_parser(commands) -> None:
  p = commands.add_parser("plan", help="compile a recipe's train step for TPU/CPU devices: memory, FLOPs, "
                                       "step-time bound",
                          description=HELP, formatter_class=flags.argparse.RawDescriptionHelpFormatter,
                          usage="vllm-jax plan --config FILE[:ARG] [--config.a.b=VALUE ...] "
                                "[--topology v5e:2x4 | --cpu-devices N] [--mesh DATA,FSDP,TENSOR] [--batch N] "
                                "[--generate [--context N]]")
  flags.recipe_flag(p)
  target = p.add_mutually_exclusive_group()
  target.add_argument("--topology", metavar="CHIP:AxB[xC]",
                      help="a TPU slice to compile for: v4, v5e, v5p or v6e, e.g. v5e:2x4 (8 chips)")
  target.add_argument("--cpu-devices", type=flags.number(int, 1), metavar="N", help="N fake CPU devices")
  p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                 help="mesh sizes (-1: the remaining devices), replacing the recipe's mesh section")
  p.add_argument("--batch", type=flags.number(int, 1), metavar="N",
                 help="global batch (train.batch_size); with --generate, the rows decoded together (default 8)")
  p.add_argument("--generate", action="store_true", help="plan generation (prefill and decode) instead of training")
  p.add_argument("--context", type=flags.number(int, 1), metavar="N",
                 help="with --generate: KV cache slots per row (default the LLM's max_position_embeddings)")
  p.add_argument("--libtpu-dir", default=DEFAULT_LIBTPU_DIR,
                 help=f"the `pip install --target` folder holding libtpu (default {DEFAULT_LIBTPU_DIR})")
  p.set_defaults(run=run, takes_overrides=True)


def _config(args, overrides):
  from vllm_jax import systems
  cfg = flags.load_config(args.config, overrides)
  if args.mesh:
    try:
      data, fsdp, tensor = (int(s) for s in args.mesh.split(","))
    except ValueError:
      raise ValueError(f"--mesh {args.mesh!r}: expected DATA,FSDP,TENSOR, e.g. 1,8,1") from None
    cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  if args.batch and not args.generate:
    cfg.train.batch_size = args.batch
  return cfg, systems.get(cfg.system)


def _child_argv(args, overrides) -> list[str]:
  argv = ["plan", "--config", args.config, *overrides]
  for flag, value in (("--topology", args.topology), ("--cpu-devices", args.cpu_devices),
                      ("--mesh", args.mesh), ("--batch", args.batch), ("--context", args.context),
                      ("--libtpu-dir", args.libtpu_dir)):
    if value is not None:
      argv += [flag, str(value)]
  return argv + (["--generate"] if args.generate else [])


def run(args, overrides: list[str]) -> int:
  from vllm_jax.train import plan as plan_lib
  if args.context and not args.generate:
    return flags.error("--context sizes the KV cache of --generate: add --generate")
  try:
    cfg, system = _config(args, overrides)
    chip, chips = plan_lib.parse_topology(args.topology) if args.topology else (None, 0)
  except (ValueError, KeyError, AttributeError, FileNotFoundError) as e:
    return flags.error(str(e))
  child = os.environ.get(CHILD) == "1"
  if args.topology and not child:
    if not plan_lib.libtpu_found(args.libtpu_dir):
      return flags.error(f"no libtpu in {args.libtpu_dir}: run  pip install --target {args.libtpu_dir} "
                         f"'{plan_lib.jax_libtpu_requirement()}'  (outside the venv), or pass --libtpu-dir")
    env = dict(plan_lib.tpu_env(args.libtpu_dir, args.topology, chips), **{CHILD: "1"})
    print(f"compiling for {args.topology} in a subprocess with libtpu from {args.libtpu_dir} ...", file=sys.stderr)
    return subprocess.call([sys.executable, "-m", "vllm_jax.cli", *_child_argv(args, overrides)], env=env)
  if args.cpu_devices and not child:
    if "jax" not in sys.modules:  # this process can still choose its devices
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    else:
      import jax
      if len(jax.devices("cpu")) < args.cpu_devices:  # too late here: a fresh process
        env = dict(os.environ, **{CHILD: "1"})
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
        return subprocess.call([sys.executable, "-m", "vllm_jax.cli", *_child_argv(args, overrides)], env=env)
  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)
  import jax
  try:
    if args.topology:
      devices = plan_lib.tpu_devices(args.topology)
    elif args.cpu_devices:
      devices = jax.devices("cpu")[:args.cpu_devices]
    else:
      devices = jax.devices()
    if args.generate:
      llama = plan_lib.model_config(cfg, system).llama
      mesh = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
      plan = plan_lib.make_generation_plan(llama, devices, mesh, args.batch or 8,
                                           args.context or llama.max_position_embeddings, chip)
      text = plan_lib.format_generation_plan(plan)
    else:
      text = plan_lib.format_plan(plan_lib.make_plan(cfg, system, devices, chip))
  except (ValueError, KeyError, FileNotFoundError) as e:
    return flags.error(str(e))
  print(f"plan for {args.config}{' ' + ' '.join(overrides) if overrides else ''}"
        f"{f' on {args.topology}' if args.topology else ''}")
  print(text)
  return 0
