"""LoRA training, on a tiny Video-LLaVA with real png/mp4 media: a `tiny_stage2_lora` run through
`run.train` from a saved model folder (adapters added by the recipe) moves only the adapters and
the projector, keeps optimizer state and checkpoints for them alone and records its base in
run.json; `vllm-jax export` turns it into a merged model folder, a PEFT adapter and an HF LLaMA
that compute what the trained model does, and `convert peft` imports that adapter back. A (2, 2, 2)
mesh gives the LoRA steps (dropout included) of one device. The LoRA recipes of the three systems
train exactly the adapters and the stage's connectors."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
import transformers as T

from test_video_llava_system import write_llava_data
from vllm_jax import cli, pretrained, systems
from vllm_jax.cli.flags import load_config
from vllm_jax.configs import video_llava as video_llava_recipes
from vllm_jax.converters import peft
from vllm_jax.data import datasets
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.llama import Llama
from vllm_jax.nn.lora import LoraConfig
from vllm_jax.systems.video_llava import VideoLlavaSystem
from vllm_jax.train import optim, sharding
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["USER: What is moving in the video? ASSISTANT: A red circle moves left.",
          "A chat between a curious human and an artificial intelligence assistant."] * 20
ADAPTER = ("/lora_a", "/lora_b")
STEPS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A random tiny Video-LLaVA folder (no adapters) with a trained tokenizer; two pngs and two
  mp4s in a LLaVA-style JSON (`write_llava_data`)."""
  root = tmp_path_factory.mktemp("lora_train")
  tokenizer = train_tokenizer(CORPUS, str(root / "tokenizer"), vocab_size=300)
  image_id, video_id = VideoLlavaSystem.add_media_tokens(tokenizer)
  config = video_llava_recipes.model_config("tiny").replace(image_token_id=image_id, video_token_id=video_id)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in VideoLlavaSystem.init_inputs(config).items()}
  params = jax.jit(VideoLlavaSystem.model(config).init)(jax.random.key(1), **inputs)["params"]
  VideoLlavaSystem(config, jax.tree.map(np.asarray, nn.meta.unbox(params)), tokenizer).save(str(root / "model"))

  write_llava_data(root)
  return root


def recipe(root, *overrides):
  return load_config(os.path.join(ROOT, "configs/video_llava.py:tiny_stage2_lora"), [
      f"--config.init_from={root / 'model'}", f"--config.data.instruct_json={root / 'train.json'}",
      f"--config.data.instruct_dir={root / 'media'}", "--config.train.batch_size=4",
      "--config.optim.warmup_steps=0", "--config.optim.lr=1e-3", "--config.data.cache_examples=true", *overrides])


def two_batches(cfg, config, model_dir):
  """An image batch and a video batch (batches hold one media kind)."""
  groups = VideoLlavaSystem.dataset(cfg, config, os.path.join(model_dir, "tokenizer"))
  it = iter(datasets.batches(groups, cfg.train.batch_size, process_index=0, process_count=1))
  return [{k: v for k, v in next(it).items() if k != "skipped"} for _ in range(2)]


@functools.lru_cache
def forward(config):
  return jax.jit(VideoLlavaSystem.model(config).apply)  # compiled once per config


def logits(config, params, batch):
  return np.asarray(forward(config)({"params": params}, batch["input_ids"], images=batch["pixels"][:, 0],
                                    videos=batch["pixels"], attention_mask=batch["attention_mask"])[0])


