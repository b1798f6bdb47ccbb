"""Every command that takes a path, run as a user types it in a working folder, with relative paths:
`name`, `./name/`, `../name` (beside the working folder), names with a space and `~/name` (HOME is a
temporary folder). Each command exits with 0 and writes exactly where its paths point, nothing
elsewhere (no `gs:` or `~` folder, nothing beside the output); bad paths give one `error:` line
and status 2, and nothing is written."""

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import jax
import numpy as np
import pytest

from test_multiprocess import ROOT, tiny_run
from vllm_jax.converters import peft
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.nn.lora import LoraConfig
from vllm_jax.train.trainer import read_metrics

CLI = [sys.executable, "-m", "vllm_jax.cli"]
DEMO = ["--config.demo.num_train=8", "--config.demo.num_val=4", "--config.demo.eval_batch_size=4",
        "--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
        "--config.model.llama.num_layers=1", "--config.model.vision.video_qformer.num_layers=1"]
VAL_CSV = ("videoid,contentUrl,duration,page_dir,name,colour,shape,direction,sound\n"
           "val00000,,PT00H00M03S,val,a red circle moves down with noise,red,circle,down,noise\n")


class User:
  """Types commands in `root`/work, with HOME at `root`/home; the recipes are in work/"my configs"."""

  def __init__(self, root, jax_cache):
    self.root, self.work, self.home = root, root / "work", root / "home"
    shutil.copytree(os.path.join(ROOT, "configs"), self.work / "my configs")
    self.home.mkdir()
    self.env = dict(os.environ, HOME=str(self.home), JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONDONTWRITEBYTECODE="1")

  def path(self, typed):
    """Where a path typed in the working folder points."""
    if typed.startswith("~/"):
      return os.path.join(self.home, typed[2:])
    return os.path.normpath(os.path.join(self.work, typed))

  def files(self):
    """Everything under root, less HOME's hidden folders (the caches of matplotlib, torch...)."""
    return {p for p in map(str, self.root.rglob("*")) if not p.startswith(str(self.home / "."))}

  def check_writes(self, before, creates):
    """Every path in `creates` (as typed) exists, and nothing was written outside them since `before`."""
    targets = [self.path(p) for p in creates]
    assert all(os.path.exists(t) for t in targets), [t for t in targets if not os.path.exists(t)]
    stray = sorted(p for p in self.files() - before if not any(p == t or p.startswith(t + "/") for t in targets))
    assert not stray, stray

  def run(self, *argv, creates=(), status=0):
    """`argv` run in the working folder: it exits with `status` and writes only `creates`. -> its process."""
    before = self.files()
    proc = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, f"{argv[1:]} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    self.check_writes(before, creates)
    return proc

  def vllm_jax(self, *args, **expected):
    return self.run(*CLI, *args, **expected)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  return User(tmp_path_factory.mktemp("relative"), tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def demo(user):
  """`vllm-jax demo` with its default workdir (runs/demo), shortened as test_demo shortens it. -> its stdout."""
  return user.vllm_jax("demo", *DEMO, creates=["runs"]).stdout


def test_convert_llama_and_peft_then_serve(user, tmp_path):
  user.run(sys.executable, os.path.join(ROOT, "launch", "make_random_llama.py"), "../hf llama", "--hidden", "64",
           "--layers", "1", creates=["../hf llama"])
  user.vllm_jax("convert", "llama", "--hf-dir", "../hf llama", "--out", "./llama/", creates=["llama"])
  assert os.path.isfile(user.work / "llama" / "config.json") and os.path.isdir(user.work / "llama" / "params")

  # A PEFT adapter for it (random), put in with `convert peft`; the result is served.
  config = LlamaConfig.from_dict(json.loads((user.work / "llama" / "config.json").read_text())["llama"])
  config = config.replace(lora=LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("q", "v")))
  rng = np.random.default_rng(0)
  adapter = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype), peft.abstract_adapter(config))
  peft.save_adapter(config, adapter, str(user.root / "peft adapter"))
  user.vllm_jax("convert", "peft", "--model", "llama", "--adapter", "../peft adapter", "--out", "~/llama lora",
                creates=["~/llama lora"])
  assert os.path.isfile(user.home / "llama lora" / "config.json")

  before = user.files()
  with open(tmp_path / "serve.err", "w") as err, subprocess.Popen(
      [*CLI, "serve", "--model", "~/llama lora", "--port", "0", "--max-new-tokens", "4"], cwd=user.work, env=user.env,
      stdout=subprocess.PIPE, stderr=err, text=True) as server:
    try:  # it prints its URL once the model is loaded
      url = next((re.search(r" at (\S+)/v1 ", line)[1] for line in server.stdout if line.startswith("serving")), None)
      assert url, (tmp_path / "serve.err").read_text()[-3000:]
      body = {"messages": [{"role": "user", "content": "What is a llama?"}], "max_tokens": 4}
      request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                       {"Content-Type": "application/json"})
      with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200 and isinstance(json.load(response)["choices"][0]["message"]["content"], str)
    finally:
      server.terminate()
  user.check_writes(before, [])


