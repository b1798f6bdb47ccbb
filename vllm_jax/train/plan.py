"""Will a recipe's train step fit, and how fast could it be? (`vllm-jax plan`)

Builds the trainer of a config without any weights (abstract parameters: the `Trainer` only
traces shapes), lowers the real jitted train step on `Trainer.abstract_state` and the system's
`batch_spec`, compiles it for the target devices (fake CPU devices, or TPU devices of a topology
compiled ahead of time by libtpu on this host) and reads XLA's per-device memory analysis. FLOPs
are `Trainer.step_flops` (matmul FLOPs of the step's jaxpr, scan bodies times their length).

Chips (bf16 dense peak, HBM capacity and bandwidth per chip, from Google Cloud's TPU pages,
cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}):
  v4  275 TFLOP/s, 32 GiB, 1200 GB/s      v5e 197 TFLOP/s, 16 GiB,  819 GB/s
  v5p 459 TFLOP/s, 95 GiB, 2765 GB/s      v6e 918 TFLOP/s, 32 GiB, 1640 GB/s
"""

import dataclasses
import math
import os
import re
from typing import Any, Sequence

from vllm_jax import paths

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_flops: float       # dense bf16 FLOP/s
  hbm_bandwidth: float    # bytes/s


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
}
# Cloud TPU accelerator type names (v4 and v5p count TensorCores, two per chip).
ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}", "v6e": "v6e-{chips}"}
TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> tuple[Chip, int]:
  """'v5e:2x4' -> (the chip, the number of chips). Raises ValueError on anything else."""
  m = TOPOLOGY.match(name)
  if not m:
    raise ValueError(f"unknown topology {name!r}: expected CHIP:AxB[xC] with CHIP one of "
                     f"{', '.join(CHIPS)} (e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2)")
  return CHIPS[m.group(1)], math.prod(int(g) for g in m.groups()[1:] if g)


def model_config(cfg, system):
  """The model config a run of `cfg` trains, without weights: `init_from`'s config.json when set,
  else the recipe's `model` (its placeholder ids as the recipe has them), as `run.training_config`
  completes it."""
  from vllm_jax.train import run as run_lib
  if cfg.get("init_from"):
    path = paths.join(cfg.init_from, "config.json")
    if not paths.is_file(path):
      raise FileNotFoundError(f"no config.json in init_from {cfg.init_from}")
    meta = paths.read_json(path)
    if system.model_type not in meta:
      raise ValueError(f"{path} holds no {system.model_type} config")
    return run_lib.training_config(cfg, system, system.config_class.from_dict(meta[system.model_type]))
  return run_lib.training_config(cfg, system, system.config_class.from_dict(cfg.model.to_dict()))


@dataclasses.dataclass
class Plan:
  devices: int
  device_kind: str
  mesh: dict[str, int]
  batch: dict[str, Any]           # name -> (shape, dtype)
  argument: int                   # bytes per device
  output: int
  alias: int
  temp: int
  code: int
  peak: int
  flops: float                    # matmul FLOPs per step, all devices (`Trainer.step_flops`)
  xla_flops: float | None         # per device, XLA's cost analysis
  xla_bytes: float | None         # per device, XLA's cost analysis
  chip: Chip | None
  suggestions: list[str]
  remat_policy: str | None
  attention: str | None = None        # the LLM's attention kernel, as `attention_impl` resolves here
  compiler_error: str | None = None  # the compiler's out-of-memory line, when it refused the step


