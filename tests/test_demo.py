"""`vllm-jax demo`, shortened (a few videos and steps): every artefact is produced, through the
training, `eval` and `chat` code paths; and the report marks inexact captions and keeps its text inside."""

import json
import os

import pytest

from vllm_jax import cli, demo
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import synthetic
from vllm_jax.eval import synthetic as eval_synthetic
from vllm_jax.train import trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.make_dataset(str(tmp_path_factory.mktemp("synthetic")), num_train=12, num_val=3, progress=False)


def test_short_demo_writes_every_artefact(tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", f"--config.demo.workdir={workdir}", "--config.demo.num_train=8",
                   "--config.demo.num_val=4", "--config.demo.eval_batch_size=4", "--config.train.steps=3",
                   "--config.train.batch_size=8", "--config.train.log_every=1",
                   "--config.model.llama.num_layers=1", "--config.model.vision.video_qformer.num_layers=1"]) == 0
  out = capsys.readouterr().out
  assert "held-out accuracy (4 videos)" in out and "sound" in out and "$ vllm-jax chat" in out
  assert "exact" in out.split("held-out accuracy")[1].split("report:")[0]

  for name in ("train.csv", "train.json", "val.csv", "videos/val/val00003.mp4"):
    assert os.path.isfile(workdir / "dataset" / name)
  assert os.path.isdir(workdir / "train" / "checkpoints" / "3")
  assert os.path.isfile(workdir / "model" / "config.json")
  assert [m["step"] for m in trainer.read_metrics(workdir / "train")] == [1, 2, 3]
  with open(workdir / "accuracy.json") as f:
    assert set(json.load(f)) == {"colour", "shape", "direction", "sound", "exact"}
  # The evaluation's own files: an answer and the scores of every held-out video.
  with open(workdir / "eval" / "answers.jsonl") as f:
    assert sorted(json.loads(line)["id"] for line in f) == [f"val{k:05d}" for k in range(4)]
  with open(workdir / "eval" / "results.json") as f:
    assert set(json.load(f)["overall"]) >= {"colour", "shape", "direction", "sound", "exact"}
  with open(workdir / "report.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_marks_inexact_captions_and_keeps_text_inside(dataset):
  items = eval_synthetic.load(dataset["val_csv"])
  # The longest answer the demo lets the model write (24 tokens) that repeats the caption.
  repeated = items[0].answer.replace(" with ", " with " + items[0].answer + " with ", 1)
  rows = [dict(item=item, answer=answer, scores=eval_synthetic.score(item, answer))
          for item, answer in zip(items, [repeated, items[1].answer, items[2].answer.upper() + "."])]
  assert [r["scores"]["exact"] for r in rows] == [0, 1, 1]
  acc = {name: 0.5 for name in demo.CHANCE}
  fig = demo.report_figure([3.0, 1.0, 0.1], acc, rows, title="demo", num_examples=3)
  fig.canvas.draw()  # lays out every artist (legend entries included) as savefig would
  renderer = fig.canvas.get_renderer()
  texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() and a.get_visible())]
  for text in texts:
    box = text.get_window_extent(renderer)
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, text.get_text()
  answers = {t.get_text().replace("\n", " "): t.get_color() for t in texts if "model:" in t.get_text()}
  assert sorted(answers.values()) == ["tab:green", "tab:green", "tab:red"]
  assert [c for a, c in answers.items() if a.startswith("✗")] == ["tab:red"]


@pytest.mark.parametrize("with_audio", [True, False])
def test_every_prompt_token_is_trained(dataset, tmp_path, with_audio):
  """The demo's tokenizer has no piece that only the inference prompts hold (such as "▁###" or
  "▁Describe"): the embedding of such a piece would never train."""
  from vllm_jax.data import datasets
  from vllm_jax.data.audio import AudioClipConfig
  from vllm_jax.data.tokenizer import train_tokenizer
  from vllm_jax.systems.video_llama import Decode, VideoLlamaSystem
  train_tokenizer(demo.tokenizer_texts(dataset, with_audio=with_audio), str(tmp_path), vocab_size=640)
  tokenizer = VideoLlamaSystem.training_tokenizer(str(tmp_path))
  common = dict(tokenizer_dir=str(tmp_path), seq_len=256, max_text_len=256, num_frames=8, image_size=32,
                num_video_tokens=8, num_audio_tokens=4, sampling="uniform", train_crop=False,
                audio=AudioClipConfig(num_clips=2) if with_audio else None)
  trained = set()
  for stage, records in ((1, datasets.webvid_records(dataset["train_csv"], dataset["videos"])),
                         (2, datasets.llava_records(dataset["train_json"], dataset["videos"]))):
    for record in records:
      trained |= set(Decode(stage=stage, **common)(record)["input_ids"].tolist())
  for question in synthetic.QUESTIONS:
    conv = conv_lib.Conversation.for_media(conv_lib.VICUNA_V0, demo.FRAME_TIMES, with_audio=with_audio)
    conv.ask(question)
    ids = conv_lib.encode_pieces(tokenizer, [(conv.prompt(), False)])[0]
    assert not [tokenizer.convert_ids_to_tokens(i) for i in ids if i not in trained], question
