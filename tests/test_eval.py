"""`vllm-jax eval` on a tiny random Video-LLaMA, with real mp4s and annotation files in the public
layouts: the scores, likelihood ranking against one-by-one forwards, resuming, errors, bad flags."""

import functools
import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import vllm_jax
from test_video_loading import write_video
from vllm_jax import cli, serve, systems
from vllm_jax.configs.video_llama import model_config
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.eval import formats, likelihood, metrics
from vllm_jax.eval import run as eval_run
from vllm_jax.eval.judge import Judge, parse_verdict
from vllm_jax.models.llama import Llama
from vllm_jax.systems.video_llama import VideoLlamaSystem
from vllm_jax.train import sharding

CORPUS = ["###Human: What is moving in the video? (A) a red circle (B) a blue square\n###Assistant: A red circle.\n",
          "The video contains 4 frames sampled at 0.0, 1.5 seconds. Answer with the option's letter."] * 20


def save_tiny_video_llama(root, corpus) -> str:
  """A tiny random vision-only Video-LLaMA, its tokenizer trained on `corpus`, saved in root/model."""
  tokenizer = train_tokenizer(corpus, str(root / "tokenizer"), vocab_size=300)
  config = model_config("tiny")
  config = config.replace(audio=None, llama=config.llama.replace(vocab_size=len(tokenizer)))
  video_id, audio_id = VideoLlamaSystem.add_media_tokens(tokenizer)
  config = config.replace(video_token_id=video_id, audio_token_id=audio_id)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3).astype(a.dtype),
                        nn.meta.unbox(VideoLlamaSystem.abstract_params(config)))
  VideoLlamaSystem(config, params, tokenizer).save(str(root / "model"))
  return str(root / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A tiny random vision-only Video-LLaMA folder and videos named as the sets name them."""
  root = tmp_path_factory.mktemp("eval")
  save_tiny_video_llama(root, CORPUS)
  videos = root / "videos"
  videos.mkdir()
  write_video(videos / "vid0.mp4", num_frames=12, size=(32, 32))
  write_video(videos / "vid1.mkv", num_frames=20, size=(32, 32))
  write_video(videos / "v_act2.mp4", num_frames=8, size=(32, 32))  # ActivityNet: named without "v_"
  return str(root / "model"), root


@pytest.fixture(scope="module", autouse=True)
def load_once(data):
  """Each command loads the model folder; every call after the first reuses that load."""
  cached = functools.lru_cache(systems.load)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(systems, "load", lambda model, mesh=None, **kw: cached(model, mesh, **kw))
    yield


def write_json(path, value, lines=False):
  path.write_text("".join(json.dumps(v) + "\n" for v in value) if lines else json.dumps(value))
  return str(path)


def read_answers(out):
  return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


OPEN_ENDED = [{"question_id": "q0", "video_name": "vid0", "question": "What is moving?", "answer": "qqq zzz"},
              {"question_id": "q1", "video_name": "vid1", "question": "What colour is it?", "answer": "qqq zzz"},
              {"question_id": "q2", "video_name": "act2", "question": "Where is it?", "answer": "qqq zzz"},
              {"question_id": "q3", "video_name": "gone", "question": "Who is there?", "answer": "qqq zzz"},
              {"question_id": "q4", "video_name": "vid0.mp4", "question": "Why?", "answer": "qqq zzz"}]
TYPES = {"q0": "what", "q1": "what", "q2": "where", "q3": "who", "q4": "why"}

MC = [  # MVBench (answer text), Video-MME (lettered options, answer letter), NExT-QA (answer index)
    {"video": "vid0.mp4", "question": "What moves?", "candidates": ["a red circle", "a blue square", "nothing"],
     "answer": "a blue square", "question_id": "m0", "task_type": "action"},
    {"video": "vid1.mkv", "question": "Which way?", "options": ["A. left", "B. right", "C. up", "D. down"],
     "answer": "C", "question_id": "m1", "task_type": "direction"},
    {"video": "act2", "question": "How many?", "candidates": ["one", "two"], "answer": 0, "category": "count"}]


def test_metrics_on_known_strings():
  assert metrics.normalize("The  Dog, runs!") == "dog runs"
  assert metrics.exact_match("A dog.", "the DOG") == 1.0 and metrics.exact_match("a dog", "dogs") == 0.0
  assert metrics.token_f1("the red circle", "a red square") == 0.5          # 1 of 2 tokens each way
  assert metrics.token_f1("red red circle", "red circle moves") == pytest.approx(2 / 3)
  assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("the", "red") == 0.0
  options = ("a cat", "a dog", "dog and cat")
  picks = {"B": 1, "(B) a dog": 1, "B. a dog": 1, "A dog": 1, "The answer is C": 2, "I think (C).": 2,
           "the dog and the cat": 2, "a dog runs": 1, "Option A": 0, "nothing": None, "the answer is a dog": 1}
  assert {a: metrics.parse_choice(a, options) for a in picks} == picks
  assert metrics.options_text(options) == "(A) a cat\n(B) a dog\n(C) dog and cat"
  assert parse_verdict("{'pred': 'yes', 'score': 4}") == {"pred": "yes", "score": 4}
  assert parse_verdict("Sure! {'pred': 'No', 'score': '1'} done") == {"pred": "no", "score": 1}
  assert parse_verdict('{"pred": "yes", "score": 5') == {"pred": "yes", "score": 5}  # unclosed: the fields
  assert parse_verdict("I cannot tell.") is None


def test_readers_take_the_public_layouts(data, tmp_path):
  _, root = data
  videos = str(root / "videos")
  combined = formats.open_ended(write_json(tmp_path / "qa.json", OPEN_ENDED), videos)
  assert [i.media for i in combined] == ["vid0.mp4", "vid1.mkv", "v_act2.mp4", "gone", "vid0.mp4"]
  assert {i.category for i in combined} == {"all"}
  questions = [{k: q[k] for k in ("video_name", "question_id", "question")} for q in OPEN_ENDED]
  answers = [{"answer": q["answer"], "type": TYPES[q["question_id"]], "question_id": q["question_id"]}
             for q in OPEN_ENDED[::-1]]
  pair = formats.open_ended(write_json(tmp_path / "test_q.json", questions), videos,
                            write_json(tmp_path / "test_a.json", answers))
  assert [(i.id, i.media, i.answer, i.category) for i in pair] == [
      (i.id, i.media, i.answer, TYPES[i.id]) for i in combined]

  for lines in (False, True):
    items = formats.multiple_choice(write_json(tmp_path / "mc.json", MC, lines), videos)
    assert [(i.candidates[i.truth["index"]], i.answer, i.category) for i in items] == [
        ("a blue square", "a blue square", "action"), ("up", "up", "direction"), ("one", "one", "count")]
    assert items[1].candidates == ("left", "right", "up", "down") and items[2].media == "v_act2.mp4"
    assert items[2].id.startswith("sha1:")

  with pytest.raises(ValueError, match=r"mc.json item 0: answer 'E' is out of range for 3 candidates"):
    formats.multiple_choice(write_json(tmp_path / "mc.json", [{**MC[0], "answer": "E"}]), videos)
  with pytest.raises(ValueError, match=r"test_q.json item 0: missing 'answer' \(are the answers in a file of thei"):
    formats.open_ended(str(tmp_path / "test_q.json"), videos)


def test_open_ended_resumes_scores_and_counts_a_missing_video(data, tmp_path, capsys):
  """--limit, then the full set: only the rest is answered; the missing video is an error and the run
  goes on; references set to the model's answers score 1, others 0, in a per-category table."""
  model, root = data
  annotations = write_json(tmp_path / "qa.json", [{**q, "type": TYPES[q["question_id"]]} for q in OPEN_ENDED])
  out = tmp_path / "out"
  args = ["eval", "--model", model, "--format", "open-ended", "--annotations", annotations, "--media-root",
          str(root / "videos"), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "5"]
  assert cli.main(args + ["--limit", "2"]) == 0
  first = read_answers(out)
  assert [r["id"] for r in first] == ["q0", "q1"] and all(isinstance(r["answer"], str) for r in first)
  capsys.readouterr()

  assert cli.main(args) == 1  # q3's video is missing
  captured = capsys.readouterr()
  assert "2 of 5 questions already answered; 3 to go" in captured.err
  records = read_answers(out)
  assert records[:2] == first and sorted(r["id"] for r in records[2:]) == ["q2", "q3", "q4"]
  assert "FileNotFoundError" in {r["id"]: r for r in records}["q3"]["error"]
  results = json.loads((out / "results.json").read_text())
  assert results["settings"]["errors"] == 1 and "q3" in results["settings"]["error_items"]
  assert results["overall"] == {"answered": 4, "errors": 1, "exact": 0.0, "f1": 0.0}
  assert results["categories"]["who"] == {"answered": 0, "errors": 1}
  assert results["categories"]["what"]["answered"] == 2
  table = captured.out.splitlines()
  assert table[0].split() == ["category", "answered", "errors", "exact", "f1"]
  assert table[1].split() == ["what", "2", "0", "0.0%", "0.0%"] and table[-2].split()[0] == "overall"

  # The references become the model's answers: the answers are reused (the missing video retried) and score 1.
  said = {r["id"]: r["answer"] for r in records if "answer" in r}
  matched = [{**q, "type": TYPES[q["question_id"]], "answer": said.get(q["question_id"], "x")} for q in OPEN_ENDED]
  write_json(tmp_path / "qa.json", matched)
  assert cli.main(args) == 1
  assert "4 of 5 questions already answered; 1 to go" in capsys.readouterr().err
  results = json.loads((out / "results.json").read_text())
  assert results["overall"] == {"answered": 4, "errors": 1, "exact": 1.0, "f1": 1.0}
  assert sorted(results["categories"]) == ["what", "where", "who", "why"]

  # Answers made with other settings are not mixed in.
  assert cli.main(args + ["--max-new-tokens", "6"]) == 2
  assert "holds answers made with other settings (max_new_tokens: 5 -> 6)" in capsys.readouterr().err


def test_a_resumed_sampled_run_answers_as_an_uninterrupted_one(data, tmp_path, capsys):
  """Sampled answers are seeded per question: a run stopped after one question and resumed (other
  batches) answers as one run without a stop. run.json holds the settings in effect (audio: false
  for a model without an audio branch), results.json the package version and the model's fingerprint."""
  model, root = data
  annotations = write_json(tmp_path / "qa.json", [q for q in OPEN_ENDED if q["question_id"] != "q3"])

  def run(out, *extra):
    assert cli.main(["eval", "--model", model, "--format", "open-ended", "--annotations", annotations,
                     "--media-root", str(root / "videos"), "--out", str(tmp_path / out), "--batch-size", "2",
                     "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "5", *extra]) == 0
    return {r["id"]: r["answer"] for r in read_answers(tmp_path / out)}

  whole = run("whole")
  run("resumed", "--limit", "1")
  assert run("resumed") == whole
  assert run("other_seed", "--seed", "6") != whole  # sampled, and by the run's seed
  capsys.readouterr()
  assert json.loads((tmp_path / "whole" / "run.json").read_text())["audio"] is False
  settings = [json.loads((tmp_path / out / "results.json").read_text())["settings"] for out in ("whole", "resumed")]
  assert settings[0]["audio"] is False and settings[0]["version"] == vllm_jax.__version__
  assert re.fullmatch("[0-9a-f]{64}", settings[0]["parameters"]) and settings[1]["parameters"] == settings[0]["parameters"]


def test_a_preset_answers_with_its_systems_protocol_and_flags_win(data, tmp_path, capsys):
  """--preset video-llama: its sampling in run.json (--num-frames and --max-new-tokens given as well
  win: the tiny model has 4 frame positions), its paper table's numbers printed; another system's
  preset is refused before the model loads."""
  model, root = data
  annotations = write_json(tmp_path / "qa.json", OPEN_ENDED[:2])
  args = ["eval", "--model", model, "--format", "open-ended", "--annotations", annotations, "--media-root",
          str(root / "videos"), "--batch-size", "2"]
  assert cli.main(args + ["--out", str(tmp_path / "out"), "--preset", "video-llama", "--max-new-tokens", "5",
                          "--num-frames", "4"]) == 0
  settings = json.loads((tmp_path / "out" / "run.json").read_text())
  assert (settings["num_frames"], settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == \
      (4, 5, 1.0, 0.9)
  assert "video-llama as published" in capsys.readouterr().out
  assert cli.main(args + ["--out", str(tmp_path / "other"), "--preset", "video-llava"]) == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and "--preset video-llava is video_llava's protocol" in err, err
  assert not (tmp_path / "other").exists()


@functools.partial(jax.jit, static_argnames="config")
def forward(config, params, embeds):
  return Llama(config).apply({"params": params}, inputs_embeds=embeds)[0]


def reference_logprob(system, media, tokens, conversation, text):
  """One option's total log-probability from a forward of its row alone (no padding, no batch)."""
  ids, start = likelihood.answer_ids(system, conversation, media, text)
  assert system.tokenizer.decode(ids[start:]).strip() == text  # the scored tokens are the option's
  embeds = system.embed(np.asarray([ids]), tokens, [conversation])
  logits = forward(system.config.llama, system.params["llm"], embeds)
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_likelihood_ranking_equals_one_by_one_forwards(data):
  model, root = data
  system = systems.load(model, dtype="float32")  # as the command loads it
  items = formats.multiple_choice(write_json(root / "mc.json", MC), str(root / "videos"))
  media = [system.load_media(str(root / "videos" / i.media)) for i in items]
  convs = []
  for item, m in zip(items, media):
    convs.append(system.conversation(m))
    convs[-1].ask(item.question)
  batched = likelihood.option_logprobs(system, media, convs, [i.candidates for i in items], rows=12)
  assert [len(b) for b in batched] == [3, 4, 2]
  for item, m, conv, scores in zip(items, media, convs, batched):
    tokens = system.encode_media([m])
    expected = [reference_logprob(system, m, tokens, conv, text) for text in item.candidates]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(expected, 3))) == len(expected)  # the ranking is not a tie


def test_multiple_choice_letter_and_likelihood(data, tmp_path, capsys):
  """Both scorings in one run from Python (`evaluate`, what the demo calls); references set to the
  top-ranked options give a likelihood accuracy of 1 without answering again."""
  model, root = data
  system = systems.load(model, dtype="float32")  # as the command loads it
  items = formats.multiple_choice(write_json(tmp_path / "mc.json", MC), str(root / "videos"))
  out = tmp_path / "out"
  summary = eval_run.evaluate(system, "multiple-choice", items, str(out), media_root=str(root / "videos"),
                              batch_size=2, mc_scoring="both", max_new_tokens=4, progress=False)
  records = {r["id"]: r for r in read_answers(out)}
  assert records["m1"]["question"] == "Which way?\n(A) left\n(B) right\n(C) up\n(D) down\n" + eval_run.MC_INSTRUCTION
  letter = [float(records[i.id]["choice"] == i.truth["index"]) for i in items]
  ranked = [float(np.argmax(records[i.id]["logprobs"]) == i.truth["index"]) for i in items]
  assert summary["overall"]["accuracy"] == pytest.approx(np.mean(letter))
  assert summary["overall"]["likelihood_accuracy"] == pytest.approx(np.mean(ranked))
  assert set(summary["categories"]) == {"action", "direction", "count"}
  assert json.loads((out / "results.json").read_text())["overall"] == summary["overall"]

  best = [dict(mc, answer=int(np.argmax(records[i.id]["logprobs"]))) for mc, i in zip(MC, items)]
  items = formats.multiple_choice(write_json(tmp_path / "mc.json", best), str(root / "videos"))
  capsys.readouterr()
  summary = eval_run.evaluate(system, "multiple-choice", items, str(out), media_root=str(root / "videos"),
                              batch_size=2, mc_scoring="likelihood", progress=False)
  assert "3 of 3 questions already answered; 0 to go" in capsys.readouterr().err
  assert summary["overall"]["likelihood_accuracy"] == 1.0 and "accuracy" not in summary["overall"]


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "argument --batch-size: 0: must be an integer of at least 1"),
    (["--format", "essay"], "argument --format: invalid choice: 'essay'"),
    (["--mc-scoring", "likelihood"], "error: --mc-scoring is for --format multiple-choice"),
    (["--judge-url", "http://localhost:1"], "error: --judge-url and --judge-model go together"),
    (["--judge-url", "http://localhost:1", "--judge-model", "j", "--judge-api-key-env", "NO_SUCH_VARIABLE_SET"],
     "error: --judge-api-key-env: the environment variable NO_SUCH_VARIABLE_SET is not set"),
    (["--annotations", "nope.json"], "argument --annotations: no such file: nope.json"),
    (["--mesh", "8,1,1", "--batch-size", "4"], "error: --batch-size 4: each batch is split over the mesh's data x"),
    (["--annotations", "bad"], "error: .*bad.json item 1: missing 'question'"),
    (["--annotations", "folder"], "error: --annotations .* is a folder: --format open-ended reads a file"),
    (["--subtitles", "folder"], "error: --subtitles is for --format videomme"),
    (["--format", "egoschema"], "error: --format egoschema needs its published answers: --answer-file"),
])
def test_bad_flags_exit_2_with_one_line(data, tmp_path, capsys, extra, message):
  model, root = data
  good = write_json(tmp_path / "qa.json", OPEN_ENDED)
  bad = write_json(tmp_path / "bad.json", [OPEN_ENDED[0], {"question_id": 1, "video_name": "vid0", "answer": "x"}])
  extra = [{"bad": bad, "folder": str(root)}.get(e, e) for e in extra]
  args = ["eval", "--model", model, "--format", "open-ended", "--annotations", good, "--out", str(tmp_path / "o")]
  try:
    status = cli.main(args + extra)
  except SystemExit as e:  # argparse's own errors
    status = e.code
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  assert len([line for line in err.splitlines() if "error:" in line]) == 1 and re.search(message, err)
  assert not (tmp_path / "o").exists()