def test_lora_run_trains_adapters_and_projector_and_exports(files, tmp_path, capsys):
  workdir, model_dir = tmp_path / "run", str(files / "model")
  cfg = recipe(files, f"--config.train.workdir={workdir}", f"--config.train.steps={STEPS}",
               "--config.train.batch_size=8", "--config.train.log_every=1", "--config.optim.frozen_dtype=float32")
  result = run_lib.train(cfg, VideoLlavaSystem)
  assert [int(m["finite"]) for m in result.history] == [1] * STEPS
  base = systems.load(model_dir)
  config = base.config.replace(llama=base.config.llama.replace(lora=LoraConfig(rank=128, alpha=256.0, dropout=0.05)))
  paths = optim.flatten(nn.meta.unbox(VideoLlavaSystem.abstract_params(config)))
  adapters = {k for k in paths if k.endswith(ADAPTER)}
  assert len(adapters) == 2 * 7

  # What trained: the adapters and the projector, each moved from its start (A random, B zero);
  # everything else is the base, bit for bit (kept in float32 here).
  initial = optim.flatten(jax.device_get(run_lib.make_trainer(
      cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), VideoLlavaSystem, config).init(
          jax.tree.map(jnp.copy, base.params)).params))
  trained = optim.flatten(jax.device_get(result.state.params))
  frozen = optim.flatten(jax.device_get(result.state.frozen))
  assert set(trained) == adapters | {k for k in paths if k.startswith("projector/")} == set(initial)
  assert not np.any(initial["llm/layers/attn/q/lora_b"]) and np.any(initial["llm/layers/attn/q/lora_a"])
  for k, v in trained.items():
    assert not np.array_equal(v, initial[k]), k
  base_flat = optim.flatten(jax.device_get(base.params))
  assert set(frozen) == set(base_flat) - set(trained)
  for k, v in frozen.items():
    assert np.array_equal(v, base_flat[k]), k
  # Adam's moments exist for the trained parameters only.
  adam = [s for s in jax.tree.leaves(result.state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and set(optim.flatten(adam[0].mu)) == set(optim.flatten(adam[0].nu)) == set(trained)

  # The checkpoint holds what trained (and its optimizer state), not the frozen model.
  saved = ocp.PyTreeCheckpointer().metadata(str(workdir / "checkpoints" / str(STEPS) / "state")).item_metadata
  assert set(saved) == {"step", "params", "opt_state", "rng", "nan_skips"}
  assert set(optim.flatten(dict(saved["params"]))) == set(trained)
  size = lambda tree: sum(int(np.prod(m.shape)) for m in jax.tree.leaves(tree))
  assert size(saved["opt_state"]) == 2 * size(result.state.params) + 1  # mu, nu, count
  run_file = json.loads((workdir / "run.json").read_text())
  assert run_file["system"] == "video_llava" and run_file["init_from"] == os.path.abspath(model_dir)
  assert run_file["config"]["model"]["llama"]["lora"]["rank"] == 128

  # export: a merged model folder, the PEFT adapter and the merged LLM as an HF folder.
  out, adapter_dir, hf_dir = str(tmp_path / "model"), str(tmp_path / "peft"), str(tmp_path / "hf")
  assert cli.main(["export", "--workdir", str(workdir), "--out", out, "--peft", adapter_dir,
                   "--hf-llama", hf_dir]) == 0
  captured = capsys.readouterr()
  assert f"restored step {STEPS} of {workdir} (video_llava, LoRA rank 128" in captured.err
  assert "(LoRA merged)" in captured.out and "wrote PEFT adapter" in captured.out
  full = optim.merge(result.state.params, result.state.frozen)
  exported = systems.load(out)
  assert exported.config.llama.lora is None and exported.config == base.config
  assert not any(k.endswith(ADAPTER) for k in optim.flatten(exported.params))
  for batch in two_batches(cfg, config, model_dir):
    want, got = logits(config, full, batch), logits(exported.config, exported.params, batch)
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    assert np.abs(want - logits(base.config, base.params, batch))[mask].max() > 1e-2  # training did something

  llama, read = peft.load_adapter(adapter_dir, base.config.llama)
  assert llama.lora == config.llama.lora
  read = {"llm/" + k: v for k, v in optim.flatten(read).items()}
  assert set(read) == adapters
  for k, v in read.items():
    np.testing.assert_array_equal(v, trained[k], err_msg=k)

  hf = T.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  ids = np.random.default_rng(0).integers(0, config.llama.vocab_size, (2, 12))
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(Llama(config.llama).apply({"params": full["llm"]}, jnp.asarray(ids))[0])
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
  assert T.AutoTokenizer.from_pretrained(hf_dir)("A red circle").input_ids == base.tokenizer("A red circle").input_ids

  # --keep-lora keeps the trained adapters; `convert peft` puts the adapter into the base folder,
  # kept or merged (the projector stays the base's: a PEFT adapter holds only the LLM's).
  keep, imported, merged = (str(tmp_path / name) for name in ("keep", "imported", "merged"))
  assert cli.main(["export", "--workdir", str(workdir), "--out", keep, "--keep-lora"]) == 0
  assert cli.main(["convert", "peft", "--model", model_dir, "--adapter", adapter_dir, "--out", imported]) == 0
  assert cli.main(["convert", "peft", "--model", model_dir, "--adapter", adapter_dir, "--out", merged,
                   "--merge"]) == 0
  kept, imported, merged = systems.load(keep), systems.load(imported), systems.load(merged)
  assert kept.config == imported.config == config and merged.config == base.config
  for k, v in optim.flatten(kept.params).items():
    np.testing.assert_array_equal(v, optim.flatten(full)[k], err_msg=k)
  for k, v in optim.flatten(imported.params).items():
    np.testing.assert_array_equal(v, trained[k] if k.endswith(ADAPTER) else base_flat[k], err_msg=k)
  for k, v in optim.flatten(merged.params["llm"]).items():
    np.testing.assert_allclose(v, optim.flatten(exported.params["llm"])[k], rtol=1e-6, atol=1e-7, err_msg=k)

  # Clear errors: a missing step, a folder that has adapters already, a random init without its
  # frozen parameters.
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(workdir), "--step", "7", "--out", str(tmp_path / "x")]) == 2
  assert f"no checkpoint at step 7 in {workdir}/checkpoints (steps: " in capsys.readouterr().err
  assert cli.main(["convert", "peft", "--model", keep, "--adapter", adapter_dir, "--out", str(tmp_path / "x")]) == 2
  assert "already has LoRA adapters" in capsys.readouterr().err
  random_init = recipe(files, "--config.init_from=", f"--config.train.workdir={tmp_path / 'random'}")
  run_lib.write_run_file(random_init)
  assert cli.main(["export", "--workdir", str(tmp_path / "random"), "--out", str(tmp_path / "x")]) == 2
  assert "started from a random init" in capsys.readouterr().err


