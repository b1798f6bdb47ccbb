"""Video-LLaVA through the commands every system shares: `convert video-llava` of a transformers
folder (a real tokenizer with <image>/<video>), `chat` and `infer` on real mp4/png files (good and
bad), `train` from the converted folder; a (2, 2, 2) mesh gives the forward and the stage-1 step of
one device."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

from test_video_loading import write_video
from vllm_jax import cli, systems
from vllm_jax.cli.flags import load_config
from vllm_jax.converters import llama as llama_format
from vllm_jax.converters import video_llava as video_llava_format
from vllm_jax.data import datasets
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.llama import Llama
from vllm_jax.systems.video_llava import VideoLlavaSystem
from vllm_jax.train import optim, sharding, trainer
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["USER: What is moving in the video? ASSISTANT: A red circle moves left.",
          "A chat between a curious human and an artificial intelligence assistant."] * 20
FRAMES = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A random transformers Video-LLaVA (28 px, 2 tower layers used) with a trained tokenizer,
  converted by the CLI; media files and a LLaVA-style JSON mixing images and videos."""
  root = tmp_path_factory.mktemp("video_llava_system")
  hf_dir = root / "hf"
  tokenizer = train_tokenizer(CORPUS, str(hf_dir), vocab_size=300)
  image_id, video_id = VideoLlavaSystem.add_media_tokens(tokenizer)
  tokenizer.save_pretrained(str(hf_dir))
  torch.manual_seed(0)
  vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14)
  text = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  hf = T.VideoLlavaForConditionalGeneration(T.VideoLlavaConfig(
      vision_config=vision, text_config=text, image_token_index=image_id, video_token_index=video_id,
      image_seq_length=4, video_seq_length=FRAMES * 5))
  hf.save_pretrained(str(hf_dir))
  model = str(root / "model")
  assert cli.main(["convert", "video-llava", "--hf-dir", str(hf_dir), "--out", model]) == 0

  media = write_llava_data(root)
  (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  return root, model, media


def write_llava_data(root):
  """Two pngs and two mp4s in root/media, and root/train.json: LLaVA-style conversations about
  them (each twice) -> the media folder."""
  media = root / "media"
  media.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(media / f"img{i}.png")
    write_video(media / f"clip{i}.mp4", num_frames=12 + 5 * i, size=(48, 64))
  items = [{"id": str(i), kind: f"{name}{i}.{ext}", "conversations": [
      {"from": "human", "value": f"<{kind}>\nWhat is shown?"}, {"from": "gpt", "value": answer}]}
      for i in range(2) for kind, name, ext, answer in (("image", "img", "png", "A picture."),
                                                         ("video", "clip", "mp4", "A red circle moves left."))]
  (root / "train.json").write_text(json.dumps(items * 2))
  return media


def test_convert_records_the_system(files):
  _, model, _ = files
  system = systems.load(model)
  assert isinstance(system, VideoLlavaSystem) and system.config.num_frames == FRAMES
  assert system.config.video_tower.temporal_frames == 0 and system.config.image_tower.depth == 2


def test_convert_original_layout(files, tmp_path):
  """The original layout (`save_original`) converted back by the CLI gives the same model."""
  root, model, _ = files
  system = systems.load(model)
  original = tmp_path / "original"
  video_llava_format.save_original(system.config, system.params, str(original))
  llama_format.copy_tokenizer(str(root / "hf"), str(original))
  out = str(tmp_path / "model")
  assert cli.main(["convert", "video-llava", "--original", str(original), "--config", "tiny", "--out", out]) == 0
  again = systems.load(out)
  assert again.config.replace(llama=system.config.llama) == system.config
  jax.tree.map(np.testing.assert_array_equal, again.params, system.params)


def chat(model, *args):
  return cli.main(["chat", "--model", model, "--max-new-tokens", "5", *args])


def test_chat_about_video_and_image_and_bad_media(files, capsys):
  _, model, media = files
  assert chat(model, "--video", str(media / "clip0.mp4"), "--question", "What is moving?") == 0
  out, err = capsys.readouterr()
  assert "[video, frames at" in err and out.endswith("\n")
  assert chat(model, "--image", str(media / "img0.png"), "--question", "What is this?") == 0
  assert "[image]" in capsys.readouterr().err
  assert chat(model, "--video", str(media / "corrupt.mp4"), "--question", "What?") == 2
  assert "error: cannot decode video" in capsys.readouterr().err
  assert chat(model, "--video", str(media / "clip0.mp4"), "--audio", "--question", "What?") == 2
  assert "has no audio branch" in capsys.readouterr().err


def test_chat_drops_oldest_turns_to_fit_the_context_and_resets(files, capsys, monkeypatch):
  """The model's context is 512 tokens; a video prompt takes ~200 of them. With room for 200 new
  tokens, the third question only fits once the first turn is dropped (the media stay); /reset starts
  over; a question that cannot fit even alone is refused with one line and the chat goes on."""
  _, model, media = files
  questions = iter(["What is moving in the video?", "And then what happens?", "What colour is it?",
                    "/reset", "What is moving? " * 40, "Why?", ""])
  monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
  assert chat(model, "--video", str(media / "clip0.mp4"), "--max-new-tokens", "200") == 0
  out, err = capsys.readouterr()
  assert "oldest turn(s) were dropped" in err and "a new conversation about the same media" in err
  assert "error: the media and this question take" in err and "Traceback" not in err
  assert out.count("\n") == 4  # four answers: the too-long question got none
  assert chat(model, "--video", str(media / "clip0.mp4"), "--max-new-tokens", "600", "--question", "What?") == 2
  assert "--max-new-tokens 600: the model's context is 512 tokens" in capsys.readouterr().err
  assert chat(model, "--video", str(media / "clip0.mp4"), "--max-new-tokens", "400", "--question", "What?") == 2
  assert "do not fit the model's context of 512" in capsys.readouterr().err


def test_prompt_expands_placeholders(files):
  _, model, media = files
  system = systems.load(model)
  clip = system.load_media(str(media / "clip1.mp4"))
  conv = system.conversation(clip)
  conv.ask("What is moving?")
  assert conv.prompt().endswith(" USER: <video>\nWhat is moving? ASSISTANT:")
  ids = system.prompt_ids(conv.prompt(), clip)
  assert ids.count(system.config.video_token_id) == FRAMES * 5 and ids[0] == system.tokenizer.bos_token_id


def test_infer_mixes_images_and_videos_in_a_batch(files, tmp_path):
  _, model, media = files
  items = [{"video": str(media / "clip0.mp4"), "question": "What is moving?", "id": "v"},
           {"image": str(media / "img1.png"), "question": "What is this?"},
           {"video": str(media / "missing.mp4"), "question": "Where?"}]
  src, dst = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
  src.write_text("\n".join(map(json.dumps, items)) + "\n")
  assert cli.main(["infer", "--model", model, "--input", str(src), "--output", str(dst), "--batch-size", "3",
                   "--max-new-tokens", "4"]) == 1  # the missing file
  records = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
  assert isinstance(records[0]["answer"], str) and isinstance(records[1]["answer"], str)
  assert "FileNotFoundError" in records[2]["error"]

  # The batched answers are those of each item alone.
  for line, record in records.items():
    if "answer" in record:
      alone = tmp_path / f"alone{line}.jsonl"
      alone.write_text(json.dumps(items[line]) + "\n")
      out = tmp_path / f"out{line}.jsonl"
      assert cli.main(["infer", "--model", model, "--input", str(alone), "--output", str(out), "--batch-size", "3",
                       "--max-new-tokens", "4"]) == 0
      assert json.loads(out.read_text())["answer"] == record["answer"]


def test_training_example_layout(files):
  root, model, _ = files
  cfg = stage1_config(root, model)
  system = systems.load(model)
  decode = VideoLlavaSystem.decoder(cfg, system.config, os.path.join(model, "tokenizer"))
  record = {"media": str(root / "media" / "clip0.mp4"), "conversation": [
      {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": "A red circle."},
      {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It stops."}]}
  example = decode(record)
  ids, labels = example["input_ids"], example["labels"]
  assert ids.shape == labels.shape == (cfg.data.max_len,) and example["pixels"].shape == (FRAMES, 28, 28, 3)
  assert (ids == system.config.video_token_id).sum() == FRAMES * 5
  tokenizer = system.tokenizer
  learned = tokenizer.decode(labels[labels >= 0], skip_special_tokens=False)
  assert learned.replace(" ", "") == "Aredcircle.</s>Itstops.</s>"
  text = tokenizer.decode(ids[(ids != system.config.video_token_id) & (example["attention_mask"] > 0)],
                          skip_special_tokens=True)
  assert text.strip().startswith(system.template.system) and "What is shown? ASSISTANT: A red circle." in text


def stage1_config(root, model, **overrides):
  cfg = load_config(os.path.join(ROOT, "configs/video_llava.py:tiny_stage1"),
                    [f"--config.init_from={model}", f"--config.data.instruct_json={root / 'train.json'}",
                     f"--config.data.instruct_dir={root / 'media'}"])
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


def test_train_from_converted_folder_through_the_cli(files, tmp_path, capsys):
  root, model, _ = files
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", os.path.join(ROOT, "configs/video_llava.py:tiny_stage1"),
                   f"--config.init_from={model}", f"--config.data.instruct_json={root / 'train.json'}",
                   f"--config.data.instruct_dir={root / 'media'}", f"--config.train.workdir={workdir}",
                   "--config.train.steps=3", "--config.train.log_every=1", "--config.train.batch_size=8"]) == 0
  steps = trainer.read_metrics(workdir)
  assert [m["step"] for m in steps] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in steps)


def test_text_only_records_train_as_the_plain_llama(files, tmp_path):
  """Text-only records (no "image" or "video": nlp_tune.json's) are a third group; their examples
  have no media turn and zero pixels of the usual shape; their loss is the plain LLaMA's on the
  same ids and labels (no tower runs, nothing is spliced), and a stage-2 step on them is finite."""
  root, model, _ = files
  chats = [[("What is shown?", "A red circle moves left.")],
           [("What is moving?", "A circle."), ("And then?", "It stops.")]]
  text_items = [{"id": f"text{i}", "conversations": [{"from": who, "value": value} for turn in chat
                                                     for who, value in zip(("human", "gpt"), turn)]}
                for i, chat in enumerate(chats)]
  (tmp_path / "mixed.json").write_text(json.dumps(json.loads((root / "train.json").read_text()) + text_items))
  cfg = load_config(os.path.join(ROOT, "configs/video_llava.py:tiny_stage2"), [
      f"--config.init_from={model}", f"--config.data.instruct_json={tmp_path / 'mixed.json'}",
      f"--config.data.instruct_dir={root / 'media'}", "--config.train.batch_size=2"])
  system = systems.load(model)
  config = system.config
  groups = VideoLlavaSystem.dataset(cfg, config, os.path.join(model, "tokenizer"))
  assert [weight for _, weight in groups] == [4, 4, 2]  # images, videos, text
  batch = {k: v for k, v in next(iter(datasets.batches([groups[2]], 2, process_index=0, process_count=1))).items()
           if k != "skipped"}
  ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
  assert batch["pixels"].shape == VideoLlavaSystem.batch_spec(cfg, config)["pixels"].shape
  assert not batch["pixels"].any() and not np.isin(ids, [config.image_token_id, config.video_token_id]).any()
  texts = {system.tokenizer.decode(row[m > 0]).replace(" ", "") for row, m in zip(ids, mask)}
  system_prompt = "<s>" + system.template.system.replace(" ", "")
  assert texts == {system_prompt + "".join(f"USER:{q}ASSISTANT:{a}</s>" for q, a in chat).replace(" ", "")
                   for chat in chats}

  logits, _ = Llama(config.llama).apply({"params": system.params["llm"]}, ids, attention_mask=mask)
  want, count = trainer.cross_entropy(logits, labels)
  got, got_count = jax.jit(VideoLlavaSystem.loss_fn(config))(system.params, batch, None)
  assert int(got_count) == int(count) > 0 and abs(float(got) - float(want)) <= 1e-6 * abs(float(want))

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  t = run_lib.make_trainer(cfg, mesh, VideoLlavaSystem, config)
  _, metrics = t.train_step(t.init(jax.tree.map(jnp.copy, system.params)), sharding.make_global_batch(batch, mesh))
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_sharded_forward_and_stage1_step_match_single_device(files):
  """Batches hold images or videos, never both; on each, a (2, 2, 2) mesh gives the logits and the
  training step of one device."""
  root, model, _ = files
  cfg = stage1_config(root, model, **{"train.batch_size": 4})
  single, full = sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.make_mesh((2, 2, 2))
  system = systems.load(model)
  config = system.config
  groups = VideoLlavaSystem.dataset(cfg, config, os.path.join(model, "tokenizer"))
  assert [weight for _, weight in groups] == [4, 4]  # images, videos
  it = iter(datasets.batches(groups, 4, process_index=0, process_count=1))
  batches = [{k: v for k, v in next(it).items() if k != "skipped"} for _ in range(2)]
  kinds = [{int((ids == t).any()) for ids in b["input_ids"]}
           for b in batches for t in (config.image_token_id, config.video_token_id)]
  assert kinds == [{1}, {0}, {0}, {1}]  # an image batch, then a video batch
  assert batches[1]["pixels"].shape == (4, FRAMES, 28, 28, 3)
  # The training loss runs only the tower a batch asks for, and equals the model's with both.
  loss_fn, forward = jax.jit(VideoLlavaSystem.loss_fn(config)), jax.jit(VideoLlavaSystem.model(config).apply)
  for batch in batches:
    logits = forward({"params": system.params}, batch["input_ids"], images=batch["pixels"][:, 0],
                     videos=batch["pixels"], attention_mask=batch["attention_mask"])[0]
    want, count = trainer.cross_entropy(logits, batch["labels"])
    got, got_count = loss_fn(system.params, batch, None)
    assert int(got_count) == int(count) > 0 and abs(float(got) - float(want)) <= 1e-6 * abs(float(want))

  for batch in batches:  # logits, compared where the attention mask is 1
    logits = {}
    for name, mesh in (("single", single), ("sharded", full)):
      params = sharding.shard_params(system.params, sharding.param_shardings(
          VideoLlavaSystem.abstract_params(config), mesh))
      with sharding.mesh_context(mesh):
        inputs = sharding.make_global_batch(batch, mesh)
        logits[name] = jax.jit(VideoLlavaSystem.model(config).apply)(
            {"params": params}, inputs["input_ids"], images=inputs["pixels"][:, 0], videos=inputs["pixels"],
            attention_mask=inputs["attention_mask"])[0]
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits["sharded"])[mask], np.asarray(logits["single"])[mask],
                               rtol=1e-4, atol=1e-5)

  # Two stage-1 steps (the first at the warm-up's lr 0): the same losses and projector update.
  results = {}
  for name, mesh in (("single", single), ("sharded", full)):
    t = run_lib.make_trainer(cfg, mesh, VideoLlavaSystem, config)
    state, losses = t.init(jax.tree.map(jnp.copy, system.params)), []
    for batch in batches:
      state, metrics = t.train_step(state, sharding.make_global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results[name] = (np.array(losses), optim.flatten(state.params))
  (loss1, p1), (loss8, p8) = results["single"], results["sharded"]
  assert np.isfinite(loss1).all() and np.abs(loss8 - loss1).max() <= 1e-5 * np.abs(loss1).max()
  assert sorted(p1) == ["projector/fc1/bias", "projector/fc1/kernel", "projector/fc2/bias", "projector/fc2/kernel"]
  for k in p1:
    np.testing.assert_allclose(np.asarray(p8[k]), np.asarray(p1[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    assert not np.allclose(np.asarray(p1[k]), np.asarray(optim.flatten(system.params)[k])), k


def test_sharded_temporal_video_tower_matches_single_device():
  """The original model's video tower (attention across frames in every layer) on a (2, 2, 2) mesh."""
  from vllm_jax.configs.video_llava import model_config
  base = model_config("tiny")
  config = base.replace(video_tower=base.video_tower.replace(temporal_frames=base.num_frames))
  model = VideoLlavaSystem.model(config)
  videos = np.random.default_rng(0).normal(size=(4, config.num_frames, 28, 28, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), **{k: jnp.zeros(v.shape, v.dtype)
                                            for k, v in VideoLlavaSystem.init_inputs(config).items()})["params"]
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  assert params["video_tower"]["blocks"]["temporal_embedding"].shape == (2, config.num_frames, 32)
  out = {}
  for name, mesh in (("single", sharding.make_mesh((1, 1, 1), jax.devices()[:1])),
                     ("sharded", sharding.make_mesh((2, 2, 2)))):
    sharded = sharding.shard_params(params, sharding.param_shardings(VideoLlavaSystem.abstract_params(config), mesh))
    with sharding.mesh_context(mesh):
      out[name] = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode_videos"))(
          sharded, sharding.make_global_batch(videos, mesh))
  ours, ref = np.asarray(out["sharded"], np.float64), np.asarray(out["single"], np.float64)
  assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-5
