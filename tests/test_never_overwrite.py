"""Nothing a user owns is overwritten or half-written by `convert`, `export` or `infer`, each run as
a user types it, with relative paths in a working folder of its own: an output that exists and is
not the command's to extend, or that is (or holds) an input, is refused with one
`error:` line and status 2 before any model loads, and every file is left byte for byte;
`--overwrite` replaces a folder whole; a failing conversion leaves the old folder as it was. Folders
are written beside their place and moved there once complete (`paths.staged_folder`), locally and
in a bucket."""

import hashlib
import json
import shutil

import pytest

from test_cli_errors import folders  # noqa: F401  (the fixture)
from test_relative_paths import User
from vllm_jax import paths


@pytest.fixture(scope="module")
def user(tmp_path_factory, folders):  # noqa: F811
  """A working folder of what a user owns: questions (and a link to them), notes, another command's
  answers, an HF LLaMA folder, two model folders, a BERT tokenizer and a PEFT adapter folder (the
  refusals come before any of them is read, so stand-ins do), and a run's workdir whose init_from is
  `model`."""
  user = User(tmp_path_factory.mktemp("never_overwrite"), tmp_path_factory.mktemp("jax_cache"))
  work = user.work
  (work / "questions.jsonl").write_text(json.dumps({"video": "a.mp4", "question": "What happens?"}) + "\n")
  (work / "questions link.jsonl").symlink_to("questions.jsonl")
  (work / "notes.txt").write_text("my notes, with no newline at the end")
  (work / "eval answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      {"key": "q1", "id": "q1", "category": "c", "question": "?", "answer": "yes"},
      {"key": "q2", "id": "q2", "category": "c", "error": "FileNotFoundError: b.mp4"}]))
  shutil.copytree(folders / "hf", work / "hf")
  for name, files in {"model": ["config.json", "params/data", "tokenizer/tokenizer.model"],
                      "other model": ["config.json", "params/data"], "bert": ["vocab.txt"],
                      "adapter": ["adapter_config.json", "adapter_model.safetensors"]}.items():
    for file in files:
      (work / name / file).parent.mkdir(parents=True, exist_ok=True)
      (work / name / file).write_text(f"{name}/{file}")
  (work / "run").mkdir()
  (work / "run" / "run.json").write_text(json.dumps({"system": "video_llava", "init_from": str(work / "model"),
                                                     "config": {}}))
  return user


