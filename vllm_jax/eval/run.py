"""An evaluation run: a system answers a set's questions in batches, resumably, and the answers are scored.

In `out_dir` (a folder or a URL, gs://...):
  answers.jsonl  one record per question, appended and flushed per batch: {"key" (the question id),
                 "id", "category", "question", "answer" (the generated text), "choice" (multiple choice:
                 the option its letter or text picks, or null), "logprobs" (multiple choice with
                 likelihood scoring: each option's total log-probability)}, or {"key", "id", "error"}
                 for a missing or undecodable video. A rerun keeps the answered questions and retries
                 the others (errors, torn lines, records lacking what the scoring needs).
  results.json   {"settings", "overall", "categories", "groups"}: the mean of every score over the
                 answered questions, overall, per category and per row of each further table
                 ("groups": {table: {row: ...}}, e.g. Video-MME's per duration and domain), with their
                 counts ("answered", "errors"); settings hold the package version and the model
                 parameters' fingerprint.
  judge.json     the LLM judge's replies (open-ended with a judge), see `vllm_jax.eval.judge`.

Scores per question (each averaged): open-ended "exact" (SQuAD-normalised exact match) and "f1"
(token F1), with a judge "judge_yes" (its 'pred' is yes) and "judge_score" (0-5); multiple choice
(the generic format and the benchmarks', MULTIPLE_CHOICE) "accuracy" (the option the answer's letter
or text picks) and "likelihood_accuracy" (the option of highest log-probability); synthetic:
`vllm_jax.eval.synthetic.score`.

A sampled answer (temperature > 0) is drawn with its own seed, from the run's seed and the question
id (`question_seed`): it does not depend on the batch it fell in, so a resumed run answers as an
uninterrupted one.
"""

import collections
import hashlib
import json
import sys
from typing import Sequence

import numpy as np

import vllm_jax
from vllm_jax import paths
from vllm_jax.data import feature_cache
from vllm_jax.eval import Item, formats, metrics

MULTIPLE_CHOICE = ("multiple-choice", "mvbench", "egoschema", "videomme", "longvideobench", "mlvu")
FORMATS = ("open-ended", *MULTIPLE_CHOICE, "synthetic")
MC_SCORING = ("letter", "likelihood", "both")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# Video-MME's evaluation prompt (its README), the subtitles at the sampled frames first when given.
VIDEOMME_SUBTITLES = "This video's subtitles are listed below:"
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                        "Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_ANSWER = "The best answer is:"
RAW_METRICS = ("judge_score",)  # shown as they are, not as percentages


def question_seed(seed: int, question_id: str) -> int:
  """The sampling seed of one question of a run (64 bits of a hash of both)."""
  return int.from_bytes(hashlib.sha256(f"{seed}:{question_id}".encode()).digest()[:8], "little")


def load_items(fmt: str, annotations: str, media_root: str, answer_file: str | None = None,
               subtitles: str | None = None) -> list[Item]:
  """The questions of an annotation file (or folder of task files) in format `fmt` (see `formats`,
  and `synthetic` for the demo's); `answer_file`: open-ended's test_a.json, EgoSchema's
  subset_answers.json; `subtitles`: Video-MME's folder of .srt files."""
  from vllm_jax.eval import synthetic  # pylint: disable=g-import-not-at-top
  readers = {
      "open-ended": lambda: formats.open_ended(annotations, media_root, answer_file),
      "multiple-choice": lambda: formats.multiple_choice(annotations, media_root),
      "mvbench": lambda: formats.mvbench(annotations, media_root),
      "egoschema": lambda: formats.egoschema(annotations, media_root, answer_file),
      "videomme": lambda: formats.videomme(annotations, media_root, subtitles),
      "longvideobench": lambda: formats.longvideobench(annotations),
      "mlvu": lambda: formats.mlvu(annotations, media_root),
      "synthetic": lambda: synthetic.load(annotations, media_root),
  }
  if fmt not in readers:
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  try:
    return readers[fmt]()
  except KeyError as e:  # a file of another layout
    raise ValueError(f"{annotations} is not a {fmt} annotation file: an entry has no {e}") from None
  except (TypeError, AttributeError):
    raise ValueError(f"{annotations} is not a {fmt} annotation file (see `vllm-jax eval --help`)") from None