def test_demo_writes_its_default_workdir_under_the_current_folder(user, demo):
  assert os.path.isfile(user.work / "runs" / "demo" / "report.png")
  assert os.path.isfile(user.work / "runs" / "demo" / "model" / "config.json")
  assert re.search(r"\$ vllm-jax chat --model runs/demo/model --video runs/demo/dataset/videos/val/\S+\.mp4 ", demo)


def test_eval_and_infer_a_relative_model(user, demo):
  user.vllm_jax("eval", "--model", "./runs/demo/model/", "--format", "synthetic", "--annotations",
                "runs/demo/dataset/val.csv", "--out", "../eval out", "--batch-size", "4", "--max-new-tokens", "4",
                creates=["../eval out"])
  assert json.loads((user.root / "eval out" / "results.json").read_text())["overall"]["answered"] == 4

  # Media paths in the file start from its folder (here the working folder).
  (user.work / "my questions.jsonl").write_text(json.dumps(
      {"video": "runs/demo/dataset/videos/val/val00001.mp4", "question": "What do you see?"}) + "\n")
  user.vllm_jax("infer", "--model", "runs/demo/model", "--input", "my questions.jsonl", "--output",
                "~/answers.jsonl", "--max-new-tokens", "4", creates=["~/answers.jsonl"])
  assert "answer" in json.loads((user.home / "answers.jsonl").read_text())


def test_cache_features_then_train_from_the_cache_and_a_model_folder(user, demo):
  data = ["--config", "my configs/video_llama.py:tiny_stage1", "--config.init_from=runs/demo/model",
          "--config.data.webvid_csv=runs/demo/dataset/train.csv",
          "--config.data.webvid_dir=./runs/demo/dataset/videos/"]
  user.vllm_jax("cache-features", *data, "--out", "~/feature cache", creates=["~/feature cache"])
  user.vllm_jax("train", *data, "--config.data.feature_cache=~/feature cache", "--config.train.steps=1",
                "--config.train.workdir=../cached run", creates=["../cached run"])
  assert [m["step"] for m in read_metrics(str(user.root / "cached run"))] == [1]
  run = json.loads((user.root / "cached run" / "run.json").read_text())
  assert os.path.samefile(run["init_from"], user.work / "runs" / "demo" / "model")


def test_train_resume_export_then_chat(user):
  """Video-LLaVA's tiny stage 1 from a random init on pngs beside the working folder (../data)."""
  (user.root / "data").mkdir()
  data = [arg.replace(f"{user.root}/", "../").replace(os.path.join(ROOT, "configs"), "my configs")
          for arg in tiny_run(user.root / "data")[3:]]
  args = [*data, "--config.train.save_frozen=true", "--config.train.log_every=1"]
  user.vllm_jax(*args, "--config.train.steps=2", "--config.train.workdir=stage1", creates=["stage1"])
  resumed = user.vllm_jax(*args, "--config.train.steps=3", "--config.train.workdir=./stage1/", creates=["stage1"])
  assert "resumed from step 2" in resumed.stderr
  assert [m["step"] for m in read_metrics(str(user.work / "stage1"))] == [1, 2, 3]

  user.vllm_jax("export", "--workdir", "./stage1/", "--out", "~/exported model", creates=["~/exported model"])
  assert os.path.isfile(user.home / "exported model" / "config.json")
  err = user.vllm_jax("chat", "--model", "~/exported model", "--image", "../data/media/img0.png", "--question",
                      "What is shown?", "--max-new-tokens", "4").stderr
  assert "[image]" in err


@pytest.mark.parametrize("args,message", [
    (["chat", "--model", "missing_model", "--question", "Hi"], "model folder not found: missing_model"),
    (["export", "--workdir", "nowhere", "--out", "x"], "argument --workdir: no such folder: nowhere"),
    (["convert", "llama", "--hf-dir", "../no llama", "--out", "x"], "argument --hf-dir: no such folder: ../no llama"),
    (["infer", "--model", "~/missing", "--input", "no such.jsonl", "--output", "x.jsonl"],
     "argument --input: no such file: no such.jsonl"),
    (["eval", "--model", "missing_model", "--format", "synthetic", "--annotations", "~/val.csv", "--out", "x"],
     "model folder not found: missing_model"),
    (["cache-features", "--config", "my configs/video_llama.py:tiny_stage1", "--config.init_from=./missing/",
      "--out", "x"], "model folder not found: ./missing/"),
], ids=["chat", "export", "convert", "infer", "eval", "cache-features"])
def test_bad_paths_exit_2_with_one_error_line_and_write_nothing(user, args, message):
  (user.home / "val.csv").write_text(VAL_CSV)  # eval's annotations: the other commands stop before any file
  err = user.vllm_jax(*args, status=2).stderr
  errors = [line for line in err.splitlines() if "error:" in line]
  assert "Traceback" not in err and len(errors) == 1 and message in errors[0], err
