"""Bad invocations of every command, typed as a user types them in a working folder of their own:
each ends with status 2 and one `error:` line that says what is wrong (no traceback), before any
model loads where it can, and leaves every file as it was, writing nothing. The kinds: config values
out of range or misspelled, data files of the wrong layout or empty or whose media are all missing,
outputs that cannot be written (a read-only folder, a full disk, a file where a folder should be,
a folder of other files), inputs of the wrong kind, and a device that is not there.

A read-only folder (`ro`) and a full disk (`full`, 96 KiB) are file systems mounted in the
command's own mount namespace (`unshare`): the working folder itself is never made read-only."""

import json
import os
import shutil
import subprocess

import pytest
import torch
import transformers

from test_cli_errors import folders  # noqa: F401  (the fixture)
from test_multiprocess import ROOT, tiny_run
from test_never_overwrite import error_line, snapshot, user  # noqa: F401  (fixtures)
from test_relative_paths import CLI
from test_video_llava import hf_config

MOUNTS = 'mount -t tmpfs -o size=96k tmpfs full && mount -t tmpfs -o ro,size=64k tmpfs ro && exec "$@"'


def can_mount() -> bool:
  try:
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
                          timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


@pytest.fixture(scope="module")
def data(user):  # noqa: F811
  """What the cases read: the tiny Video-LLaVA run's data (`tiny_run`, in ../data) and its command
  with relative paths, data files of other layouts, a Video-LLaVA HF folder, an image, and the `ro`
  and `full` mount points."""
  root, work = user.root, user.work
  (root / "data").mkdir()
  train = [arg.replace(f"{root}/", "../").replace(os.path.join(ROOT, "configs"), "my configs")
           for arg in tiny_run(root / "data")]
  data = root / "data"
  (data / "empty.json").write_text("[]")
  (data / "object.json").write_text(json.dumps({"conversations": []}))
  (data / "no conversations.json").write_text(json.dumps([{"id": "0", "image": "img0.png"}]))
  (data / "header only.csv").write_text("videoid,contentUrl,duration,page_dir,name\n")
  (data / "webvid.csv").write_text("videoid,contentUrl,duration,page_dir,name\nv1,,PT00H00M10S,p1,a dog runs\n")
  torch.manual_seed(0)
  transformers.VideoLlavaForConditionalGeneration(hf_config()).save_pretrained(str(work / "video-llava hf"))
  shutil.copy(data / "media" / "img0.png", work / "photo.png")
  (work / "ro").mkdir()
  (work / "full").mkdir()
  return train[3:]  # after `python -m vllm_jax.cli`


TINY_VIDEO_LLAMA = ["train", "--config", "my configs/video_llama.py:tiny_stage1",
                    "--config.data.tokenizer=../data/tokenizer", "--config.model.llama.vocab_size=512"]
TRAIN = object()  # stands for the tiny Video-LLaVA run's `train` arguments