def check_batch(cfg, mesh) -> None:
  """The global batch must split evenly over the data-parallel devices (each micro-batch too)."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  b, accum = cfg.train.batch_size, cfg.optim.get("grad_accum", 1)
  if b % (dp * accum):
    raise ValueError(f"batch {b} does not divide over the mesh's {dp} data-parallel devices "
                     f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}"
                     f"{f' x grad_accum {accum}' if accum > 1 else ''}): use a multiple of {dp * accum}")


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _stat(stats, name: str) -> int:
  return int(getattr(stats, name, 0) or 0)


def make_plan(cfg, system, devices: Sequence[Any], chip: Chip | None = None) -> Plan:
  """Compile `cfg`'s train step for `devices` (mesh from `cfg.mesh`) and measure it."""
  import jax  # pylint: disable=g-import-not-at-top
  from vllm_jax.nn.attention import resolve_implementation  # pylint: disable=g-import-not-at-top
  from vllm_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  from vllm_jax.train import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices=devices)
  check_batch(cfg, mesh)
  config = model_config(cfg, system)
  spec = system.batch_spec(cfg, config)
  t = run_lib.make_trainer(cfg, mesh, system, config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=t.batch_sharding) for k, v in spec.items()}
  over = None
  try:
    compiled = t.lower(spec).compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that outgrows HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    over = str(e).strip().splitlines()[0]
  if over is None:
    stats = compiled.memory_analysis()
    argument, output, alias, temp, code = (_stat(stats, f"{n}_size_in_bytes") for n in
                                           ("argument", "output", "alias", "temp", "generated_code"))
    # TPU reports a liveness-aware peak; the CPU's is unreliable: at least what is live at once.
    peak = max(_stat(stats, "peak_memory_in_bytes"), argument + output - alias + temp)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  else:  # the arguments from their shard shapes, the temporaries from the compiler's message
    state = _shard_bytes(t.abstract_state)
    argument, output, alias, code = state + _shard_bytes(batch), state, state, 0
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", over)
    temp = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))) if m else 0
    peak, cost = argument + temp, {}
  llama = getattr(config, "llama", None)
  attention = None
  if llama is not None and "input_ids" in spec:  # the LLM's sequence: the text with its media tokens
    with sharding.mesh_context(mesh):
      length = spec["input_ids"].shape[1]
      chosen = resolve_implementation(llama.attention_impl, jax.ShapeDtypeStruct((1, length), llama.dtype))
    attention = f"{chosen} (attention_impl {llama.attention_impl or 'xla'}; {length} tokens)"
  plan = Plan(devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
              batch={k: (tuple(v.shape), str(v.dtype)) for k, v in spec.items()},
              argument=argument, output=output, alias=alias, temp=temp, code=code, peak=peak,
              flops=t.step_flops(batch), xla_flops=cost.get("flops"), xla_bytes=cost.get("bytes accessed"),
              chip=chip, suggestions=[], remat_policy=getattr(llama, "remat_policy", None), attention=attention,
              compiler_error=over)
  plan.suggestions = suggest(plan, cfg)
  return plan


