"""`vllm-jax demo`, shortened (a few videos and steps): every artefact is produced, through the
training, `infer` and `chat` code paths."""

import json
import os

from vllm_jax import cli


def test_short_demo_writes_every_artefact(tmp_path, capsys):
  workdir = tmp_path / "demo"
  assert cli.main(["demo", f"--config.demo.workdir={workdir}", "--config.demo.num_train=8",
                   "--config.demo.num_val=4", "--config.demo.eval_batch_size=4", "--config.train.steps=3",
                   "--config.train.batch_size=8", "--config.train.log_every=1",
                   "--config.model.llama.num_layers=1", "--config.model.vision.video_qformer.num_layers=1"]) == 0
  out = capsys.readouterr().out
  assert "held-out accuracy (4 videos)" in out and "sound" in out and "$ vllm-jax chat" in out

  for name in ("train.csv", "train.json", "val.csv", "videos/val/val00003.mp4"):
    assert os.path.isfile(workdir / "dataset" / name)
  assert os.path.isdir(workdir / "train" / "checkpoints" / "3")
  assert os.path.isfile(workdir / "model" / "config.json")
  with open(workdir / "train" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  with open(workdir / "accuracy.json") as f:
    assert set(json.load(f)) == {"colour", "shape", "direction", "sound"}
  with open(workdir / "report.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
