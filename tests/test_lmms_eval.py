"""lmms-eval (the field's evaluation harness) runs vllm_jax two ways: as its own model (`--model
vllm_jax`, registered by entry point; at the end of this file), and against a model served by
`vllm-jax serve`: a tiny random Video-LLaMA folder is served the way users serve one, and lmms-eval's OpenAI-compatible model runs a
local open-ended video task (generated mp4s, a jsonl of questions, a task YAML in an include path)
against it, offline. lmms-eval sends a video in one of two ways, both tested:
  - "video_url": `--model openai --model_args ...,pass_video_url=True` sends one
    {"type": "video_url", "video_url": {"url": "file:///abs/clip.mp4"}} part before the text, plus a
    top-level "media_io_kwargs": {"video": {"num_frames": 10}} (the server needs --media-root);
  - "frames": `--force_simple` samples max_frames_num (10) frames with decord and sends the text
    part, then one {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} per frame.
Install (keeps torch, transformers, numpy, jax, av as they are; lmms-eval 0.7.3 needs filelock 3.x):
  pip install --no-deps lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
    pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1
  pip install datasets openai loguru python-dotenv sacrebleu evaluate tenacity "filelock<4"
lmms-eval's default video path (without pass_video_url or --force_simple) needs qwen-vl-utils and
torchvision, which cannot load beside torch 2.13.0+cpu."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from test_eval import save_tiny_video_llama
from test_video_loading import write_video

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (launch/test.sh installs it)")

CORPUS = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left and a blue square up.\n",
          "The video contains 4 frames sampled at 0.0, 1.5 seconds. What colour is the video? Gray."] * 20
DOCS = [("What colour is the video?", "gray"), ("What is moving?", "nothing"), ("Describe the video.", "gray")]
TASK = "vllm_jax_tiny_video"
FAILED = "[LMMS_EVAL_REQUEST_FAILED"  # what lmms-eval records (and scores) for a request that failed


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """(a tiny random vision-only Video-LLaMA folder, the media folder, the task's include path)."""
  root = tmp_path_factory.mktemp("lmms_eval")
  model = save_tiny_video_llama(root, CORPUS)
  media = root / "media"
  media.mkdir()
  docs = [{"id": i, "video": write_video(media / f"clip{i}.mp4", num_frames=12 + 4 * i, size=(32, 32)),
           "question": question, "answer": answer} for i, (question, answer) in enumerate(DOCS)]
  (media / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
  include = root / "tasks"
  include.mkdir()
  (include / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {media / "docs.jsonl"}
test_split: test
output_type: generate_until
doc_to_visual: video
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""")
  return model, str(media), str(include)


@pytest.fixture(scope="module")
def server(task, tmp_path_factory):
  """`vllm-jax serve` of the model, started as users start it -> (the name it serves, its base URL
  http://HOST:PORT/v1): requests must name that model, as with vLLM."""
  model, media, _ = task
  err = tmp_path_factory.mktemp("serve") / "serve.err"
  with open(err, "w") as errors:
    proc = subprocess.Popen([sys.executable, "-m", "vllm_jax.cli", "serve", "--model", model, "--port", "0",
                             "--max-new-tokens", "6", "--media-root", media],
                            stdout=subprocess.PIPE, stderr=errors, text=True)
  found, lines = threading.Event(), []

  def read():  # the URL line comes once the model is loaded; then drain stdout
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("serving ") and " at " in line:
        found.set()
    found.set()

  threading.Thread(target=read, daemon=True).start()
  try:
    found.wait(timeout=600)
    line = next((line for line in lines if line.startswith("serving ")), "")
    name, _, rest = line.removeprefix("serving ").partition(" at ")
    url = rest.split()[0] if rest else ""
    assert name and url.endswith("/v1"), "".join(lines) + err.read_text()[-3000:]
    yield name, url
  finally:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
      proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def lmms_eval(name, url, include, out, *args, model_args=""):
  env = dict(os.environ, OPENAI_API_BASE=url, OPENAI_API_KEY="EMPTY", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             HF_HOME=os.path.join(out, "hf"), TOKENIZERS_PARALLELISM="false")
  argv = [sys.executable, "-m", "lmms_eval", "--model", "openai",
          "--model_args", f"model_version={name},max_retries=1" + model_args, "--tasks", TASK,
          "--include_path", include, "--output_path", os.path.join(out, "results"), "--log_samples",
          "--batch_size", "1", *args]
  return subprocess.run(argv, cwd=out, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("mode", ["video_url", "frames"])
def test_lmms_eval_scores_a_served_video_llama(task, server, tmp_path, mode):
  _, _, include = task
  if mode == "video_url":
    proc = lmms_eval(*server, include, str(tmp_path), model_args=",pass_video_url=True")
  else:
    proc = lmms_eval(*server, include, str(tmp_path), "--force_simple")
  log = (proc.stdout + proc.stderr)[-6000:]
  # lmms-eval exits 0 even when the evaluation raised: its results files are the proof it finished.
  assert proc.returncode == 0 and "Error during evaluation" not in proc.stdout + proc.stderr, log
  results = glob.glob(str(tmp_path / "results" / "**" / "*_results.json"), recursive=True)
  samples = glob.glob(str(tmp_path / "results" / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
  assert len(results) == 1 and len(samples) == 1, log
  scores = json.loads(open(results[0]).read())["results"][TASK]
  assert 0.0 <= scores["exact_match,none"] <= 1.0, scores
  rows = [json.loads(line) for line in open(samples[0])]
  assert sorted(row["doc_id"] for row in rows) == list(range(len(DOCS)))
  for row in rows:  # every document got an answer from the server, not lmms-eval's failure marker
    answer = row["filtered_resps"]
    answer = answer[0] if isinstance(answer, list) else answer
    assert isinstance(answer, str) and not answer.startswith(FAILED), (row, log)
    assert row["target"] == DOCS[row["doc_id"]][1]


# --- vllm_jax as lmms-eval's model (`--model vllm_jax`, registered by entry point) ------------------

CHOICES = [("What moves?", ["a red circle", "a blue square", "nothing"], 1),
           ("Which way?", ["left", "right", "up", "down"], 2),
           ("How many?", ["one", "two"], 0)]
ROUNDS = '''def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                previous_round_info=None):
    """Round 0: the question; round 1: the follow-up about the same video; then done."""
    if round_idx is None:
        return doc["question"]
    if round_idx == 1:
        return [doc["video"]], "Describe the video.", False, previous_output, None
    return None, None, True, previous_output, None


def process_results(doc, results):
    rounds = results[0]  # the answer of each round
    return {"rounds": float(len(rounds) == 2 and all(isinstance(r, str) for r in rounds))}
'''


@pytest.fixture(scope="module")
def own_tasks(task):
  """The task folder's videos as three more tasks: MVBench-shaped multiple choice (ranked by
  likelihood), open-ended questions, and a two-round conversation (its doc_to_text in utils.py)."""
  model, media, _ = task
  root = os.path.dirname(media)
  include = os.path.join(root, "own_tasks")
  os.makedirs(include)
  clips = [os.path.join(media, f"clip{i}.mp4") for i in range(len(DOCS))]
  mc = [{"id": f"m{i}", "video": clip, "question": q, "candidates": options, "answer": options[label], "label": label}
        for i, (clip, (q, options, label)) in enumerate(zip(clips, CHOICES))]
  files = {"mc": mc, "open": [{"id": f"o{i}", "video": clip, "question": q, "answer": a}
                              for i, (clip, (q, a)) in enumerate(zip(clips, DOCS))]}
  for name, docs in files.items():
    with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
      f.write("".join(json.dumps(doc) + "\n" for doc in docs))
  common = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/{name}.jsonl\n" \
                        "test_split: test\ndoc_to_visual: video\n"
  tasks = {
      "vj_mc": common("mc") + "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: candidates\n"
               "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
      "vj_open": common("open") + "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
                 "generation_kwargs:\n  max_new_tokens: 6\n  temperature: 0\n  until: []\n"
                 "metric_list:\n  - metric: exact_match\n",
      "vj_rounds": common("open") + "output_type: generate_until_multi_round\ndoc_to_text: !function utils.doc_to_text\n"
                   "doc_to_target: answer\nprocess_results: !function utils.process_results\n"
                   "generation_kwargs:\n  max_new_tokens: 6\n  temperature: 0\n"
                   "metric_list:\n  - metric: rounds\n    aggregation: mean\n    higher_is_better: true\n"}
  for name, text in tasks.items():
    with open(os.path.join(include, f"{name}.yaml"), "w") as f:
      f.write(f"task: {name}\n{text}")
  with open(os.path.join(include, "utils.py"), "w") as f:
    f.write(ROUNDS)
  return model, root, include, files


def test_lmms_eval_runs_vllm_jax_as_its_model_with_our_scores(own_tasks, tmp_path):
  """`lmms-eval --model vllm_jax` (found through the entry point, as users run it), each batch split
  over a 2-device data mesh: its multiple-choice accuracy and option log-probabilities are
  `vllm-jax eval --mc-scoring likelihood`'s (one device), its open-ended answers are `vllm-jax
  eval`'s, and a two-round task gets both rounds."""
  model, root, include, files = own_tasks
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
             TOKENIZERS_PARALLELISM="false", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vllm_jax", "--model_args",
                         f"model={model},mesh=2x1x1", "--tasks", "vj_mc,vj_open,vj_rounds", "--include_path", include,
                         "--output_path", str(tmp_path / "results"), "--log_samples", "--batch_size", "2"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  log = (proc.stdout + proc.stderr)[-6000:]
  assert proc.returncode == 0 and "Error during evaluation" not in proc.stdout + proc.stderr, log
  results = glob.glob(str(tmp_path / "results" / "**" / "*_results.json"), recursive=True)
  assert len(results) == 1, log
  scores = json.loads(open(results[0]).read())["results"]
  samples = lambda name: sorted((json.loads(line) for line in open(glob.glob(
      str(tmp_path / "results" / "**" / f"*_samples_{name}.jsonl"), recursive=True)[0])), key=lambda r: r["doc_id"])
  assert scores["vj_rounds"]["rounds,none"] == 1.0, scores

  from vllm_jax import cli
  for name, fmt, extra in (("mc", "multiple-choice", ["--mc-scoring", "likelihood"]), ("open", "open-ended", [])):
    annotations = tmp_path / f"{name}.json"
    annotations.write_text(json.dumps(files[name]))
    assert cli.main(["eval", "--model", model, "--format", fmt, "--annotations", str(annotations), "--media-root",
                     "/", "--out", str(tmp_path / name), "--batch-size", "2", "--max-new-tokens", "6", *extra]) == 0
  ours = json.loads((tmp_path / "mc" / "results.json").read_text())["overall"]
  assert scores["vj_mc"]["acc,none"] == pytest.approx(ours["likelihood_accuracy"]), (scores, ours)
  answers = {r["id"]: r for r in map(json.loads, (tmp_path / "mc" / "answers.jsonl").read_text().splitlines())}
  for row in samples("vj_mc"):  # lmms-eval's option values are losses: the smallest is picked
    theirs = [-float(loss) for loss, _ in row["filtered_resps"]]
    assert theirs == pytest.approx(answers[f"m{row['doc_id']}"]["logprobs"], abs=1e-4), row
  answers = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "open" / "answers.jsonl").read_text().splitlines())}
  for row in samples("vj_open"):
    assert row["filtered_resps"] == answers[f"o{row['doc_id']}"].strip(), row
