"""`convert video-llama`, `chat` and `infer` end to end on a tiny random model assembled from
checkpoint files in the released layouts, with real media (and bad media) on disk."""

import fractions
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from test_video_loading import write_video
from vllm_jax import cli, systems
from vllm_jax.configs.video_llama import model_config
from vllm_jax.converters import imagebind
from vllm_jax.converters import video_llama as vision_conv
from vllm_jax.converters import video_llama_audio as audio_conv
from vllm_jax.converters.core import export, write_safetensors
from vllm_jax.data.tokenizer import train_tokenizer

CORPUS = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left.\n",
          "The video contains 4 frames sampled at 0.0, 1.5 seconds. Close your eyes, open your ears"] * 20


def torch_save(tensors, path, wrap=True):
  state = {k: torch.from_numpy(np.array(v)) for k, v in tensors}
  torch.save({"model": state} if wrap else state, path)


def random_params(abstract, seed):
  """Random values for abstract params (no compiled init: the ViT's would cost more than the test)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype), nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Released-layout files of a tiny random Video-LLaMA, converted with the CLI; media files."""
  root = tmp_path_factory.mktemp("chat")
  tokenizer = train_tokenizer(CORPUS, str(root / "llama"), vocab_size=300)
  torch.manual_seed(0)
  llm = LlamaForCausalLM(HFLlamaConfig(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  llm.save_pretrained(str(root / "llama"))
  cfg = model_config("tiny")
  vision = random_params(vision_conv.abstract_params(cfg.vision), 1)
  audio = random_params(audio_conv.abstract_params(cfg.audio), 2)
  enc = cfg.audio.encoder
  write_safetensors(list(export(vision, vision_conv.hf_blip2_rules(cfg.vision))), str(root / "blip2.safetensors"))
  vision_conv.save_finetuned(cfg.vision, vision, str(root / "vl.pth"))
  torch_save(audio_conv.export_connector(audio, cfg.audio), root / "al.pth")
  torch_save(imagebind.export_audio_encoder(audio["encoder"], enc), root / "imagebind.pth", wrap=False)
  model = str(root / "model")
  assert cli.main(["convert", "video-llama", "--config", "tiny", "--llama-dir", str(root / "llama"),
                   "--hf-blip2", str(root / "blip2.safetensors"), "--vl", str(root / "vl.pth"),
                   "--al", str(root / "al.pth"), "--imagebind", str(root / "imagebind.pth"), "--out", model]) == 0

  media = root / "media"
  media.mkdir()
  (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)).save(media / "img.png")
  paths = {
      "av": write_video(media / "av.mp4", num_frames=30, audio_seconds=3.0),
      "mute": write_video(media / "mute.mp4", num_frames=30),
      "one": write_video(media / "one.mp4", num_frames=1),
      "long": write_video(media / "long.mp4", num_frames=720, fps=fractions.Fraction(1, 10), size=(32, 32), gop=1000),
      "image": str(media / "img.png"), "corrupt": str(media / "corrupt.mp4"), "missing": str(media / "nope.mp4"),
  }
  return model, paths, (vision, audio, llm)


@pytest.fixture(scope="module", autouse=True)
def load_once(files):
  """Each command loads the model folder; the tests after the first reuse that load (the
  loading itself is checked by test_convert_assembles_every_part)."""
  cached = functools.lru_cache(systems.load)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(systems, "load", lambda model, mesh=None, **kw: cached(model, mesh, **kw))
    yield


def test_convert_assembles_every_part(files):
  model, _, (vision, audio, llm) = files
  loaded = systems.load(model)
  config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
  assert config.audio is not None and config.llama.hidden_size == 40
  assert (config.video_token_id, config.audio_token_id) == (len(tokenizer) - 2, len(tokenizer) - 1)
  for ours, source in ((params["vision"], vision), (params["audio"], audio)):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, source)
  np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"],
                                llm.model.embed_tokens.weight.detach().numpy())


def chat(model, *args):
  return cli.main(["chat", "--model", model, "--max-new-tokens", "6", *args])


@pytest.mark.parametrize("name,note", [
    ("av", "frames at 0.0, 0.7, 1.5, 2.2 s, with audio"),
    ("mute", "no usable audio track; answering from the frames only"),
    ("one", "frames at 0.0 s]"),
    ("long", "frames at 0.0, 1800.0, 3600.0, 5400.0 s"),
    ("image", "[image]"),
])
def test_chat_answers_about_media(files, capsys, name, note):
  model, paths, _ = files
  flag = "--image" if name == "image" else "--video"
  assert chat(model, flag, paths[name], "--question", "What is moving?") == 0
  out, err = capsys.readouterr()
  assert note in err and out.endswith("\n") and "###" not in out


@pytest.mark.parametrize("name,message", [("missing", "media file not found: .*nope.mp4"),
                                          ("corrupt", "cannot decode video .*corrupt.mp4")])
def test_chat_reports_bad_media(files, capsys, name, message):
  model, paths, _ = files
  assert chat(model, "--video", paths[name], "--question", "What?") == 2
  import re
  assert re.search("error: " + message, capsys.readouterr().err)