def test_sharded_lora_steps_match_single_device(files):
  """An image and a video batch through two LoRA steps (dropout on): a (2, 2, 2) mesh gives the
  losses, the adapters and the projector of one device."""
  cfg = recipe(files)
  results = {}
  for name, mesh in (("single", sharding.make_mesh((1, 1, 1), jax.devices()[:1])),
                     ("sharded", sharding.make_mesh((2, 2, 2)))):
    config, params, _ = run_lib.load_model(cfg, mesh, VideoLlavaSystem)
    t = run_lib.make_trainer(cfg, mesh, VideoLlavaSystem, config)
    state, losses = t.init(params), []
    for batch in two_batches(cfg, config, str(files / "model")):
      state, metrics = t.train_step(state, sharding.make_global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results[name] = np.array(losses), optim.flatten(jax.device_get(state.params)), state, batch
  (loss1, p1, state, batch), (loss8, p8, _, _) = results["single"], results["sharded"]
  assert np.isfinite(loss1).all() and np.abs(loss8 - loss1).max() <= 1e-5 * np.abs(loss1).max()
  assert sum(k.endswith(ADAPTER) for k in p1) == 14 and any(k.startswith("projector/") for k in p1)
  # Adam divides each gradient by its own size: where one is near 0, the rounding of another
  # reduction order moves its update by a part of the lr (1e-3). So all but one element in a
  # thousand agree to 1e-5, and none is a tenth of the lr apart.
  for k in p1:
    diff = np.abs(p8[k] - p1[k])
    apart = diff > 1e-5 + 1e-4 * np.abs(p1[k])
    assert diff.max() <= 1e-4 and apart.mean() <= 1e-3, (k, float(diff.max()), int(apart.sum()))

  # The adapters' dropout acts in training steps (which pass a key), not in evaluation (None).
  loss_fn = jax.jit(VideoLlavaSystem.loss_fn(config))
  params = optim.merge(state.params, state.frozen)
  dropped, kept = (float(loss_fn(params, batch, rng)[0]) for rng in (jax.random.key(0), None))
  assert dropped != kept and abs(dropped - kept) < 0.1 * kept


@pytest.mark.parametrize("name, connectors", [
    ("video_llama", r"^vision/(video_qformer|frame_position_embedding|llama_proj)/"),
    ("video_llava", r"^projector/"),
    ("llama_vid", r"^(projector|att_projector|key_projector|val_projector|qformer|att_norm)/")])
def test_lora_recipes_train_adapters_and_connectors(name, connectors):
  path = os.path.join(ROOT, f"configs/{name}.py")
  lora = LoraConfig(rank=128, alpha=256.0, dropout=0.05)
  for arg in ("stage2_lora", "tiny_stage2_lora"):
    cfg = load_config(f"{path}:{arg}", [])
    system = systems.get(cfg.system)
    config = system.config_class.from_dict(cfg.model.to_dict())
    assert config.llama.lora == lora and run_lib.recipe_lora(cfg) == lora
    assert arg.startswith("tiny") or cfg.optim.lr == 2e-4  # LLaVA's LoRA rate (tiny ones have their own)
    # The 7B recipes shard it all (FSDP): a replicated bf16 7B LLM alone fills a 16 GiB chip.
    fsdp = not arg.startswith("tiny")
    assert (cfg.mesh.data, cfg.mesh.fsdp) == ((1, -1) if fsdp else (-1, 1))
  # Over the tiny model's parameters (the last config), the trainable regexes pick exactly the
  # adapters and the connectors.
  paths = optim.flatten(nn.meta.unbox(system.abstract_params(config)))
  picked = {p for p in paths if optim.matches(p, cfg.optim.trainable)}
  want = {p for p in paths if p.endswith(ADAPTER) or optim.matches(p, (connectors,))}
  assert picked == want and sum(p.endswith(ADAPTER) for p in picked) == 14
  assert not any(p.startswith("llm/") and not p.endswith(ADAPTER) for p in picked)
  # Full fine-tuning of the LLM shards it (FSDP) by default.
  full = {"video_llama": ("stage2_full",), "video_llava": ("stage2",), "llama_vid": ("stage2", "stage3")}[name]
  for stage in full:
    assert {k: v for k, v in load_config(f"{path}:{stage}", []).mesh.items()} == dict(data=1, fsdp=-1, tensor=1)


def test_convert_peft_into_a_plain_llama_folder(files, tmp_path):
  """A plain LLaMA folder takes an adapter too: kept, it computes what the adapted LLaMA does;
  merged, its kernels are W + alpha/rank * A B."""
  lora_config = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "v", "down"))
  config = video_llava_recipes.model_config("tiny").llama.replace(lora=lora_config)
  ids = jnp.arange(12, dtype=jnp.int32)[None]
  params = jax.tree.map(np.asarray, nn.meta.unbox(Llama(config).init(jax.random.key(0), ids)["params"]))
  params = {k: v if not k.endswith("/lora_b") else np.full_like(v, 0.01) for k, v in optim.flatten(params).items()}
  params = optim.unflatten(params)
  base_params = {k: v for k, v in optim.flatten(params).items() if not k.endswith(ADAPTER)}
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "peft")
  pretrained.save_llama(base_dir, config.replace(lora=None), optim.unflatten(base_params))
  T.AutoTokenizer.from_pretrained(str(files / "tokenizer")).save_pretrained(base_dir)
  peft.save_adapter(config, params, adapter_dir)
  want = np.asarray(Llama(config).apply({"params": params}, ids)[0])
  for flag in ([], ["--merge"]):
    out = str(tmp_path / f"out{len(flag)}")
    assert cli.main(["convert", "peft", "--model", base_dir, "--adapter", adapter_dir, "--out", out, *flag]) == 0
    got_config, got_params, _ = pretrained.load_llama(out)
    assert got_config.lora == (None if flag else lora_config)
    np.testing.assert_allclose(np.asarray(Llama(got_config).apply({"params": got_params}, ids)[0]), want,
                               rtol=1e-5, atol=1e-5)