def suggest(plan: Plan, cfg) -> list[str]:
  """What would make a step that outgrows the chip's HBM fit."""
  if plan.chip is None or plan.peak <= plan.chip.hbm_bytes:
    return []
  out = []
  if plan.mesh["fsdp"] < plan.devices:
    out.append(f"shard parameters and optimizer state over more devices: --mesh 1,{plan.devices},1 "
               f"(fsdp {plan.devices}; the arguments, {plan.argument / GiB:.1f} GiB now, shrink about "
               f"{plan.devices // plan.mesh['fsdp']}x)")
  if plan.remat_policy in ("none", "everything_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"):
    out.append("recompute activations in the backward pass: --config.model.llama.remat_policy=nothing_saveable")
  b, accum = cfg.train.batch_size, cfg.optim.get("grad_accum", 1)
  dp = plan.mesh["data"] * plan.mesh["fsdp"]
  room = plan.chip.hbm_bytes - plan.argument - plan.code
  if plan.temp > 0 and room > 0:
    # Temporaries scale about linearly with the micro-batch: the largest that leaves them room.
    micro = int(b // accum * room / plan.temp) // dp * dp
    more = next((a for a in range(accum, b // dp + 1) if b % (a * dp) == 0 and b // a <= micro), None)
    if micro >= dp:
      out.append(f"a smaller micro-batch (temporaries, {plan.temp / GiB:.1f} GiB now, scale with it): about "
                 f"--batch {micro}" + (f", or keep {b} with --config.optim.grad_accum={more}" if more else "")
                 + " (an optimistic guess: gradient buffers and logits do not shrink with it; rerun plan to check)")
    else:
      out.append(f"even a micro-batch of {dp} (one row per data-parallel device) would leave the temporaries "
                 f"({plan.temp / GiB:.1f} GiB now) too little room: shorten the sequences or frames, or shard more")
  out.append("freeze more or keep frozen weights in bfloat16 (optim.trainable, optim.frozen_dtype), "
             "or a chip with more HBM (v5p: 95 GiB)")
  return out


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB / KiB when small."""
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2)):
    if abs(n) >= size / 10:
      return f"{n / size:9.3f} {unit}"
  return f"{n / 1024:9.3f} KiB"


def _seconds(s: float) -> str:
  return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def format_plan(plan: Plan) -> str:
  chip = plan.chip
  mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
  lines = [f"devices   {plan.devices} x {plan.device_kind}   mesh {mesh}",
           "batch     " + ", ".join(f"{k} {list(s)} {d}" for k, (s, d) in plan.batch.items())]
  if plan.attention:
    lines.append(f"attention {plan.attention}")
  lines += ["", "memory per device"]
  hbm = chip.hbm_bytes if chip else None
  if plan.compiler_error:
    lines += [f"  the compiler refused the step: {plan.compiler_error}",
              "  (arguments from the shard shapes, temporaries from that message; peak = their sum)"]
  for name, value in (("arguments", plan.argument), ("outputs", plan.output),
                      ("aliased (donated)", plan.alias), ("temporaries", plan.temp),
                      ("code", plan.code), ("peak", plan.peak)):
    share = ""
    if hbm and name != "aliased (donated)":
      share = f"  {100 * value / hbm:6.1f}% of {chip.name}'s {hbm / GiB:.0f} GiB HBM"
    lines.append(f"  {name:<18} {_gib(value)}{share}")
  if hbm:
    if plan.peak <= hbm:
      lines.append(f"  fits: {_gib(hbm - plan.peak).strip()} to spare")
    else:
      lines.append(f"  DOES NOT FIT: {_gib(plan.peak - hbm).strip()} over ({plan.peak / hbm:.2f}x the HBM)")
  lines.append("")
  per_device = plan.flops / plan.devices
  lines.append(f"FLOPs per step     {plan.flops:.4g} ({per_device:.4g} per device; matmuls, scans x length)")
  if plan.xla_flops is not None:
    lines.append(f"XLA cost analysis  {plan.xla_flops:.4g} FLOPs, {plan.xla_bytes or 0:.4g} bytes accessed "
                 "per device (scan bodies counted once)")
  if chip:
    hbm_bytes = max(plan.xla_bytes or 0, plan.argument + plan.output)
    memory_s = hbm_bytes / chip.hbm_bandwidth
    lines.append(f"chip               {chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"{chip.hbm_bandwidth / 1e9:.0f} GB/s HBM")
    lines.append(f"step time >=       {_seconds(memory_s)} memory-bound ({hbm_bytes / GiB:.2f} GiB at HBM bandwidth)")
    compute_s = per_device / chip.peak_flops
    lines.append(f"step time >=       {_seconds(compute_s)} compute-bound (FLOPs / peak)")
    lines.append(f"MFU ceiling        {100 * compute_s / max(compute_s, memory_s):.1f}%")
  else:
    lines.append("chip               none (CPU devices): no HBM or peak to compare with; pass --topology")
  if plan.suggestions:
    lines += ["", "to fit:"] + [f"  - {s}" for s in plan.suggestions]
  return "\n".join(lines)


@dataclasses.dataclass
class Compiled:
  """Per-device memory of one compiled function (bytes), and its matmul FLOPs on all devices."""
  argument: int
  temp: int
  peak: int
  flops: float
  compiler_error: str | None = None


@dataclasses.dataclass
class GenerationPlan:
  devices: int
  device_kind: str
  mesh: dict[str, int]
  rows: int                       # prompts decoded together
  context: int                    # KV cache slots per row
  dtype: str                      # weights, cache and compute
  weights: int                    # bytes per device
  cache: int                      # bytes per device
  prefill: Compiled               # one PREFILL_CHUNK-token piece of the prompts into the cache
  decode: Compiled                # one decode step (a token per row)
  chip: Chip | None


def _compile(fn, *args) -> Compiled:
  """Trace, lower and compile the jitted `fn(*args)` (static arguments and ShapeDtypeStructs) and
  read its memory; the compiler's out-of-memory message when it refuses."""
  import jax  # pylint: disable=g-import-not-at-top
  from vllm_jax.train import flops  # pylint: disable=g-import-not-at-top
  traced = fn.trace(*args)
  count = flops.count_jaxpr(traced.jaxpr).flops
  argument = _shard_bytes([a for a in jax.tree.leaves(args) if isinstance(a, jax.ShapeDtypeStruct)])
  try:
    stats = traced.lower().compile().memory_analysis()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    over = str(e).strip().splitlines()[0]
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", over)
    temp = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))) if m else 0
    return Compiled(argument, temp, argument + temp, count, over)
  temp = _stat(stats, "temp_size_in_bytes")
  # the cache and state are donated: their outputs reuse the arguments' buffers
  return Compiled(argument, temp, max(_stat(stats, "peak_memory_in_bytes"), argument + temp), count)


def make_generation_plan(config, devices: Sequence[Any], mesh_shape: Sequence[int], rows: int, context: int,
                         chip: Chip | None = None) -> GenerationPlan:
  """Compile generation with the LLM of `config` (a LlamaConfig; weights, cache and compute in its
  `dtype`) for `devices`: a prefill piece and a decode step for `rows` prompts in a `context`-slot
  cache, sharded as `vllm-jax infer --mesh` shards them (weights by their logical axes, the cache's
  rows over data x fsdp and its heads over tensor)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  from vllm_jax import generate  # pylint: disable=g-import-not-at-top
  from vllm_jax.converters import llama as llama_conv  # pylint: disable=g-import-not-at-top
  from vllm_jax.models.llama import KVCache  # pylint: disable=g-import-not-at-top
  from vllm_jax.train import sharding  # pylint: disable=g-import-not-at-top

  config = config.replace(param_dtype=config.dtype)
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % dp:
    raise ValueError(f"{rows} rows do not divide over the mesh's {dp} data-parallel devices: use a multiple of {dp}")
  if context <= generate.PREFILL_CHUNK:
    raise ValueError(f"--context {context}: the cache must hold more than one {generate.PREFILL_CHUNK}-token piece")
  boxed = llama_conv.abstract_params(config)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        sharding.param_shardings(boxed, mesh))
  spec = lambda *axes: sharding.logical_to_sharding(PartitionSpec(*axes), mesh)
  struct = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(shape, dtype, sharding=spec(*axes))
  kv = (config.num_layers, rows, config.num_kv_heads, context, config.head_dim)
  cache = KVCache(k=struct(kv, config.dtype, "layers", "batch", "kv_heads", "length", "head_dim"),
                  v=struct(kv, config.dtype, "layers", "batch", "kv_heads", "length", "head_dim"),
                  valid=struct((rows, context), bool, "batch", "length"), index=struct((), jnp.int32))
  chunk = generate.PREFILL_CHUNK
  new_tokens = 128
  sampling = generate.SamplingConfig()
  state = generate.DecodeState(cache=cache, tokens=struct((rows, new_tokens), jnp.int32, "batch", None),
                               step=struct((), jnp.int32), done=struct((rows,), bool, "batch"),
                               keys=jax.ShapeDtypeStruct((rows,), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                                         sharding=spec("batch")))
  scalar = struct((), jnp.int32)
  with sharding.mesh_context(mesh):
    prefill = _compile(generate.extend, config, params, cache,
                       struct((rows, chunk, config.hidden_size), config.dtype, "batch", "length", "act_embed"),
                       struct((rows, chunk), jnp.int32, "batch", "length"))
    decode = _compile(generate.decode, config, sampling, params, state, scalar, struct((1,), jnp.int32), scalar)
  return GenerationPlan(devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                        rows=rows, context=context, dtype=config.dtype, weights=_shard_bytes(params),
                        cache=_shard_bytes(cache), prefill=prefill, decode=decode, chip=chip)


def format_generation_plan(plan: GenerationPlan) -> str:
  chip = plan.chip
  mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
  lines = [f"devices   {plan.devices} x {plan.device_kind}   mesh {mesh}",
           f"generation  {plan.rows} rows, a {plan.context}-slot KV cache each, {plan.dtype} weights, cache "
           "and compute", "",
           "memory per device",
           f"  {'weights':<26} {_gib(plan.weights)}", f"  {'KV cache':<26} {_gib(plan.cache)}"]
  hbm = chip.hbm_bytes if chip else None
  for name, c in ((f"prefill ({plan.rows} x 512 tokens)", plan.prefill), ("decode step", plan.decode)):
    verdict = ""
    if c.compiler_error:
      verdict = f"  refused by the compiler: {c.compiler_error}"
    elif hbm:
      verdict = (f"  fits, {_gib(hbm - c.peak).strip()} to spare" if c.peak <= hbm else
                 f"  DOES NOT FIT: {_gib(c.peak - hbm).strip()} over")
    lines.append(f"  {name:<26} temporaries {_gib(c.temp).strip()}, peak {_gib(c.peak).strip()}{verdict}")
  lines += ["", f"FLOPs     prefill piece {plan.prefill.flops:.4g}, decode step {plan.decode.flops:.4g} "
                "(matmuls, all devices)"]
  if chip:
    # A decode step reads every weight and the whole cache once: at best HBM-bandwidth bound.
    step = max((plan.weights + plan.cache) / chip.hbm_bandwidth, plan.decode.flops / plan.devices / chip.peak_flops)
    lines += [f"decode    step time >= {_seconds(step)} (weights + cache at {chip.hbm_bandwidth / 1e9:.0f} GB/s, or "
              f"FLOPs at {chip.peak_flops / 1e12:.0f} TFLOP/s): at most {plan.rows / step:.0f} tokens/s "
              f"for the {plan.rows} rows"]
  return "\n".join(lines)


def tpu_devices(topology: str):
  """The devices of a TPU `topology` (e.g. 'v5e:2x4'), compiled for ahead of time: needs libtpu
  importable and JAX_PLATFORMS=cpu (no TPU attached)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(topology, "tpu").devices


def libtpu_found(libtpu_dir: str) -> bool:
  return os.path.isfile(os.path.join(os.path.expanduser(libtpu_dir), "libtpu", "libtpu.so"))


def jax_libtpu_requirement() -> str:
  """The libtpu version jax pins (its `tpu` extra), e.g. 'libtpu==0.0.42.*'."""
  from importlib.metadata import requires  # pylint: disable=g-import-not-at-top
  for req in requires("jax") or []:
    if req.startswith("libtpu") and 'extra == "tpu"' in req:
      return req.split(";")[0].strip().replace(" ", "")
  return "libtpu"


def tpu_env(libtpu_dir: str, topology: str, chips: int) -> dict[str, str]:
  """The environment of the compiling subprocess: libtpu on the path (never in the venv, whose
  every jax process would then take /tmp/libtpu_lockfile), jax on CPU, TPU variables set."""
  env = dict(os.environ)
  path = os.path.expanduser(libtpu_dir)
  env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu",
             TPU_ACCELERATOR_TYPE=ACCELERATOR_TYPE[topology.split(":")[0]].format(chips=chips, cores=2 * chips),
             TPU_WORKER_HOSTNAMES="localhost", TPU_SKIP_MDS_QUERY="1")
  return env