def test_chat_interactive_multi_turn_and_text_only_guard(files, capsys, monkeypatch):
  model, paths, _ = files
  questions = iter(["What is moving?", "And then?", ""])
  monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
  assert chat(model, "--video", paths["av"], "--no-audio", "--temperature", "0.7", "--top-p", "0.9") == 0
  out, err = capsys.readouterr()
  assert out.count("\n") == 2 and "with audio" not in err
  assert chat(model, "--video", paths["av"], "--question", "Why?") == 0  # audio on: the model has the branch
  assert "with audio" in capsys.readouterr().err
  assert chat(model) == 2 and "give --video or --image" in capsys.readouterr().err


def test_infer_batches_records_errors_and_resumes(files, tmp_path, capsys):
  model, paths, _ = files
  items = [{"video": paths["av"], "question": "What is moving?", "id": "a"},
           {"image": paths["image"], "question": "What is this?"},
           {"video": paths["missing"], "question": "Where?"},
           {"video": paths["corrupt"], "question": "Where?"},
           "not json",
           {"video": paths["one"], "question": "What?"},
           {"video": paths["long"], "question": "What happens?"},
           {"video": paths["mute"], "question": "What do you hear?"}]
  src, dst = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
  src.write_text("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n")
  args = ["infer", "--model", model, "--input", str(src), "--output", str(dst), "--batch-size", "3",
          "--max-new-tokens", "5"]
  assert cli.main(args) == 1  # some items failed
  assert "5 answered, 3 failed" in capsys.readouterr().err
  records = {r["line"]: r for r in map(json.loads, dst.read_text().splitlines())}
  assert sorted(records) == list(range(8))
  errors = {i for i, r in records.items() if "error" in r}
  assert errors == {2, 3, 4}
  assert "FileNotFoundError" in records[2]["error"] and "MediaError" in records[3]["error"]
  assert all(isinstance(records[i]["answer"], str) for i in (0, 1, 5, 6, 7))
  assert records[0]["id"] == "a" and records[0]["audio"] and not records[7]["audio"] and not records[1]["audio"]

  # Resume: a torn last line and the errors are dropped and retried; answers are kept, not redone.
  with open(dst, "a") as f:
    f.write('{"line": 5, "ans')
  capsys.readouterr()
  assert cli.main(args) == 1
  assert "5 of 8 lines already answered; 3 to go" in capsys.readouterr().err
  again = [json.loads(line) for line in dst.read_text().splitlines()]
  assert sorted(r["line"] for r in again) == list(range(8))
  assert {r["line"]: r for r in again}[0] == records[0]


def test_infer_resumes_by_key_and_reads_media_beside_the_input(files, tmp_path, monkeypatch, capsys):
  """A line inserted at the top is answered and nothing else is redone (resume by id, or by a hash of
  the line); relative media paths start from the input file's folder, wherever infer runs."""
  model, paths, _ = files
  folder = tmp_path / "questions"
  (folder / "media").mkdir(parents=True)
  for name in ("av", "one", "mute"):
    os.link(paths[name], folder / "media" / f"{name}.mp4")
  src, dst = folder / "q.jsonl", tmp_path / "a.jsonl"
  items = [{"video": "media/av.mp4", "question": "What is moving?", "id": "a"},
           {"video": "media/one.mp4", "question": "What?"}]
  src.write_text("".join(json.dumps(i) + "\n" for i in items))
  monkeypatch.chdir(tmp_path)  # not the input's folder
  args = ["infer", "--model", model, "--input", str(src), "--output", str(dst), "--batch-size", "2",
          "--max-new-tokens", "4"]
  assert cli.main(args) == 0
  first = [json.loads(line) for line in dst.read_text().splitlines()]
  assert all("answer" in r for r in first) and len({r["key"] for r in first}) == 2

  new = {"video": "media/mute.mp4", "question": "What do you hear?", "id": "b"}
  src.write_text("".join(json.dumps(i) + "\n" for i in [new] + items + [items[0]]))  # and a repeated id
  capsys.readouterr()
  assert cli.main(args) == 0
  err = capsys.readouterr().err
  assert "2 of 4 lines already answered; 2 to go" in err and "ids on more than one line" in err and "a" in err
  records = [json.loads(line) for line in dst.read_text().splitlines()]
  assert records[:2] == first and sorted(r["key"] for r in records) == sorted(["a", "a#2", "b", first[1]["key"]])
  assert cli.main(args + ["--media-root", str(tmp_path)]) == 0  # nothing left to do


def test_infer_never_overwrites_what_is_not_its_answers(files, tmp_path, capsys):
  """--output equal to --input, or a file holding anything but answer records, is refused before
  the model loads, and left as it was."""
  model, paths, _ = files
  src, notes = tmp_path / "q.jsonl", tmp_path / "notes.txt"
  src.write_text(json.dumps({"video": paths["av"], "question": "What?"}) + "\n")
  notes.write_text("my notes\n")
  for output, message in ((src, "is --input"), (notes, "is not an answers file")):
    before = output.read_text()
    assert cli.main(["infer", "--model", model, "--input", str(src), "--output", str(output)]) == 2
    assert message in capsys.readouterr().err and output.read_text() == before
