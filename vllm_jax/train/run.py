"""The training run behind `vllm-jax train`, for any system: the model from a converted folder
(`init_from`) or a random init, the system's examples, the sharded train loop, checkpoints and
metrics. The system (`vllm_jax.systems`) supplies the model, its loss and its examples.

LoRA: a recipe's `model.llama.lora` applies on top of `init_from`'s config (whose config otherwise
replaces `model`): the run adds fresh adapters (A random, B zero) to the base model it loads. So
does `compute_dtype` (bfloat16 in the full-size recipes): every module computes in it, while the
parameters keep theirs (fp32 masters for the trained ones, `optim.frozen_dtype` for the frozen).

`train.workdir`/run.json records what a run started from (the system, `init_from`, the config),
so that `trained_model` (and `vllm-jax export`) can rebuild the model from checkpoints that hold
only the trained parameters."""

import dataclasses
import json
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vllm_jax import paths
from vllm_jax.data.tokenizer import load_instruction_tokenizer, load_tokenizer
from vllm_jax.data import datasets
from vllm_jax.models.llama import extend_context
from vllm_jax.nn.lora import LoraConfig
from vllm_jax.train import checkpoint, config_check, optim, sharding, trainer

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
ADAPTERS = ("/lora_a", "/lora_b")


def make_trainer(cfg, mesh, system, config) -> trainer.Trainer:
  """A Trainer for `system`'s model of `config`: `init()` starts it from a random init,
  `init(params)` from loaded ones (`load_model`'s). Frozen parameters the loss never
  reads (`unread_frozen`: the encoders, in a run from a feature cache) stay out of the train
  state, unless `train.save_frozen` asks checkpoints to hold a whole model."""
  model = system.model(config)
  loss_fn = system.loss_fn(config)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in system.init_inputs(config).items()}
  init = lambda rng: nn.meta.unbox(model.init(rng, **inputs)["params"])
  boxed = system.abstract_params(config)
  shardings = sharding.param_shardings(boxed, mesh)
  unread = set() if cfg.train.get("save_frozen") else unread_frozen(cfg, system, config, loss_fn,
                                                                       nn.meta.unbox(boxed))
  if unread:
    log.info("%d frozen parameters the loss never reads are left out of the train state (%s, ...)",
             len(unread), min(unread))
    kept = lambda tree: optim.unflatten({k: v for k, v in optim.flatten(tree).items() if k not in unread})
    init, shardings = (lambda rng, full=init: kept(full(rng))), kept(shardings)
  return trainer.Trainer(cfg, mesh, loss_fn, init, shardings)


