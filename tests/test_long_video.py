"""LLaMA-VID's long-video stage on its released layout: `long_videoqa.json` (LLaVA keys: "id",
"video", "conversations") whose "video" names a MovieNet feature file under the video folder
(`movienet/tt*.pkl`: a pickled dict of `feats` [T, 257, D] float16 and `inputs`, the frames'
"<image>" marks with the subtitles between them, as the reference's extract_movienet_features.py
writes them and its train.py reads them), text-only chats beside them.

Proven here: the files read as the reference reads them (CLS dropped, numpy 1's pickles too,
nothing but arrays and text unpickled); an example's ids equal the reference's ("..." removed,
each mark doubled, `tokenizer_image_token` over the imgsp_v1 prompt) with the placeholders where
its IMAGE_TOKEN_INDEX sits; longer movies thinned without losing a subtitle; the loss equals a
direct computation over the spliced frame tokens; `vllm-jax train` runs the tiny stage 3 on
the layout from a working folder with relative paths, the ViT never in its state; video files
where feature files belong are one error line; the layout reads the same from a bucket; and a
feature file in `chat` gives the reference movie chat's prompt and the frames' tokens there.
`vllm-jax make-feature-files` writes a video and its .srt as the reference's extraction does
(subtitles placed between frames by its rule, features float16 with CLS).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllm_jax import paths
from vllm_jax.cli.flags import load_config
from vllm_jax.configs import llama_vid as recipes
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets, feature_cache, long_video
from vllm_jax.data.media import MediaError
from vllm_jax.data.tokenizer import load_instruction_tokenizer, train_tokenizer, train_wordpiece_tokenizer
from vllm_jax.models.llama_vid import LlamaVid
from vllm_jax.systems.base import apply
from vllm_jax.systems.llama_vid import FeatureFileDecode, LlamaVidSystem, file_frame_shape
from vllm_jax.train import optim, sharding, trainer
from vllm_jax.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "vllm_jax.cli"]
REFERENCE_IMAGE_INDEX = -200  # the reference's IMAGE_TOKEN_INDEX
MOVIES = {  # name: (the inputs string as written, frames)
    "tt0000001": ("<image>Where are we going...<image><image>To the island. Hurry!<image>", 4),
    "tt0000002": ("<image>One.<image>Two.<image><image>Four.<image>Five.<image>Six.", 6),  # thinned to 4
}
QUESTIONS = {"tt0000001": "<image>\nWhat happens at the end of the movie?",
             "tt0000002": "Summarize the plot\nin a line. <image>"}
ANSWERS = {"tt0000001": "They reach the island.", "tt0000002": "Someone counts to six."}
CHAT_QUESTION = "Where are they going?"
TEXT_ONLY = [{"from": "human", "value": "Who wrote the script?"}, {"from": "gpt", "value": "Nobody knows."}]


def write_feature_file(path, feats: np.ndarray, inputs: str, numpy1: bool = False) -> None:
  """As the reference writes them; `numpy1`: with numpy 1's module names (the released files')."""
  data = pickle.dumps(dict(feats=feats, inputs=inputs), protocol=2 if numpy1 else 4)
  if numpy1:  # protocol 2 names classes as text
    assert b"numpy._core.multiarray" in data
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """root/LLaMA-VID-Finetune: long_videoqa.json and movienet/*.pkl (tiny ViT features: 1 + 2x2
  tokens of width 32); trained LLaMA and BERT tokenizers; a random tiny model folder."""
  root = tmp_path_factory.mktemp("long_video")
  data = root / "LLaMA-VID-Finetune"
  config = recipes.model_config("tiny")
  rng = np.random.default_rng(0)
  feats = {}
  for k, (name, (inputs, frames)) in enumerate(MOVIES.items()):
    feats[name] = rng.normal(size=(frames, 1 + config.vit.grid ** 2, config.vit.width)).astype(np.float16)
    write_feature_file(data / "movienet" / f"{name}.pkl", feats[name], inputs, numpy1=k == 1)
  items = [{"id": f"{name}_0", "video": f"movienet/{name}.pkl", "conversations": [
      {"from": "human", "value": QUESTIONS[name]}, {"from": "gpt", "value": ANSWERS[name]}]} for name in MOVIES]
  items.insert(1, {"id": "script_0", "conversations": TEXT_ONLY})
  (data / "long_videoqa.json").write_text(json.dumps(items))

  corpus = [conv_lib.VICUNA_V1_SYSTEM, "USER: ASSISTANT:", long_video.MOVIE_START, long_video.MOVIE_END,
            CHAT_QUESTION] + [i for i, _ in MOVIES.values()] + list(
      QUESTIONS.values()) + list(ANSWERS.values()) + [m["value"] for m in TEXT_ONLY]
  tokenizer = train_tokenizer(corpus * 10, str(root / "tokenizer"), vocab_size=319)
  bert = train_wordpiece_tokenizer(corpus * 10, str(root / "bert"), vocab_size=200)
  config = config.replace(image_token_id=LlamaVidSystem.add_media_tokens(tokenizer)[0])
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in LlamaVidSystem.init_inputs(config).items()}
  params = nn.meta.unbox(jax.jit(LlamaVid(config).init)(jax.random.key(0), **inputs))["params"]
  LlamaVidSystem(config, jax.tree.map(np.asarray, params), tokenizer, bert).save(str(root / "model"))
  return root, config, params, feats


def stage3(root, **overrides):
  return load_config(os.path.join(ROOT, "configs/llama_vid.py:tiny_stage3"), [
      f"--config.init_from={root / 'model'}",
      f"--config.data.instruct_json={root}/LLaMA-VID-Finetune/long_videoqa.json",
      f"--config.data.instruct_dir={root}/LLaMA-VID-Finetune", *(f"--config.{k}={v}" for k, v in overrides.items())])


def by_id(root) -> dict:
  items = json.loads((root / "LLaMA-VID-Finetune" / "long_videoqa.json").read_text())
  records = datasets.llava_records(str(root / "LLaMA-VID-Finetune" / "long_videoqa.json"),
                                   str(root / "LLaMA-VID-Finetune"))
  return {item["id"].split("_")[0]: record for item, record in zip(items, records)}


def reference_ids(tokenizer, question: str, inputs: str, answer: str) -> list[int]:
  """The reference's input_ids for a movie in training: the question's <image> replaced by
  `inputs` without "...", in the imgsp_v1 prompt (`reference_prompt_ids`)."""
  movie = inputs.replace("...", "")
  return reference_prompt_ids(
      tokenizer, f"{conv_lib.VICUNA_V1_SYSTEM} USER: {question.replace('<image>', movie)} ASSISTANT: {answer}</s>")


def reference_chat_ids(tokenizer, question: str, inputs: str) -> list[int]:
  """The reference movie chat's input_ids: `inputs` as written between its start and end
  prompts, a newline, the question, in the vicuna_v1 prompt (`reference_prompt_ids`)."""
  turn = f"{long_video.MOVIE_START}{inputs}{long_video.MOVIE_END}\n{question}"
  return reference_prompt_ids(tokenizer, f"{conv_lib.VICUNA_V1_SYSTEM} USER: {turn} ASSISTANT:")


def reference_prompt_ids(tokenizer, prompt: str) -> list[int]:
  """Each <image> doubled (video_token 2); `tokenizer_image_token`: each piece between marks
  tokenized with BOS, BOS kept once, a mark as IMAGE_TOKEN_INDEX."""
  chunks = [tokenizer(chunk).input_ids for chunk in prompt.replace("<image>", "<image>" * 2).split("<image>")]
  ids = [chunks[0][0]]
  for k, chunk in enumerate(chunks):
    ids += ([REFERENCE_IMAGE_INDEX] if k else []) + chunk[1:]
  return ids


def test_feature_files_read_as_the_reference_reads_them(files, tmp_path):
  root, _, _, feats = files
  movie = long_video.load(str(root / "LLaMA-VID-Finetune" / "movienet" / "tt0000001.pkl"))
  np.testing.assert_array_equal(movie.features, feats["tt0000001"][:, 1:])  # CLS dropped
  assert movie.texts == ("", "Where are we going...", "", "To the island. Hurry!", "")
  assert movie.prompt() == MOVIES["tt0000001"][0]
  assert movie.thinned(4) is movie

  old = long_video.load(str(root / "LLaMA-VID-Finetune" / "movienet" / "tt0000002.pkl"))  # numpy 1's names
  np.testing.assert_array_equal(old.features, feats["tt0000002"][:, 1:])
  thin = old.thinned(4)  # frames 0, 1, 3, 5 (evenly spread); the dropped ones' subtitles follow the kept before
  np.testing.assert_array_equal(thin.features, feats["tt0000002"][[0, 1, 3, 5], 1:])
  assert thin.prompt() == "<image>One.<image>Two.<image>Four. Five.<image>Six."

  marker = tmp_path / "ran"

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)
  (tmp_path / "evil.pkl").write_bytes(pickle.dumps(dict(feats=Payload(), inputs="<image>")))
  with pytest.raises(ValueError, match=r"evil.pkl is not a long-video feature file .*holds a posix.system"):
    long_video.load(str(tmp_path / "evil.pkl"))
  assert not marker.exists()
  write_feature_file(tmp_path / "short.pkl", feats["tt0000001"], "<image>a<image>b")
  with pytest.raises(ValueError, match="inputs marks 2 frames, feats holds 4"):
    long_video.load(str(tmp_path / "short.pkl"))
  (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
  with pytest.raises(ValueError, match="clip.mp4 is not a long-video feature file"):
    long_video.load(str(tmp_path / "clip.mp4"))


def test_a_movie_example_is_the_reference_layout(files):
  root, config, _, feats = files
  cfg = stage3(root)
  tokenizer_dir = str(root / "model" / "tokenizer")
  decode = FeatureFileDecode(LlamaVidSystem.decoder(cfg, config, tokenizer_dir), file_frame_shape(config),
                             config.vit.dtype)
  tokenizer = LlamaVidSystem.training_tokenizer(tokenizer_dir)
  bert = load_instruction_tokenizer(str(root / "bert"))
  records = by_id(root)
  spec = LlamaVidSystem.batch_spec(cfg, config)
  assert spec["frame_features"].shape == (8, 4, 4, 32) and "pixels" not in spec

  for name, (inputs, frames) in MOVIES.items():
    example = decode(records[name])
    assert {k: v.shape for k, v in example.items()} == {k: v.shape[1:] for k, v in spec.items()}
    assert int(example["num_frames"]) == 4
    kept = [0, 1, 3, 5] if frames == 6 else [0, 1, 2, 3]
    np.testing.assert_array_equal(example["frame_features"], feats[name][kept, 1:].astype(np.float32))
    used = int(example["attention_mask"].sum())
    ids = [REFERENCE_IMAGE_INDEX if i == config.image_token_id else int(i) for i in example["input_ids"][:used]]
    if frames == 4:  # as the reference has it, placeholder for placeholder
      assert ids == reference_ids(tokenizer, QUESTIONS[name], inputs, ANSWERS[name])
    else:  # thinned: the reference's ids for the four kept frames with every subtitle
      assert ids == reference_ids(tokenizer, QUESTIONS[name], "<image>One.<image>Two.<image>Four. Five.<image>Six.",
                                  ANSWERS[name])
    labels = example["labels"][:used]
    assert tokenizer.decode(labels[labels >= 0]).strip() == ANSWERS[name] + "</s>"
    # One instruction: the question without its mark, stripped (its newline kept, a space to BERT).
    row = example["instruction_ids"][0][example["instruction_mask"][0] > 0].tolist()
    assert row == bert(QUESTIONS[name].replace("<image>", "").strip()).input_ids

  text = decode(records["script"])
  assert int(text["num_frames"]) == 0 and not text["frame_features"].any()
  assert config.image_token_id not in text["input_ids"]

  # Not this layout: another ViT's features, an image record, a caption format, a feature cache beside it.
  write_feature_file(root / "other_vit.pkl", feats["tt0000001"][..., :16], MOVIES["tt0000001"][0])
  with pytest.raises(ValueError, match=r"other_vit.pkl holds features \[T, 5, 16\]; this model's ViT gives \[T, 5, 32\]"):
    decode(dict(records["tt0000001"], media=str(root / "other_vit.pkl")))
  with pytest.raises(ValueError, match="is an image: with data.video_features"):
    decode(dict(media=str(root / "x.png"), kind="image", caption="", conversation=TEXT_ONLY))
  with pytest.raises(ValueError, match="needs data.text_format conversation"):
    LlamaVidSystem.dataset(stage3(root, **{"data.text_format": "caption"}), config, tokenizer_dir)
  with pytest.raises(ValueError, match="unset data.feature_cache"):
    LlamaVidSystem.dataset(stage3(root, **{"data.feature_cache": root}), config, tokenizer_dir)
  with pytest.raises(ValueError, match="the videos are feature files already, there is nothing to cache"):
    feature_cache.check_system(cfg, LlamaVidSystem, config)  # what `vllm-jax cache-features` asks first


def test_the_loss_reads_each_frame_at_its_placeholders(files):
  """A batch of both movies and the text-only chat: the loss equals the LLM's on embeddings with
  each frame's two tokens (the context token read with the question, over the file's 4 patch
  features, no CLS) spliced at its placeholders between the subtitles."""
  root, config, params, _ = files
  cfg = stage3(root)
  [(videos, _), (texts, _)] = LlamaVidSystem.dataset(cfg, config, str(root / "model" / "tokenizer"))
  examples = [videos[0], texts[0], videos[1]]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "skipped"}
  model = LlamaVid(config)
  rows = []
  for e in examples:
    n = int(e["num_frames"])
    tokens = np.zeros((4 * config.tokens_per_frame, config.llama.hidden_size), np.float32)
    if n:
      frame_tokens = apply(model, "frame_tokens", params, e["frame_features"][:n],
                           np.repeat(e["instruction_ids"][:1], n, 0), np.repeat(e["instruction_mask"][:1], n, 0))
      tokens[:n * config.tokens_per_frame] = np.asarray(frame_tokens).reshape(n * config.tokens_per_frame, -1)
    rows.append(tokens)
  embeds = apply(model, "embed", params, batch["input_ids"], np.stack(rows))
  logits, _ = apply(model, "decode", params, embeds, batch["attention_mask"])
  want, count = trainer.cross_entropy(logits, batch["labels"])
  got, got_count = jax.jit(LlamaVidSystem.loss_fn(config))(params, batch, None)
  assert int(got_count) == int(count) > 0 and abs(float(got) - float(want)) <= 1e-5 * abs(float(want))

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state = run_lib.make_trainer(cfg, mesh, LlamaVidSystem, config).abstract_state
  kept = set(optim.flatten(optim.merge(state.params, state.frozen)))
  assert kept and not any(k.startswith("vision/") for k in kept)  # the ViT is never read


def test_train_stage3_on_the_released_layout(files, tmp_path):
  """`vllm-jax train` as a user types it, in a folder holding the data and the model."""
  root, _, _, _ = files
  for name in ("LLaMA-VID-Finetune", "model"):
    os.symlink(root / name, tmp_path / name)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(CLI + [
      "train", "--config", os.path.join(ROOT, "configs/llama_vid.py:tiny_stage3"), "--config.init_from=model",
      "--config.data.instruct_json=LLaMA-VID-Finetune/long_videoqa.json",
      "--config.data.instruct_dir=LLaMA-VID-Finetune", "--config.train.workdir=run", "--config.train.steps=2",
      "--config.train.batch_size=2", "--config.train.log_every=1"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = [m["loss"] for m in trainer.read_metrics(tmp_path / "run")]
  assert len(losses) == 2 and np.isfinite(losses).all()


def test_video_files_where_feature_files_belong_is_one_error_line(files, tmp_path):
  """Stage 3 (feature files) given video files: one error line naming the file and the switch,
  before the model loads; nothing written."""
  root, _, _, _ = files
  os.symlink(root / "model", tmp_path / "model")
  (tmp_path / "clips").mkdir()
  (tmp_path / "clips" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
  (tmp_path / "clips.json").write_text(json.dumps([{"id": "0", "video": "clip.mp4", "conversations": [
      {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]}]))
  before = sorted(p.name for p in tmp_path.rglob("*"))
  proc = subprocess.run(CLI + [
      "train", "--config", os.path.join(ROOT, "configs/llama_vid.py:tiny_stage3"), "--config.init_from=model",
      "--config.data.instruct_json=clips.json", "--config.data.instruct_dir=clips", "--config.train.workdir=run"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "clip.mp4 is not a long-video feature file" in errors[0] and "False for video files" in errors[0], errors
  assert errors[0].count("clip.mp4") == 1, errors  # named once
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_feature_files_in_a_bucket(files, gcs):
  """The released layout copied to a bucket (gs://) gives the examples of the local folder."""
  root, config, _, _ = files
  bucket = gcs("long-videos")
  paths.copy_tree(str(root / "LLaMA-VID-Finetune"), f"{bucket}/LLaMA-VID-Finetune")
  tokenizer_dir = str(root / "model" / "tokenizer")
  local = [group[0] for group, _ in LlamaVidSystem.dataset(stage3(root), config, tokenizer_dir)]
  cfg = stage3(root, **{"data.instruct_json": f"{bucket}/LLaMA-VID-Finetune/long_videoqa.json",
                        "data.instruct_dir": f"{bucket}/LLaMA-VID-Finetune"})
  remote = [group[0] for group, _ in LlamaVidSystem.dataset(cfg, config, tokenizer_dir)]
  assert len(remote) == len(local) == 2 and int(remote[0]["num_frames"]) == 4
  for a, b in zip(local, remote):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_chat_about_a_feature_file(files):
  """A feature file as inference media, read as the reference's movie chat reads it: the prompt
  (the subtitles as written, between its start and end prompts, before the question; each mark a
  frame's two placeholders), each frame's tokens read with the question over the file's features
  (no ViT), `num_frames` thinning; a time span or another ViT's features are a MediaError."""
  root, config, _, feats = files
  system = LlamaVidSystem.load(str(root / "model"))
  movienet = root / "LLaMA-VID-Finetune" / "movienet"
  media = system.load_media(str(movienet / "tt0000001.pkl"))
  conv = system.conversation(media)
  conv.ask(CHAT_QUESTION)
  ids = system.prompt_ids(conv.prompt(), media)
  want = reference_chat_ids(system.tokenizer, CHAT_QUESTION, MOVIES["tt0000001"][0])
  assert ids == [config.image_token_id if i == REFERENCE_IMAGE_INDEX else i for i in want]

  model, params = LlamaVid(config), system.params
  text_ids = np.asarray([load_instruction_tokenizer(str(root / "bert"))(CHAT_QUESTION).input_ids] * 4)
  frame_tokens = apply(model, "frame_tokens", params, feats["tt0000001"][:, 1:].astype(np.float32), text_ids,
                       np.ones_like(text_ids))
  want_embeds = apply(model, "embed", params, np.asarray([ids]), np.asarray(frame_tokens).reshape(1, 8, -1))
  embeds = system.embed(np.asarray([ids]), system.encode_media([media]), [conv])
  np.testing.assert_allclose(np.asarray(embeds), np.asarray(want_embeds), atol=1e-5)

  thin = system.load_media(str(movienet / "tt0000002.pkl"), num_frames=4)
  assert thin.movie.prompt() == "<image>One.<image>Two.<image>Four. Five.<image>Six."
  assert system.placeholders(thin) == {"<image>": (config.image_token_id, config.tokens_per_frame)}
  with pytest.raises(MediaError, match="feature file: it cannot be cut to 1.0-2.0 s"):
    system.load_media(str(movienet / "tt0000001.pkl"), bounds=(1.0, 2.0))
  write_feature_file(root / "other_vit.pkl", feats["tt0000001"][..., :16], MOVIES["tt0000001"][0])
  with pytest.raises(MediaError, match=r"other_vit.pkl holds features \[T, 5, 16\]"):
    system.load_media(str(root / "other_vit.pkl"))


def test_chat_and_infer_commands_on_feature_files(files, tmp_path):
  """`vllm-jax chat --video movie.pkl` as a user types it answers, and so does `infer` for a line
  naming it; a .pkl that is not a feature file is one error line in `chat`, one error record in
  `infer`."""
  root, _, _, _ = files
  os.symlink(root / "model", tmp_path / "model")
  shutil.copy(root / "LLaMA-VID-Finetune" / "movienet" / "tt0000002.pkl", tmp_path / "movie.pkl")
  (tmp_path / "notes.pkl").write_text("not a pickle")
  chat = CLI + ["chat", "--model", "model", "--question", "Who counts?", "--max-new-tokens", "4", "--video"]
  proc = subprocess.run(chat + ["movie.pkl", "--num-frames", "4"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[long video from a feature file, 4 frames with their subtitles]" in proc.stderr, proc.stderr[-3000:]
  proc = subprocess.run(chat + ["notes.pkl"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "notes.pkl is not a long-video feature file" in errors[0], errors

  (tmp_path / "questions.jsonl").write_text("".join(json.dumps({"id": name, "video": name, "question": "Who counts?"})
                                                    + "\n" for name in ("movie.pkl", "notes.pkl")))
  proc = subprocess.run(CLI + ["infer", "--model", "model", "--input", "questions.jsonl", "--output", "answers.jsonl",
                               "--max-new-tokens", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]  # an item failed
  answers = {r["id"]: r for r in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
  assert "answer" in answers["movie.pkl"] and "not a long-video feature file" in answers["notes.pkl"]["error"], answers


SRT = ("\ufeff1\r\n00:00:00,500 --> 00:00:01,000\r\nHello.\r\n\r\n"
       "2\r\n00:00:01,200 --> 00:00:02,700\r\n<i>Where</i> are we\r\ngoing?<image>\r\n\r\n"
       "00:00:03.000 --> 00:00:09.000\r\nHome.\r\n")  # no number, "." before the milliseconds


def reference_inputs(subtitles, frame_time) -> str:
  """The reference extraction's placing of subtitles (end times ascending) after frames."""
  point, text_list = 0, [[] for _ in frame_time]
  for item in subtitles:
    while point < len(frame_time) and frame_time[point] < item.end:
      point += 1
    text_list[point - 1].append(item.text)
  return "".join("<image>" + " ".join(t) for t in text_list)


def test_subtitles_placed_as_the_reference_places_them(tmp_path):
  (tmp_path / "a.srt").write_text(SRT, newline="")
  subtitles = long_video.read_srt(str(tmp_path / "a.srt"))
  assert subtitles == [long_video.Subtitle(0.5, 1.0, "Hello."), long_video.Subtitle(1.2, 2.7, "Where are we going?"),
                       long_video.Subtitle(3.0, 9.0, "Home.")]  # markup (and a mark inside it) removed
  times = np.arange(5.0)
  assert long_video.subtitled(times, subtitles) == "<image>Hello.<image><image>Where are we going?<image><image>Home."
  rng = np.random.default_rng(0)
  for _ in range(50):
    times = np.cumsum(np.r_[0.0, rng.uniform(0.1, 2.0, 29)])  # a video's first frame is at 0 s
    ends = np.sort(rng.uniform(0.05, 70.0, 40))
    subtitles = [long_video.Subtitle(end - 1.0, float(end), f"line {k}.") for k, end in enumerate(ends)]
    assert long_video.subtitled(times, subtitles) == reference_inputs(subtitles, times)
  (tmp_path / "empty.srt").write_text("\n")
  assert long_video.read_srt(str(tmp_path / "empty.srt")) == []
  (tmp_path / "b.srt").write_text("1\n00:00:01 --> 00:00:02\nNo milliseconds.\n")
  with pytest.raises(ValueError, match=r"b.srt: subtitle 1 has no timing line"):
    long_video.read_srt(str(tmp_path / "b.srt"))


def test_make_feature_files_command(files, tmp_path):
  """`vllm-jax make-feature-files` as a user types it: each video's frames at 1 fps through the
  model's ViT, float16 with CLS, the .srt beside it placed between them; a bad video named and
  skipped (status 1); a second run keeps what is there; bad arguments one error line."""
  from test_video_loading import write_video
  root, config, _, _ = files
  os.symlink(root / "model", tmp_path / "model")
  movies = tmp_path / "movies"
  movies.mkdir()
  write_video(movies / "a.mp4", num_frames=50, fps=10)  # 5 s: frames at 0, 1, 2, 3, 4 s
  write_video(movies / "b.mp4", num_frames=20, fps=10)
  (movies / "a.srt").write_text(SRT, newline="")
  (movies / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
  command = CLI + ["make-feature-files", "--model", "model", "--out", "features"]
  proc = subprocess.run(command + ["movies/a.mp4", "movies/bad.mp4", "movies/b.mp4"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "skipping movies/bad.mp4" in proc.stderr, proc.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "features")) == ["a.pkl", "b.pkl"]

  system = LlamaVidSystem.load(str(root / "model"))
  media = system.load_media(str(movies / "a.mp4"))
  want = system.encode_media([media])[0].read(0, 5)
  written = pickle.loads((tmp_path / "features" / "a.pkl").read_bytes())
  assert written["feats"].dtype == np.float16 and written["feats"].shape == (5, 1 + config.vit.grid ** 2, 32)
  np.testing.assert_array_equal(written["feats"], want.astype(np.float16))
  assert written["inputs"] == "<image>Hello.<image><image>Where are we going?<image><image>Home."
  assert long_video.load(str(tmp_path / "features" / "b.pkl")).prompt() == "<image>" * 2

  before = (tmp_path / "features" / "a.pkl").stat().st_mtime_ns
  proc = subprocess.run(command + ["movies/a.mp4"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "1 of 1 feature files already in features" in proc.stderr, proc.stderr[-3000:]
  assert (tmp_path / "features" / "a.pkl").stat().st_mtime_ns == before

  for args, message in [(["movies/c.mp4"], "no such video file: movies/c.mp4"),
                        (["features/a.pkl"], "features/a.pkl is a feature file already"),
                        (["movies/a.mp4", "movies/a.mkv"], "two videos would both be written as a.pkl in features")]:
    if "movies/a.mkv" in args:
      shutil.copy(movies / "a.mp4", movies / "a.mkv")
    proc = subprocess.run(command + args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_make_feature_files_from_and_to_a_bucket(files, gcs, tmp_path):
  """Videos and subtitles in a bucket, feature files written to one: the bytes of a local run."""
  from test_video_loading import write_video
  root, _, _, _ = files
  write_video(tmp_path / "a.mp4", num_frames=30, fps=10)
  (tmp_path / "a.srt").write_text(SRT, newline="")
  bucket = gcs("movies")
  for name in ("a.mp4", "a.srt"):
    paths.write_bytes(f"{bucket}/videos/{name}", (tmp_path / name).read_bytes())
  proc = subprocess.run(CLI + ["make-feature-files", "--model", str(root / "model"), f"{bucket}/videos/a.mp4",
                               "--out", f"{bucket}/features"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  system = LlamaVidSystem.load(str(root / "model"))
  want = system.feature_file(str(tmp_path / "a.mp4"), long_video.read_srt(str(tmp_path / "a.srt")))
  assert paths.read_bytes(f"{bucket}/features/a.pkl") == want