def prompt(fmt: str, item: Item, timestamps: Sequence[float] = ()) -> str:
  """The question the model is asked: for multiple choice with the options and a request for the
  letter; for Video-MME as its evaluation asks, with the subtitles shown at `timestamps` (the
  sampled frames' seconds)."""
  if fmt == "videomme":
    options = "\n".join(f"{metrics.LETTERS[i]}. {c}" for i, c in enumerate(item.candidates))
    lines = subtitles_at(item.subtitles, timestamps)
    shown = f"{VIDEOMME_SUBTITLES}\n" + "\n".join(lines) + "\n" if lines else ""
    return f"{shown}{VIDEOMME_INSTRUCTION}\n{item.question}\n{options}\n{VIDEOMME_ANSWER}"
  if fmt in MULTIPLE_CHOICE:
    return f"{item.question}\n{metrics.options_text(item.candidates)}\n{MC_INSTRUCTION}"
  return item.question


def subtitles_at(subtitles: Sequence[tuple[float, float, str]], timestamps: Sequence[float]) -> list[str]:
  """The subtitles shown at any of `timestamps`, in order, each once (Video-MME: those of the
  sampled frames)."""
  return [text for start, end, text in subtitles if any(start <= t < end for t in timestamps)]


def needed_fields(fmt: str, mc_scoring: str) -> tuple[str, ...]:
  """What an answer record must hold for the scoring."""
  if fmt not in MULTIPLE_CHOICE or mc_scoring == "letter":
    return ("answer",)
  return ("logprobs",) if mc_scoring == "likelihood" else ("answer", "logprobs")


def load_answers(path: str, needs: Sequence[str]) -> dict[str, dict]:
  """The complete records in `path` by key (the latest, if one is there twice); the file is
  rewritten with them alone, so that the other questions are answered again. A file holding
  anything but answer records (a questions file, say) is refused, not rewritten."""
  if not paths.exists(path):
    return {}
  records = {}
  text = paths.read_text(path)
  for number, line in enumerate(text.splitlines(keepends=True), 1):
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    cut = not line.endswith("\n") and line.startswith("{")  # a record cut short by a crash: answered again
    if line.strip() and not cut and not (isinstance(record, dict) and "key" in record):
      raise ValueError(f"{path} is not an answers file (line {number} is no answer record): it is left as it "
                       "is; give another output file")
    if isinstance(record, dict) and "key" in record and "error" not in record and all(k in record for k in needs):
      records[record["key"]] = record
  paths.write_text(path, "".join(json.dumps(r) + "\n" for r in records.values()))
  return records


def score(fmt: str, item: Item, record: dict, mc_scoring: str = "letter") -> dict[str, float]:
  """One answered question's scores (each in [0, 1]), from its record."""
  if fmt == "open-ended":
    return {"exact": metrics.exact_match(record["answer"], item.answer), "f1": metrics.token_f1(record["answer"],
                                                                                                item.answer)}
  if fmt in MULTIPLE_CHOICE:
    correct, scores = item.truth["index"], {}
    if mc_scoring in ("letter", "both"):
      scores["accuracy"] = float(record["choice"] == correct)
    if mc_scoring in ("likelihood", "both"):
      scores["likelihood_accuracy"] = float(int(np.argmax(record["logprobs"])) == correct)
    return scores
  from vllm_jax.eval import synthetic
  return {k: float(v) for k, v in synthetic.score(item, record["answer"]).items()}