# command -> [(case, arguments typed, what the error line says, environment)]
CASES = {
    "train": [
        ("a misspelled section", [TRAIN, "--config.trian.steps=3"],
         "--config.trian.steps: the config has no section trian; did you mean train?", {}),
        ("a misspelled field", [TRAIN, "--config.train.stepz=3"], "no field train.stepz; did you mean train.steps?",
         {}),
        ("a section set to a value", [TRAIN, "--config.optim=fast"], "--config.optim=fast: optim is a section", {}),
        ("a field of a section the recipe leaves unset", [TRAIN, "--config.model.llama.lora.rank=4"],
         "model.llama.lora is not set (None)", {}),
        ("no steps", [TRAIN, "--config.train.steps=0"], "--config.train.steps=0: must be an integer of at least 1", {}),
        ("a fractional step count", [TRAIN, "--config.train.steps=1.5"], "--config.train.steps=1.5: must be an integer",
         {}),
        ("a negative batch", [TRAIN, "--config.train.batch_size=-8"], "--config.train.batch_size=-8: must be", {}),
        ("logging every 0 steps", [TRAIN, "--config.train.log_every=0"], "--config.train.log_every=0: must be", {}),
        ("checkpointing every 0 steps", [TRAIN, "--config.train.checkpoint_every=0"],
         "--config.train.checkpoint_every=0: must be", {}),
        ("a learning rate of nan", [TRAIN, "--config.optim.lr=nan"],
         "--config.optim.lr=nan: must be a finite number of at least 0", {}),
        ("texts of 0 tokens", [TRAIN, "--config.data.max_text_len=0"], "--config.data.max_text_len=0: must be", {}),
        ("a mesh axis of 0 devices", [TRAIN, "--config.mesh.data=0"], "or -1 (the remaining devices)", {}),
        ("an unknown dtype", [TRAIN, "--config.compute_dtype=fp16"], "--config.compute_dtype='fp16': must be one of",
         {}),
        ("a missing annotation file", [TRAIN, "--config.data.instruct_json=../data/nothere.json"],
         "--config.data.instruct_json=../data/nothere.json: no such file", {}),
        ("an empty annotation list", [TRAIN, "--config.data.instruct_json=../data/empty.json"],
         "../data/empty.json holds no records: expected LLaVA JSON", {}),
        ("a JSON object where a list belongs", [TRAIN, "--config.data.instruct_json=../data/object.json"],
         "../data/object.json is not LLaVA JSON", {}),
        ("entries without conversations", [TRAIN, "--config.data.instruct_json=../data/no conversations.json"],
         "is not LLaVA JSON ([{\"id\", \"image\" | \"video\", \"conversations\": [{\"from\", \"value\"}, ...]}, ...]): "
         "an entry has no 'conversations'", {}),
        ("media all missing", [TRAIN, "--config.data.instruct_dir=../data"], "records in a row could not be read", {}),
        ("a header-only CSV", [*TINY_VIDEO_LLAMA, "--config.data.webvid_csv=../data/header only.csv"],
         "../data/header only.csv holds no records: expected a WebVid CSV", {}),
        ("a workdir under a file", [TRAIN, "--config.train.workdir=notes.txt/run"],
         "notes.txt: Not a directory (a part of the path is a file, not a folder)", {}),
        ("a workdir of other files", [TRAIN, "--config.train.workdir=my configs"],
         "--config.train.workdir my configs holds other files", {}),
        ("a read-only workdir", [TRAIN, "--config.train.workdir=ro/run"], "ro: Read-only file system", {}),
        ("checkpoints into a full disk", [TRAIN, "--config.train.workdir=full/run", "--config.train.steps=2",
                                          "--config.train.checkpoint_every=1"],
         "full/run/checkpoints: No space left on device, writing a checkpoint (the earlier ones are kept)", {}),
        ("a device the machine lacks", [TRAIN], "Unable to initialize backend 'tpu' (JAX_PLATFORMS=tpu)",
         {"JAX_PLATFORMS": "tpu"}),
    ],
    "convert": [
        ("another system's folder", ["convert", "llama", "--hf-dir", "video-llava hf", "--out", "new"],
         "video-llava hf holds a 'video_llava' model, not a LLaMA", {}),
        ("a text file as a checkpoint", ["convert", "video-llama", "--config", "tiny", "--llama-dir", "hf", "--vl",
                                         "notes.txt", "--out", "new"],
         "notes.txt is not a PyTorch checkpoint (torch.save's zip file)", {}),
        ("an output under a file", ["convert", "llama", "--hf-dir", "hf", "--out", "notes.txt/new"],
         "notes.txt: Not a directory", {}),
        ("a read-only output", ["convert", "llama", "--hf-dir", "hf", "--out", "ro/new"], "ro: Read-only file system",
         {}),
        ("an output into a full disk", ["convert", "llama", "--hf-dir", "hf", "--out", "full/new"],
         "full/new/params: No space left on device, writing the parameters", {}),
    ],
    "infer": [
        ("a read-only output", ["infer", "--model", "model", "--input", "questions.jsonl", "--output", "ro/a.jsonl"],
         "argument --output: ", {}),
        ("an output under a file", ["infer", "--model", "model", "--input", "questions.jsonl", "--output",
                                    "notes.txt/a.jsonl"], "notes.txt: Not a directory", {}),
    ],
    "eval": [
        ("another format's file", ["eval", "--model", "model", "--format", "synthetic", "--annotations",
                                   "../data/webvid.csv", "--out", "new"],
         "../data/webvid.csv is not a synthetic annotation file: an entry has no", {}),
        ("an output that is a file", ["eval", "--model", "model", "--format", "synthetic", "--annotations",
                                      "questions.jsonl", "--out", "notes.txt"], "--out notes.txt is a file", {}),
        ("an output of other files", ["eval", "--model", "model", "--format", "synthetic", "--annotations",
                                      "questions.jsonl", "--out", "my configs"],
         "--out my configs holds other files", {}),
        ("a read-only output", ["eval", "--model", "model", "--format", "synthetic", "--annotations",
                                "questions.jsonl", "--out", "ro/eval"], "ro: Read-only file system", {}),
    ],
    "cache-features": [
        ("an output that is a file", ["cache-features", "--config", "my configs/video_llama.py:tiny_stage1",
                                      "--out", "notes.txt"], "--out notes.txt is a file", {}),
        ("an output of other files", ["cache-features", "--config", "my configs/video_llama.py:tiny_stage1",
                                      "--out", "my configs"], "--out my configs holds other files", {}),
        ("a batch of 0", ["cache-features", "--config", "my configs/video_llama.py:tiny_stage1",
                          "--config.train.batch_size=0", "--out", "new"], "--config.train.batch_size=0: must be", {}),
    ],
    "export": [
        ("a read-only output", ["export", "--workdir", "run", "--out", "ro/model"], "ro: Read-only file system", {}),
        ("an output under a file", ["export", "--workdir", "run", "--out", "notes.txt/model"],
         "notes.txt: Not a directory", {}),
    ],
    "chat": [
        ("a video and an image", ["chat", "--model", "model", "--video", "photo.png", "--image", "photo.png"],
         "argument --image: not allowed with argument --video", {}),
        ("a text file as an image", ["chat", "--model", "model", "--image", "notes.txt", "--question", "?"],
         "--image notes.txt: not an image file", {}),
        ("an image as a video", ["chat", "--model", "model", "--video", "photo.png", "--question", "?"],
         "--video photo.png is an image: give it as --image", {}),
    ],
    "plan": [
        ("a batch of 0", ["plan", "--config", "my configs/video_llama.py:stage1", "--config.train.batch_size=0"],
         "--config.train.batch_size=0: must be", {}),
    ],
}
MOUNTED = ("ro/", "full/")
# A save that fills the disk fails in orbax's background threads, some of which may still print the
# failure of their own writes while the command ends (timing): the one error line is all that is asked.
RACING_THREADS = {"checkpoints into a full disk"}


@pytest.mark.parametrize("command,case", [(command, case[0]) for command, cases in CASES.items() for case in cases])
def test_a_bad_invocation_is_one_error_line_and_changes_nothing(user, data, command, case):  # noqa: F811
  _, typed, message, env = next(c for c in CASES[command] if c[0] == case)
  args = [a for arg in typed for a in (data if arg is TRAIN else [arg])]
  argv = [*CLI, *args]
  if any(mount in arg for arg in args for mount in MOUNTED):
    if not can_mount():
      pytest.skip("no user namespaces to mount a read-only folder or a full disk in")
    argv = ["unshare", "-rm", "sh", "-c", MOUNTS, "sh", *argv]
  before = snapshot(user.root / "data"), snapshot(user.work)
  proc = subprocess.run(argv, cwd=user.work, env={**user.env, **env}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  if case in RACING_THREADS:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
  else:
    assert message in error_line(proc.stderr), proc.stderr[-3000:]
  assert (snapshot(user.root / "data"), snapshot(user.work)) == before


def test_quiet_is_taken_after_any_command():
  help_text = subprocess.run([*CLI, "convert", "llama", "--help"], capture_output=True, text=True).stdout
  assert "-q, --quiet" in help_text