def unread_frozen(cfg, system, config, loss_fn, params) -> set[str]:
  """The frozen parameters ('/'-joined paths outside `optim.trainable`) that no operation of the
  loss's jaxpr reads, for abstract `params` and a batch of `system.batch_spec`: e.g. the ViT of a
  run whose batches hold the features it made."""
  frozen = set(optim.flatten(optim.partition(params, cfg.optim.trainable)[1]))
  paths = ["/".join(str(key.key) for key in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  jaxpr = jax.make_jaxpr(loss_fn)(params, system.batch_spec(cfg, config), jax.random.key(0)).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  return {path for path, var in zip(paths, jaxpr.invars) if path in frozen and id(var) not in read}


def check_loaded(params, abstract) -> None:
  """Loaded parameters must be those of the model (`abstract`, its parameters' tree), but for the
  LoRA adapters a recipe adds to a base model (`Trainer.init` makes them fresh: A random, B zero);
  any other difference raises."""
  have, want = optim.flatten(params), optim.flatten(abstract)
  wrong = sorted(k for k in set(want) ^ set(have) if not (k in want and k.endswith(ADAPTERS)))
  if wrong:
    raise ValueError(f"the loaded parameters do not fit the model: {', '.join(wrong[:5])}"
                     f"{' ...' if len(wrong) > 5 else ''}")


def recipe_lora(cfg) -> LoraConfig | None:
  """The config's `model.llama.lora` (None when unset, or without a `model.llama` section)."""
  lora = cfg.get("model", {}).get("llama", {}).get("lora")
  return None if lora is None else LoraConfig.from_dict(lora.to_dict())


def with_recipe_lora(cfg, config):
  """`config` (an `init_from` folder's) with the recipe's LoRA adapters, when it sets any. A
  folder with other adapters is refused: they would be dropped (only the dropout may differ)."""
  lora = recipe_lora(cfg)
  if lora is None:
    return config
  held = config.llama.lora
  if held is not None and held.replace(dropout=lora.dropout) != lora:
    raise ValueError(f"{cfg.init_from} already has LoRA adapters ({held}), model.llama.lora asks for {lora}: "
                     "start from a folder with them merged (`vllm-jax export` without --keep-lora, `vllm-jax "
                     "convert peft --merge`) or set model.llama.lora to theirs")
  return config.replace(llama=config.llama.replace(lora=lora))


def with_recipe_context(cfg, config):
  """`config` with the LLM's context extended to the recipe's `context_length`, when it sets one
  (`llama.extend_context`: linear RoPE scaling past `rope_context` positions, as LLaMA-VID's long-
  video stage extends a stage-2 model); the trained model keeps the extended config."""
  if not cfg.get("context_length"):
    return config
  return config.replace(llama=extend_context(config.llama, cfg.context_length, cfg.get("rope_context") or 0))


def with_compute_dtype(config, dtype: str):
  """`config` with every module's `dtype` (its computation) set to `dtype`, `param_dtype` kept.
  Norm statistics, attention softmax and the loss stay in float32 whatever the dtype."""
  changes = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "dtype":
      changes["dtype"] = dtype
    elif dataclasses.is_dataclass(value):
      changes[field.name] = with_compute_dtype(value, dtype)
  return dataclasses.replace(config, **changes)


def training_config(cfg, system, config):
  """The model config a run of `cfg` builds from `config` (`init_from`'s or the recipe's): the
  stage's model (`System.stage_config`: no branch the stage neither feeds nor trains), with the
  recipe's `context_length` (`with_recipe_context`), LoRA adapters, `compute_dtype`,
  `llm_remat_policy` (what the LLM's layers keep for the backward pass, a jax.checkpoint_policies
  name), `attention_impl` (the LLM's attention kernel: "auto" takes the platform's fused one, see
  `vllm_jax.nn.attention`) and `loss_chunk` (positions the loss projects to the vocabulary at
  once, `trainer.next_token_loss`)."""
  config = with_recipe_lora(cfg, with_recipe_context(cfg, system.stage_config(cfg, config)))
  llama = {"remat_policy": cfg.get("llm_remat_policy"), "attention_impl": cfg.get("attention_impl"),
           "loss_chunk": cfg.get("loss_chunk")}
  llama = {key: value for key, value in llama.items() if value}
  if llama:
    config = config.replace(llama=config.llama.replace(**llama))
  return with_compute_dtype(config, cfg.compute_dtype) if cfg.get("compute_dtype") else config


def model_config(cfg, system) -> tuple[Any, str]:
  """-> (the model config a run of `cfg` builds, its tokenizer folder), reading no parameters:
  `init_from`'s config (see `training_config`), or `model` for a random init with `data.tokenizer`,
  whose placeholder ids become the model's."""
  if cfg.init_from:
    return training_config(cfg, system, system.read_config(cfg.init_from)), paths.join(cfg.init_from, "tokenizer")
  if not cfg.data.tokenizer:
    raise ValueError("set init_from (a converted model folder) or data.tokenizer (for a random init)")
  return training_config(cfg, system, system.prepare_init(cfg, load_tokenizer(cfg.data.tokenizer))), cfg.data.tokenizer


def load_params(cfg, mesh, system, config) -> Any:
  """`init_from`'s parameters of the branches `config` (`model_config`'s) has, checked by
  `check_loaded` (the recipe's LoRA adapters are made by `Trainer.init`); None for a random init."""
  if not cfg.get("init_from"):
    return None
  loaded = system.load(cfg.init_from, mesh=mesh)
  branches = nn.meta.unbox(system.abstract_params(config))
  params = {name: tree for name, tree in loaded.params.items() if name in branches}
  check_loaded(params, branches)
  return params


def load_model(cfg, mesh, system) -> tuple[Any, Any, str]:
  """-> (model config, params or None, tokenizer folder): `model_config` and `load_params`."""
  config, tokenizer_dir = model_config(cfg, system)
  return config, load_params(cfg, mesh, system, config), tokenizer_dir


def write_run_file(cfg) -> None:
  """`train.workdir`/run.json: the system, `init_from` (absolute) and the whole config of this
  start (process 0 writes it; a resumed run rewrites it)."""
  if jax.process_index() != 0:
    return
  init_from = cfg.get("init_from", "")
  record = dict(system=cfg.get("system", ""), init_from=paths.resolve(init_from) if init_from else "",
                config=json.loads(cfg.to_json_best_effort()))
  paths.write_json(paths.join(cfg.train.workdir, RUN_FILE), record)


def train(cfg, system, progress: bool = False) -> trainer.LoopResult:
  """Train to `train.steps`, resuming from the latest checkpoint in `train.workdir`; per-step
  metrics go to `train.workdir`/metrics/ as the run goes (`trainer.MetricsFile`). `progress`:
  a progress bar of the steps. SIGTERM is watched from the start: one during the model load stops
  the run before the first step is compiled."""
  preemption = checkpoint.Preemption()
  ckpt = None
  try:
    config_check.check_paths(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)
    config, tokenizer_dir = model_config(cfg, system)
    examples = system.dataset(cfg, config, tokenizer_dir)
    datasets.check_readable(examples)  # bad data files and unreadable media end the run before any model loads
    t = make_trainer(cfg, mesh, system, config)
    state = t.init(load_params(cfg, mesh, system, config))  # the state takes the loaded arrays' place
    it = iter(datasets.batches(examples, cfg.train.batch_size, worker_count=cfg.data.worker_count))
    if cfg.train.workdir:
      write_run_file(cfg)
      ckpt = checkpoint.TrainCheckpointer(paths.join(cfg.train.workdir, "checkpoints"),
                                          max_to_keep=cfg.train.keep_checkpoints,
                                          async_save=cfg.train.async_checkpoints, save_frozen=cfg.train.save_frozen)
      if ckpt.latest_step() is not None:
        state = ckpt.restore(state, it)
        log.info("resumed from step %d", int(state.step))
    batches = it
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      batches = iter(tqdm(it, desc="training", unit="step", total=cfg.train.steps, initial=int(state.step)))
    return trainer.train_loop(t, state, batches, steps=cfg.train.steps, checkpointer=ckpt, data_iterator=it,
                              preemption=preemption)
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()


def read_run_file(workdir: str) -> dict:
  """`workdir`/run.json, as `write_run_file` wrote it."""
  path = paths.join(workdir, RUN_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f"no {RUN_FILE} in {workdir}: not the train.workdir of a run")
  return paths.read_json(path)


def trained_model(workdir: str, step: int | None = None):
  """The model a run trained -> (its system holding it, the checkpoint step): the config with
  the run's LoRA adapters (unmerged), the trained parameters of the checkpoint at `step` (default:
  the latest) over the base: `init_from`'s parameters in their own dtype, or, after a random init,
  the checkpoint's frozen ones (`train.save_frozen`). On the default device; the optimizer state
  is not read."""
  from vllm_jax import systems  # pylint: disable=g-import-not-at-top  (systems build on the trainer)
  record = read_run_file(workdir)
  cfg = ml_collections.ConfigDict(record["config"])
  system = systems.get(record["system"])
  if record["init_from"]:
    model = system.load(record["init_from"])
    config = with_recipe_lora(cfg, with_recipe_context(cfg, model.config))
  elif cfg.train.save_frozen:
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    config = system.stage_config(cfg, system.prepare_init(cfg, tokenizer))
    config = with_recipe_lora(cfg, with_recipe_context(cfg, config))
    model = system(config, None, tokenizer)
    if cfg.data.get("instruction_tokenizer"):  # LLaMA-VID's Q-Former reads with a tokenizer of its own
      model.instruction_tokenizer = load_instruction_tokenizer(cfg.data.instruction_tokenizer)
  else:
    raise ValueError(f"the run in {workdir} started from a random init and its checkpoints hold only the "
                     "trained parameters (train.save_frozen false): the frozen ones are lost")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          nn.meta.unbox(system.abstract_params(config)))
  trained, frozen = optim.partition(abstract, cfg.optim.trainable)
  ckpt = checkpoint.TrainCheckpointer(paths.join(workdir, "checkpoints"))
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {workdir}/checkpoints (steps: {', '.join(map(str, steps))})")
    wanted = dict(params=trained) if record["init_from"] else dict(params=trained, frozen=frozen)
    restored = ckpt.restore_partial(wanted, step)
  finally:
    ckpt.close()
  params = optim.merge(restored["params"], restored.get("frozen", model.params))
  missing = sorted(set(optim.flatten(abstract)) - set(optim.flatten(params)))
  if missing:
    raise ValueError(f"neither the checkpoint nor {record['init_from']} holds {', '.join(missing[:5])}"
                     f"{' ...' if len(missing) > 5 else ''} (untrained LoRA adapters? see optim.trainable)")
  model.config, model.params = config, params
  return model, step