def test_judge_asks_a_served_model_once_and_records_failures(data, tmp_path, capsys):
  """`vllm-jax serve`'s server judges the answers: every reply is cached by (question id, prediction,
  judge model) and a rerun asks nothing; a judge that cannot be reached is retried, then reported."""
  model, root = data
  system = systems.load(model, dtype="float32")  # as the command loads it
  server = serve.Server(serve.Model.from_system("tiny-judge", system), port=0).start()
  annotations = write_json(tmp_path / "qa.json", OPEN_ENDED[:3])
  out = tmp_path / "out"
  args = ["eval", "--model", model, "--format", "open-ended", "--annotations", annotations, "--media-root",
          str(root / "videos"), "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4",
          "--judge-url", server.url, "--judge-model", "tiny-judge"]
  answered = lambda status: server.metrics.registry.get_sample_value(
      "vllm_jax_requests_total", {"endpoint": "/v1/chat/completions", "status": status})
  try:
    assert cli.main(args) == 0
    assert answered("200") == 3 and answered("500") is None
    assert cli.main(args) == 0  # every verdict cached
    assert answered("200") == 3
  finally:
    server.close()
  said = {r["id"]: r["answer"] for r in read_answers(out)}
  cache = json.loads((out / "judge.json").read_text())
  assert sorted(map(tuple, map(json.loads, cache))) == sorted((q, a, "tiny-judge") for q, a in said.items())
  assert all(isinstance(reply, str) for reply in cache.values())
  results = json.loads((out / "results.json").read_text())
  settings = results["settings"]
  assert settings["judge_errors"] == 0 and settings["judged"] + settings["judge_unparsed"] == 3
  assert ("judge_yes" in results["overall"]) == (settings["judged"] > 0)  # a random judge rarely writes a verdict
  capsys.readouterr()

  # The server is gone: a judge without cached replies fails after its retries, and the run still ends.
  judge = Judge(server.url, "tiny-judge", cache_path=str(tmp_path / "judge.json"), retries=1, backoff=0.01)
  items = formats.open_ended(annotations, str(root / "videos"))
  summary = eval_run.evaluate(system, "open-ended", items, str(out), media_root=str(root / "videos"), batch_size=3,
                              judge=judge, progress=False)
  assert summary["settings"]["judge_errors"] == 3 and judge.requests == 6  # 2 tries each
  assert "(after 2 tries)" in summary["settings"]["judge_error"] and "URLError" in summary["settings"]["judge_error"]
  assert "warning: the judge failed on 3 questions" in capsys.readouterr().err
  assert summary["overall"]["exact"] == 0.0 and "judge_yes" not in summary["overall"]
  assert json.loads((tmp_path / "judge.json").read_text()) == {}


