"""Train state, the jitted train/eval steps and the training loop, generic over the model.

A model plugs in through `loss_fn(params, batch, rng) -> (loss_sum, token_count)`: `params` is the
full nested dict (trainable and frozen merged), `batch` a dict of [B, ...] arrays, `rng` a key
(None in evaluation). The step divides by the token count of the whole global batch, so the loss is
a token mean over all micro-batches and devices.
"""

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vllm_jax import paths
from vllm_jax.train import flops, optim, sharding

log = logging.getLogger(__name__)

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array | None], tuple[jax.Array, jax.Array]]
IGNORE_INDEX = -100
METRICS = "metrics"  # train.workdir/metrics/: the per-step metrics (`MetricsFile`)

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (first match wins).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
)


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # [] int32, optimizer steps taken (skipped ones included)
  params: Any           # trainable parameters, fp32 masters
  frozen: Any           # frozen parameters, in the frozen dtype; never updated
  opt_state: Any        # optimizer state of the trainable parameters only
  rng: jax.Array        # [2] uint32 key data; step keys are folded from it
  nan_skips: jax.Array  # [] int32, steps whose update was dropped for a non-finite loss or gradient


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token loss: logits [B, T, V] at position t predict labels [B, T] at t + 1 (labels are
  aligned with the inputs, -100 where no loss is taken). -> (summed loss, number of targets), fp32."""
  return target_nll(logits[:, :-1], labels[:, 1:])


def target_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B, T, V] scoring targets [B, T] at the same positions (-100: none) -> (summed
  negative log-likelihood, number of targets), fp32."""
  valid = targets != IGNORE_INDEX
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.float32)