def test_recipe_lora_on_a_loaded_config():
  """The recipe's LoRA goes onto a folder's config without adapters (or with the same ones, the
  dropout aside); other adapters are refused. Only adapters may be missing from loaded params."""
  cfg = load_config(os.path.join(ROOT, "configs/video_llava.py:tiny_stage2_lora"), ["--config.init_from=base"])
  lora = run_lib.recipe_lora(cfg)
  config = video_llava_recipes.model_config("tiny")
  with_lora = run_lib.with_recipe_lora(cfg, config)
  assert with_lora == config.replace(llama=config.llama.replace(lora=lora))
  assert run_lib.with_recipe_lora(cfg, with_lora.replace(llama=with_lora.llama.replace(
      lora=lora.replace(dropout=0.0)))) == with_lora
  with pytest.raises(ValueError, match="base already has LoRA adapters"):
    run_lib.with_recipe_lora(cfg, config.replace(llama=config.llama.replace(lora=lora.replace(rank=8))))
  plain = load_config(os.path.join(ROOT, "configs/video_llava.py:tiny_stage2"), [])
  assert run_lib.recipe_lora(plain) is None and run_lib.with_recipe_lora(plain, config) == config

  model = {"llm": {"q": {"kernel": 1, "lora_a": 2, "lora_b": 3}}, "projector": {"kernel": 4}}
  run_lib.check_loaded({"llm": {"q": {"kernel": 5}}, "projector": {"kernel": 6}}, model)  # adapters: made fresh
  with pytest.raises(ValueError, match="do not fit the model: projector/kernel"):
    run_lib.check_loaded({"llm": {"q": {"kernel": 5}}}, model)