def evaluate(system, fmt: str, items: Sequence[Item], out_dir: str, *, media_root: str | None = None,
             batch_size: int = 4, mc_scoring: str = "letter", use_audio: bool = False, num_frames: int | None = None,
             max_new_tokens: int = 64, sampling=None, seed: int = 0, judge=None, settings: dict | None = None,
             progress: bool = True) -> dict:
  """Answer the questions not yet answered in `out_dir`, score them all, write results.json and
  print the per-category table -> the summary (results.json's content). Media paths are read
  relative to `media_root` when given. `judge`: a `vllm_jax.eval.judge.Judge` (open-ended)."""
  from tqdm import tqdm

  from vllm_jax.data.media import MediaError, media_path
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
  if mc_scoring not in MC_SCORING:
    raise ValueError(f"unknown multiple-choice scoring {mc_scoring!r}; expected one of {', '.join(MC_SCORING)}")
  repeated = sorted(i for i, n in collections.Counter(item.id for item in items).items() if n > 1)
  if repeated:
    raise ValueError(f"question ids on more than one item: {', '.join(repeated[:10])}")
  if judge is not None and fmt != "open-ended":
    raise ValueError("the judge is for the open-ended format")
  paths.makedirs(out_dir)
  path = paths.join(out_dir, "answers.jsonl")
  needs = needed_fields(fmt, mc_scoring)
  records = load_answers(path, needs)
  pending = [item for item in items if item.id not in records]
  print(f"{len(items) - len(pending)} of {len(items)} questions already answered; {len(pending)} to go",
        file=sys.stderr)
  errors: dict[str, str] = {}
  # Every batch has the same rows (and every likelihood forward as many rows as the widest
  # batch of options), so that each compiles once.
  option_rows = batch_size * max((len(item.candidates) for item in items), default=0)

  # One write per batch: on a store each write rewrites the object.
  with paths.Appender(path) as out, tqdm(total=len(pending), unit="question", file=sys.stderr,
                                         disable=not progress) as bar:
    for start in range(0, len(pending), batch_size):
      batch, failed = [], []
      for item in pending[start:start + batch_size]:
        file = item.media if media_root is None else media_path(media_root, item.media)
        try:
          batch.append((item, system.load_media(file, use_audio=use_audio, num_frames=num_frames, bounds=item.bounds,
                                                folder_fps=item.folder_fps)))
        except (FileNotFoundError, MediaError, ValueError) as e:
          errors[item.id] = f"{type(e).__name__}: {e}"
          failed.append({"key": item.id, "id": item.id, "category": item.category, "error": errors[item.id]})
      new = answer_batch(system, fmt, batch, needs, use_audio=use_audio, rows=batch_size, option_rows=option_rows,
                         max_new_tokens=max_new_tokens, sampling=sampling, seed=seed) if batch else []
      records.update((record["key"], record) for record in new)
      out.write("".join(json.dumps(record) + "\n" for record in failed + new))
      bar.update(len(failed) + len(new))

  scores = {item.id: score(fmt, item, records[item.id], mc_scoring) for item in items if item.id in records}
  judge_problems = {}
  if judge is not None:
    judge_problems = add_verdicts(judge, items, records, scores, progress)
  summary = {"settings": {**(settings or {}), "format": fmt, "version": vllm_jax.__version__,
                          "parameters": feature_cache.fingerprint(system.params), "num_items": len(items),
                          "errors": len(errors), "error_items": errors, **judge_problems},
             **summarize(items, scores, errors)}
  paths.write_text(paths.join(out_dir, "results.json"), json.dumps(summary, indent=1))
  print(format_table(summary))
  return summary


def answer_batch(system, fmt: str, batch: Sequence[tuple[Item, object]], needs: Sequence[str], *, use_audio: bool,
                 rows: int, option_rows: int, max_new_tokens: int, sampling, seed: int) -> list[dict]:
  """A batch of questions with their loaded media -> their answer records (see the module doc):
  generated answers in `rows` rows (each sampled with its `question_seed`), option log-probabilities in
  `option_rows`."""
  from vllm_jax.eval import likelihood
  new = [{"key": item.id, "id": item.id, "category": item.category,
          "question": prompt(fmt, item, media.frames.timestamps), "audio": bool(use_audio and media.audio_valid)}
         for item, media in batch]
  media = [m for _, m in batch]

  def conversations(questions):
    convs = [system.conversation(m, record["audio"]) for m, record in zip(media, new)]
    for conv, question in zip(convs, questions):
      conv.ask(question)
    return convs

  if "answer" in needs:
    answers = system.answer(media, conversations([r["question"] for r in new]), use_audio=use_audio, rows=rows,
                            max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=[question_seed(seed, item.id) for item, _ in batch])
    for record, (item, _), answer in zip(new, batch, answers):
      record["answer"] = answer
      if fmt in MULTIPLE_CHOICE:
        record["choice"] = metrics.parse_choice(answer, item.candidates)
  if "logprobs" in needs:
    # The options are ranked as answers to the bare question (no options listed, no letter asked for).
    ranked = likelihood.option_logprobs(system, media, conversations([item.question for item, _ in batch]),
                                        [item.candidates for item, _ in batch], use_audio=use_audio, rows=option_rows)
    for record, logprobs in zip(new, ranked):
      record["logprobs"] = [float(x) for x in logprobs]
  return new