def test_synthetic_split_scores_per_attribute(data, tmp_path, capsys):
  """The demo's held-out split: per-attribute scores of the model's captions, then of a model that
  wrote the true captions (its answers put in answers.jsonl), which scores 1 everywhere."""
  from vllm_jax.data import synthetic as synthetic_data
  from vllm_jax.eval import synthetic
  model, _ = data
  spec = synthetic_data.VideoSpec(size=32, fps=4, seconds=1.0)
  csv = synthetic_data.write_split(str(tmp_path / "set"), "val", 3, seed=1, spec=spec, progress=False)
  out = tmp_path / "out"
  args = ["eval", "--model", model, "--format", "synthetic", "--annotations", csv, "--out", str(out),
          "--batch-size", "3", "--max-new-tokens", "6"]
  assert cli.main(args) == 0
  items = {i.id: i for i in synthetic.load(csv, str(tmp_path / "set"))}
  records = read_answers(out)
  expected = [synthetic.score(items[r["id"]], r["answer"]) for r in records]
  overall = json.loads((out / "results.json").read_text())["overall"]
  assert overall == {"answered": 3, "errors": 0, **{k: np.mean([e[k] for e in expected]) for k in synthetic.METRICS}}

  (out / "answers.jsonl").write_text("".join(json.dumps({**r, "answer": items[r["id"]].answer}) + "\n"
                                             for r in records))
  capsys.readouterr()
  assert cli.main(args) == 0
  assert "3 of 3 questions already answered; 0 to go" in capsys.readouterr().err
  overall = json.loads((out / "results.json").read_text())["overall"]
  assert overall == {"answered": 3, "errors": 0, **{k: 1.0 for k in synthetic.METRICS}}