def snapshot(root) -> dict[str, str]:
  """Every path under `root` (hidden ones too) -> the hash of its bytes, or "folder"."""
  return {str(p.relative_to(root)): "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in root.rglob("*")}


def error_line(err: str) -> str:
  """The one `error:` line of a command's stderr (and no traceback)."""
  errors = [line for line in err.splitlines() if "error:" in line]
  assert "Traceback" not in err and len(errors) == 1, err
  return errors[0]


INFER = ["infer", "--model", "model", "--input", "questions.jsonl", "--output"]
CONVERT_LLAMA = ["convert", "llama", "--hf-dir", "hf", "--out"]
EXPORT = ["export", "--workdir", "run"]
REFUSED = {  # what a user typed -> what the error line says
    "infer --output is --input": (
        [*INFER, "questions.jsonl"], "error: --output questions.jsonl is --input questions.jsonl: give another path"),
    "infer --output links to --input": (
        [*INFER, "questions link.jsonl"], "error: --output questions link.jsonl is --input questions.jsonl"),
    "infer --output is a user's file": (
        [*INFER, "notes.txt"], "error: --output notes.txt is not an answers file of infer (line 1 is not one of "
                               "its records): it is left as it is; give another file"),
    "infer --output holds eval's answers": (
        [*INFER, "eval answers.jsonl"], "is not an answers file of infer (line 1 is not one of its records)"),
    "infer --output is a folder": ([*INFER, "model"], "argument --output: model is a folder: give a file"),
    "convert llama": (
        [*CONVERT_LLAMA, "model"], "error: --out model already exists: give a new (or empty) folder, or add "
                                   "--overwrite to replace it"),
    "convert video-llama": (
        ["convert", "video-llama", "--config", "tiny", "--llama-dir", "hf", "--out", "model"],
        "error: --out model already exists"),
    "convert video-llava": (["convert", "video-llava", "--hf-dir", "hf", "--out", "model/"],
                            "error: --out model/ already exists"),
    "convert llama-vid": (["convert", "llama-vid", "--model-dir", "hf", "--bert-tokenizer", "bert", "--out", "./model"],
                          "error: --out ./model already exists"),
    "convert peft": (["convert", "peft", "--model", "model", "--adapter", "adapter", "--out", "other model"],
                     "error: --out other model already exists"),
    "convert peft --out is --model, even with --overwrite": (
        ["convert", "peft", "--model", "model", "--adapter", "adapter", "--out", "model", "--overwrite"],
        "error: --out model is --model model: give another path"),
    "convert llama --out is --hf-dir, even with --overwrite": (
        [*CONVERT_LLAMA, "hf", "--overwrite"], "error: --out hf is --hf-dir hf"),
    "convert llama --out holds --hf-dir, even with --overwrite": (
        [*CONVERT_LLAMA, ".", "--overwrite"], "error: --out . holds --hf-dir hf"),
    "convert llama --out is a file": ([*CONVERT_LLAMA, "notes.txt"], "error: --out notes.txt already exists"),
    "export --out is the run's init_from, even with --overwrite": (
        [*EXPORT, "--out", "model", "--overwrite"], "error: --out model is the run's init_from model"),
    "export --out": ([*EXPORT, "--out", "other model"], "error: --out other model already exists"),
    "export --peft": ([*EXPORT, "--peft", "adapter"], "error: --peft adapter already exists"),
    "export --hf-llama": ([*EXPORT, "--hf-llama", "hf"], "error: --hf-llama hf already exists"),
    "export --out holds --workdir, even with --overwrite": (
        [*EXPORT, "--out", ".", "--overwrite"], "error: --out . holds --workdir run"),
    "export --peft is --out": ([*EXPORT, "--out", "new", "--peft", "new"], "error: --peft new is --out new"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_an_output_that_is_not_the_commands_to_write_is_refused(user, case):
  args, message = REFUSED[case]
  before = snapshot(user.work)
  err = user.vllm_jax(*args, status=2).stderr
  assert message in error_line(err), err
  assert snapshot(user.work) == before


def test_overwrite_replaces_a_folder_whole(user):
  user.vllm_jax(*CONVERT_LLAMA, "fresh", creates=["fresh"])
  shutil.copytree(user.work / "model", user.work / "replaced")  # an old tokenizer/ and params/
  (user.work / "replaced" / "extra.txt").write_text("a file of the old folder")
  user.vllm_jax(*CONVERT_LLAMA, "replaced", "--overwrite", creates=["replaced"])
  replaced, fresh = user.work / "replaced", user.work / "fresh"
  assert sorted(p.name for p in replaced.iterdir()) == sorted(p.name for p in fresh.iterdir())
  assert not (replaced / "params" / "data").exists()  # orbax names its files at random: no other comparison
  assert (replaced / "config.json").read_text() == (fresh / "config.json").read_text()


def test_a_failed_conversion_leaves_the_old_folder_as_it_was(user, folders):  # noqa: F811
  shutil.copytree(folders / "truncated", user.work / "truncated hf")
  before = snapshot(user.work)
  err = user.vllm_jax("convert", "llama", "--hf-dir", "truncated hf", "--out", "model", "--overwrite", status=2).stderr
  assert "model.safetensors is truncated" in error_line(err)
  assert snapshot(user.work) == before


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_staged_folder_appears_whole_or_not_at_all(where, tmp_path, request):
  root = str(tmp_path) if where == "local" else request.getfixturevalue("gcs")("staged")
  out = paths.join(root, "model")
  paths.write_text(paths.join(out, "old.txt"), "old")
  with pytest.raises(KeyboardInterrupt), paths.staged_folder(out, replace=True) as staging:
    paths.write_text(paths.join(staging, "params", "new.txt"), "half written")
    raise KeyboardInterrupt
  assert paths.listdir(root) == ["model"] and paths.listdir(out) == ["old.txt"]
  with paths.staged_folder(out, replace=True) as staging:
    paths.write_text(paths.join(staging, "params", "new.txt"), "new")
  assert paths.listdir(root) == ["model"] and paths.listdir(out) == ["params"]
  assert paths.read_text(paths.join(out, "params", "new.txt")) == "new"


def test_a_staged_folder_names_what_a_killed_run_left(tmp_path, caplog):
  (tmp_path / ".model.partial-0123abcd" / "params").mkdir(parents=True)  # a conversion SIGKILLed midway
  with paths.staged_folder(str(tmp_path / "model")) as staging:
    paths.write_text(paths.join(staging, "config.json"), "{}")
  assert any(".model.partial-0123abcd, left by a run that was killed while writing model" in m for m in caplog.messages)
  assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial-0123abcd", "model"]  # another run's: kept