def add_verdicts(judge, items: Sequence[Item], records: dict[str, dict], scores: dict[str, dict],
                 progress: bool) -> dict:
  """The judge's verdict on each answered question added to its scores -> the counts of questions
  judged, of those it could not judge ("judge_errors": request failures, asked again on the next
  run; "judge_unparsed": replies without a verdict) and the first failure's message."""
  from vllm_jax.eval.judge import parse_verdict
  answered = [item for item in items if item.id in scores]
  replies = judge.replies([(item.id, item.question, item.answer, records[item.id]["answer"]) for item in answered],
                          progress=progress)
  failed = [r["error"] for r in replies.values() if "error" in r]
  judged = unparsed = 0
  for item in answered:
    verdict = parse_verdict(replies[item.id].get("reply", ""))
    if verdict is not None:
      scores[item.id].update(judge_yes=float(verdict["pred"] == "yes"), judge_score=float(verdict["score"]))
      judged += 1
    elif "reply" in replies[item.id]:
      unparsed += 1
  problems = {"judge_model": judge.model, "judged": judged, "judge_errors": len(failed), "judge_unparsed": unparsed}
  if failed:
    problems["judge_error"] = failed[0]
    print(f"warning: the judge failed on {len(failed)} questions (asked again on the next run): {failed[0]}",
          file=sys.stderr)
  return problems


def summarize(items: Sequence[Item], scores: dict[str, dict], errors: dict[str, str]) -> dict:
  """{"overall": {"answered", "errors", metric: mean}, "categories": {category: the same}, "groups":
  {table: {row: the same}}}: each metric's mean over the answered questions that have it."""

  def summary(group: list[Item]) -> dict:
    answered = [scores[item.id] for item in group if item.id in scores]
    names = list(dict.fromkeys(name for s in answered for name in s))
    means = {name: float(np.mean([s[name] for s in answered if name in s])) for name in names}
    return {"answered": len(answered), "errors": sum(item.id in errors for item in group), **means}

  def table(row_of) -> dict:
    rows: dict[str, list[Item]] = {}
    for item in items:
      rows.setdefault(row_of(item), []).append(item)
    return {name: summary(rows[name]) for name in sorted(rows)}

  tables = list(dict.fromkeys(name for item in items for name in item.groups))
  return {"overall": summary(list(items)), "categories": table(lambda item: item.category),
          "groups": {name: table(lambda item: item.groups.get(name, "-")) for name in tables}}


def format_table(summary: dict) -> str:
  """The per-category table, then one per further grouping: questions answered, errors, and each
  metric (rates in %), the overall row last."""
  tables = [("category", summary["categories"]), *summary["groups"].items()]
  return "\n\n".join(_table(title, [*rows.items(), ("overall", summary["overall"])]) for title, rows in tables)


def _table(title: str, rows: list[tuple[str, dict]]) -> str:
  names = list(dict.fromkeys(k for _, row in rows for k in row if k not in ("answered", "errors")))
  width = max(12, len(title), *(len(name) for name, _ in rows))
  lines = [f"{title:<{width}} {'answered':>8} {'errors':>6} " + " ".join(f"{n:>{max(8, len(n))}}" for n in names)]
  for name, row in rows:
    cells = []
    for metric in names:
      value = row.get(metric)
      text = "-" if value is None else f"{value:.2f}" if metric in RAW_METRICS else f"{100 * value:.1f}%"
      cells.append(f"{text:>{max(8, len(metric))}}")
    lines.append(f"{name:<{width}} {row['answered']:>8} {row['errors']:>6} " + " ".join(cells))
  return "\n".join(lines)