def test_batches_split_over_a_data_parallel_mesh(data, tmp_path):
  """--mesh 8,1,1: each batch's rows are split over the 8 (fake) devices, with the answers and option
  log-probabilities of a one-device run."""
  model, root = data
  annotations = write_json(tmp_path / "mc.json", MC)
  runs = {}
  for name, extra in (("one", []), ("mesh", ["--mesh", "8,1,1"])):
    assert cli.main(["eval", "--model", model, "--format", "multiple-choice", "--annotations", annotations,
                     "--media-root", str(root / "videos"), "--out", str(tmp_path / name), "--mc-scoring", "both",
                     "--batch-size", "8", "--max-new-tokens", "4", *extra]) == 0
    runs[name] = {r["id"]: r for r in read_answers(tmp_path / name)}
  for key, record in runs["one"].items():
    assert runs["mesh"][key]["answer"] == record["answer"]
    np.testing.assert_allclose(runs["mesh"][key]["logprobs"], record["logprobs"], rtol=1e-5, atol=1e-5)

  mesh = sharding.make_mesh((8, 1, 1))
  system = systems.load(model, mesh=mesh, dtype="float32")
  ids = np.ones((8, 32), np.int32)
  with sharding.mesh_context(mesh):
    embeds = system.embed(ids, system.encode_media([system.load_media(str(root / "videos" / "vid0.mp4"))] * 8),
                          [None] * 8)
    positions = np.broadcast_to(np.arange(31, dtype=np.int32), (8, 31))  # each token scores the next
    out, _ = likelihood.token_logprobs(system.config.llama, system.params["llm"], embeds, np.ones_like(ids),
                                       positions, ids[:, 1:])
  assert len(out.addressable_shards) == 8 and {s.data.shape for s in out.addressable_shards} == {(1, 31)}