def next_token_loss(hidden: jax.Array, labels: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                    chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` from the final hidden states [B, T, E], `logits_fn` projecting [B, c, E] to
  [B, c, V]. With `chunk` (0 < chunk < T), the positions are projected `chunk` at a time and each
  slice's logits recomputed in the backward pass: the [B, T, V] float32 logits and their gradient
  never exist at once (8 GiB a row at 65,536 tokens and 32,000 words), for one more vocabulary
  projection's FLOPs."""
  length = hidden.shape[1]
  if not 0 < chunk < length:
    return cross_entropy(logits_fn(hidden), labels)
  # Position t predicts label t + 1; the last position and the padding up to whole slices have none.
  slices = -(-length // chunk)
  pad = slices * chunk - length
  targets = jnp.pad(labels[:, 1:], ((0, 0), (0, pad + 1)), constant_values=IGNORE_INDEX)
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  to_slices = lambda x: jnp.swapaxes(x.reshape(x.shape[0], slices, chunk, *x.shape[2:]), 0, 1)
  slice_nll = jax.checkpoint(lambda x, y: target_nll(logits_fn(x), y))

  def body(total, xs):
    return jax.tree.map(jnp.add, total, slice_nll(*xs)), None
  zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  total, _ = jax.lax.scan(body, zeros, (to_slices(hidden), to_slices(targets)))
  return total


def causal_lm_loss(model: nn.Module) -> LossFn:
  """The loss of a decoder called as `model.apply({'params': p}, input_ids, attention_mask=...)`,
  returning (logits, ...); batch: input_ids, attention_mask, labels, all [B, T]."""
  def loss_fn(params, batch, rng):
    del rng  # deterministic model
    logits, _ = model.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"])
    return cross_entropy(logits, batch["labels"])
  return loss_fn


def dropout_rngs(rng: jax.Array | None) -> dict[str, jax.Array]:
  """A loss's `rngs`: the step's key for dropout (the LLM's LoRA dropout) in training; none in
  evaluation, which passes no rng."""
  return {} if rng is None else {"dropout": rng}


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return next((f for kind, f in PEAK_FLOPS if device.device_kind.startswith(kind)), None)


def _micro_batches(batch: dict[str, jax.Array], accum: int, mesh: Mesh) -> dict[str, jax.Array]:
  """[A*M, ...] -> [A, M, ...] taking every A-th row, so each micro-batch keeps the batch sharding
  (a device's rows stay on it)."""
  spec = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(split, batch)


class Trainer:
  """Owns the optimizer, the state shardings and the compiled steps for one model and mesh.

  params_fn(rng) -> params (boxed or plain nested dict) builds the initial parameters inside jit
  (a random init; pretrained weights come to `init`). `param_shardings` is the matching tree of
  NamedShardings (`sharding.param_shardings(boxed_abstract, mesh)`).
  """

  def __init__(self, cfg, mesh: Mesh, loss_fn: LossFn, params_fn: Callable[[jax.Array], Any],
               param_shardings: Any):
    self.cfg, self.mesh, self.loss_fn, self.params_fn = cfg, mesh, loss_fn, params_fn
    key = jax.random.key(cfg.seed)
    self._init_key, self._step_key = jax.random.split(key)
    params = jax.eval_shape(lambda k: nn.meta.unbox(params_fn(k)), self._init_key)
    self.tx, self.schedule = optim.make_optimizer(cfg.optim, optim.partition(params, cfg.optim.trainable)[0],
                                                  cfg.train.steps)
    abstract = jax.eval_shape(self._build, self._init_key)
    self.shardings = self._state_shardings(abstract, param_shardings)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.shardings)
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self._init = jax.jit(self._build, out_shardings=self.shardings)
    self._train_step = jax.jit(self._step, in_shardings=(self.shardings, self.batch_sharding),
                               out_shardings=(self.shardings, replicated), donate_argnums=0)
    self._eval_step = jax.jit(self._eval, in_shardings=(self.shardings, self.batch_sharding),
                              out_shardings=replicated)
    self._compiled = None
    self.flops_per_step = None  # matmul FLOPs per device of one step (`flops.count`), set at compile

  # --- state ---

  def _build(self, init_key: jax.Array, base: Any = None) -> TrainState:
    params = nn.meta.unbox(self.params_fn(init_key))
    if base is not None:  # XLA drops the init of every leaf `base` replaces
      fresh, base = optim.flatten(params), optim.flatten(base)
      params = optim.unflatten({path: base.get(path, init) for path, init in fresh.items()})
    trainable, frozen = optim.partition(params, self.cfg.optim.trainable)
    frozen = optim.cast(frozen, self.cfg.optim.frozen_dtype)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=self.tx.init(trainable),
                      rng=jax.random.key_data(self._step_key), nan_skips=jnp.zeros((), jnp.int32))

  def _state_shardings(self, abstract: TrainState, param_shardings: Any) -> TrainState:
    replicated = sharding.replicated(self.mesh)
    trainable, frozen = optim.partition(param_shardings, self.cfg.optim.trainable)
    # Moments are sharded like their parameters; counters are replicated.
    opt_state = optax.tree_map_params(self.tx, lambda _, s: s, abstract.opt_state, trainable,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=trainable, frozen=frozen, opt_state=opt_state,
                      rng=replicated, nan_skips=replicated)

  def init(self, base: Any = None) -> TrainState:
    """The initial state, each tensor created directly in its shard: `params_fn`'s parameters, or
    `base`'s where it has them (pretrained weights, sharded like the model's parameters; what it
    lacks, e.g. fresh LoRA adapters, params_fn makes; what the state does not keep is dropped).
    `base` is consumed: every array of it the state does not hold is deleted, so that a loaded
    model is not kept beside its copy in the state. (Not donated: XLA cannot alias a buffer whose
    sharding differs from the state's.)"""
    with sharding.mesh_context(self.mesh):
      state = self._init(self._init_key, base)
    held = {id(x) for x in jax.tree.leaves(state)}  # an output may be the input array itself
    for x in jax.tree.leaves(base):
      if isinstance(x, jax.Array) and id(x) not in held and not x.is_deleted():
        x.delete()
    return state

  # --- steps ---

  def _grads(self, state: TrainState, batch, rng):
    def f(trainable):
      loss_sum, count = self.loss_fn(optim.merge(trainable, state.frozen), batch, rng)
      return loss_sum, (loss_sum, count)
    return jax.grad(f, has_aux=True)(state.params)

  def _step(self, state: TrainState, batch: dict[str, jax.Array]):
    accum = self.cfg.optim.grad_accum
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
      grads, (loss_sum, count) = self._grads(state, batch, rng)
    else:
      def body(carry, xs):
        micro, i = xs
        g, (l, c) = self._grads(state, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, (l, c))), None
      zeros = (jax.tree.map(jnp.zeros_like, state.params), (jnp.zeros(()), jnp.zeros(())))
      (grads, (loss_sum, count)), _ = jax.lax.scan(
          body, zeros, (_micro_batches(batch, accum, self.mesh), jnp.arange(accum)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    lr = self.schedule(state.step)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
    # A non-finite step leaves parameters and moments untouched.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    state = state.replace(step=state.step + 1, params=keep(params, state.params),
                          opt_state=keep(opt_state, state.opt_state),
                          nan_skips=state.nan_skips + (~finite).astype(jnp.int32))
    return state, dict(loss=loss, grad_norm=grad_norm, lr=lr, tokens=count, finite=finite)

  def _eval(self, state: TrainState, batch: dict[str, jax.Array]):
    return self.loss_fn(optim.merge(state.params, state.frozen), batch, None)

  def train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch ([B, ...] arrays sharded like `batch_sharding`).
    `state` is donated. Compiled once, on the first call; later shapes must match."""
    with sharding.mesh_context(self.mesh):
      if self._compiled is None:
        traced = self._train_step.trace(state, batch)  # traced once: compiled and counted
        self._compiled = traced.lower().compile()
        self.flops_per_step = flops.count_jaxpr(traced.jaxpr).flops / self.mesh.size
      return self._compiled(state, batch)

  @property
  def compiled_step(self):
    """The compiled train step (`memory_analysis()`, `cost_analysis()`), once a step has run."""
    return self._compiled

  def eval_loss(self, state: TrainState, batches: Iterable[dict[str, jax.Array]]) -> float:
    """Token-mean loss over global batches."""
    total, count = 0.0, 0.0
    with sharding.mesh_context(self.mesh):
      for batch in batches:
        loss_sum, n = self._eval_step(state, batch)
        total, count = total + float(loss_sum), count + float(n)
    return total / max(count, 1.0)

  def step_flops(self, batch) -> float:
    """Matmul FLOPs of one train step on `batch` (arrays or ShapeDtypeStructs), all devices
    together, from the step's jaxpr (`flops.count`): cost_analysis() counts a scanned layer
    stack's body once."""
    with sharding.mesh_context(self.mesh):
      return flops.count(self._step, self.abstract_state, batch)

  def lower(self, batch_spec: dict[str, jax.ShapeDtypeStruct]):
    """The jitted train step lowered (not run) on `self.abstract_state` and a global batch of
    `batch_spec`'s shapes and dtypes, sharded like `batch_sharding`: `.compile()` it for
    `memory_analysis()` / `cost_analysis()` of the real step on the mesh's devices."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in batch_spec.items()}
    with sharding.mesh_context(self.mesh):
      return self._train_step.lower(self.abstract_state, batch)


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  history: list[dict[str, float]]  # one entry per step
  preempted: bool = False
  skipped_examples: int = 0


class MetricsFile:
  """Per-step metrics as JSON lines ({"step", "loss", ...}) in the folder `metrics/`, in parts named
  by their first step (`00000001.jsonl`; `read_metrics` joins them). Kept in step with the
  checkpoints: a run starting at `step` first drops the lines of later steps (written before a
  crash, by steps whose state no checkpoint kept, so they are about to be redone), and each write
  is durable when it returns. An object store cannot append, so a part is rewritten whole at each
  write there: a new part starts every `PART_LINES` lines, bounding what one write costs."""

  PART_LINES = 1000

  def __init__(self, folder: str, step: int):
    self.folder = folder
    for name in _metric_parts(folder):
      path = paths.join(folder, name)
      if int(name.split(".")[0]) > step:
        paths.remove(path)
        continue
      lines = paths.read_text(path).splitlines(keepends=True)
      # A line without its newline was cut short by the crash.
      kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
      if kept != lines:
        paths.write_text(path, "".join(kept))
    self._part, self._lines = None, 0

  def write(self, first_step: int, metrics: list[dict[str, float]]) -> None:
    if self._part is None or self._lines >= self.PART_LINES:
      self.close()
      self._part, self._lines = paths.Appender(paths.join(self.folder, f"{first_step:08d}.jsonl")), 0
    self._part.write("".join(json.dumps(dict(step=first_step + i, **m)) + "\n" for i, m in enumerate(metrics)))
    self._lines += len(metrics)

  def close(self) -> None:
    if self._part is not None:
      self._part.close()


def _metric_parts(folder: str) -> list[str]:
  return [n for n in paths.listdir(folder) if n.endswith(".jsonl")] if paths.is_dir(folder) else []


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The per-step metrics a run in `workdir` wrote (`MetricsFile`), in step order."""
  folder = paths.join(workdir, METRICS)
  return [json.loads(line) for name in _metric_parts(folder)
          for line in paths.read_text(paths.join(folder, name)).splitlines()]


def train_loop(trainer: Trainer, state: TrainState, batches: Iterator[dict[str, np.ndarray]], *,
               steps: int, checkpointer=None, data_iterator=None,
               eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
               preemption=None) -> LoopResult:
  """Train until `state.step == steps`.

  batches: this process's share of each global batch, numpy [B / process_count, ...]; an optional
  `skipped` [b] entry counts the unreadable examples the data pipeline stepped over. Every
  `train.log_every` steps a line is logged and TensorBoard scalars are written (process 0, when
  `train.workdir` is set); every `train.checkpoint_every` steps, on the last step and on
  preemption, `checkpointer.save` stores the state and `data_iterator`'s position. With
  `train.workdir`, process 0 also writes each step's metrics to `train.workdir`/metrics/ (a
  `MetricsFile`, so a crash keeps them up to the last log line or checkpoint).
  """
  cfg = trainer.cfg.train
  step = int(state.step)
  writer = metrics_file = None
  if cfg.workdir and jax.process_index() == 0:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(paths.join(cfg.workdir, "tensorboard"))
    metrics_file = MetricsFile(paths.join(cfg.workdir, METRICS), step)
  peak = peak_flops(jax.devices()[0], cfg.peak_tflops)
  history, pending, skipped = [], [], 0
  tick, tick_step = time.perf_counter(), step

  def fetch():  # the pending steps' metrics to the host, the history and the metrics file
    fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
    pending.clear()
    history.extend(fetched)
    if metrics_file and fetched:
      metrics_file.write(step - len(fetched) + 1, fetched)

  try:
    # A SIGTERM before the first step (during the model load): stop before compiling it. The state is
    # the checkpoint's or the initial one, which a rerun rebuilds as fast as it would restore it. (This
    # call also gives a SIGTERM during the first step's compile a sync point: after that step.)
    preempted = preemption is not None and step < steps and preemption.reached()
    if preempted:
      log.info("step %d | preempted before the first step: nothing new to checkpoint, stopping", step)
    while step < steps and not preempted:
      local = dict(next(batches))
      skipped += int(np.sum(local.pop("skipped", 0)))
      if 0 <= trainer.cfg.data.max_skipped < skipped:
        raise RuntimeError(f"{skipped} unreadable examples skipped, over data.max_skipped="
                           f"{trainer.cfg.data.max_skipped}")
      state, metrics = trainer.train_step(state, sharding.make_global_batch(local, trainer.mesh))
      step += 1
      pending.append(metrics)
      last = step == steps
      if step % cfg.log_every == 0 or last:
        fetch()
        elapsed = time.perf_counter() - tick
        step_time = elapsed / (step - tick_step)
        entry = dict(history[-1], step_time=step_time,
                     tokens_per_s=sum(m["tokens"] for m in history[-(step - tick_step):]) / elapsed,
                     skipped=skipped, nan_skips=int(state.nan_skips))
        if peak and trainer.flops_per_step:
          entry["mfu"] = trainer.flops_per_step / step_time / peak
        _log(step, entry, writer)
        tick, tick_step = time.perf_counter(), step
        if entry["nan_skips"] > cfg.max_nan_skips:
          raise FloatingPointError(f"{entry['nan_skips']} steps had a non-finite loss or gradient "
                                   f"(train.max_nan_skips={cfg.max_nan_skips})")
      if eval_batches is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
        eval_loss = trainer.eval_loss(
            state, (sharding.make_global_batch(b, trainer.mesh) for b in eval_batches()))
        log.info("step %d | eval_loss %.4f", step, eval_loss)
        if writer:
          writer.add_scalar("eval/loss", eval_loss, step)
      preempted = preemption is not None and preemption.reached()
      if checkpointer is not None and (preempted or last or step % cfg.checkpoint_every == 0):
        fetch()  # every step the checkpoint covers is on disk before it
        checkpointer.save(step, state, data_iterator, force=preempted or last)
      if preempted:
        log.info("step %d | preempted: checkpoint written, stopping", step)
        break
  finally:
    _close_all(checkpointer and checkpointer.wait, writer and writer.close, metrics_file and metrics_file.close)
  return LoopResult(state=state, history=history, preempted=preempted, skipped_examples=skipped)


def _close_all(*closers) -> None:
  """Call each closer given (None: none), every one even when one before it fails (a full disk fails
  the checkpoint's wait and the event file's flush alike: an unclosed writer would fail again at
  exit, with a traceback); the first failure is raised."""
  failure = None
  for close in closers:
    try:
      if close:
        close()
    except Exception as e:  # pylint: disable=broad-except
      failure = failure or e
  if failure is not None:
    raise failure


def _log(step: int, m: dict[str, float], writer) -> None:
  line = (f"step {step} | loss {m['loss']:.4f} | lr {m['lr']:.1e} | grad_norm {m['grad_norm']:.2f} | "
          f"{m['tokens_per_s']:.0f} tok/s | {m['step_time']:.2f} s/step")
  if "mfu" in m:
    line += f" | mfu {100 * m['mfu']:.1f}%"
  if m["skipped"] or m["nan_skips"]:
    line += f" | skipped {m['skipped']} | nan_skips {m['nan_skips']}"
  log.info(line)
  if writer:
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "mfu", "skipped", "nan_skips"):
      if k in m:
        writer.add_scalar(f"train/{k}", m[k], step)
    writer.flush()
