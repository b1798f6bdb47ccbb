"""Readers of the evaluation sets' annotation files -> `Item`s (media paths relative to the media root).

open-ended (Video-ChatGPT / Video-LLaVA's MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA):
  a JSON list of {"question_id", "video_name", "question", "answer", "type": optional}, or the
  questions alone ([{"video_name", "question_id", "question"}], `test_q.json`) with the answers in a
  second file ([{"answer", "type", "question_id"}], `test_a.json`). A video_name without an
  extension is looked up as `video_name.*` under the media root (VIDEO_EXTENSIONS, in order; then
  `v_video_name.*`, ActivityNet's file names). The category is "type" when given, else "all".

multiple-choice (MVBench, Video-MME, NExT-QA, EgoSchema converted to it): a JSON list, or JSON
lines, of
  {"question_id": optional, "video": path, "question": text, "candidates": [text, ...],
   "answer": the correct option's text, its letter ("B", "(B)") or its index (1), "category": optional}
also spelt "id", "video_name"/"video_path", "options"/"choices", "task_type"/"type". Options written
with their letter ("A. text", "(A) text", as Video-MME's) lose it. Without an id an item is keyed
by a hash of its video, question and options.
"""

import hashlib
import json
import re
from typing import Any

from vllm_jax import paths
from vllm_jax.eval import Item
from vllm_jax.eval.metrics import LETTERS

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])[.)]\s*")


def read_records(path: str) -> list[dict[str, Any]]:
  """A JSON list of objects, or JSON lines -> the objects."""
  text = paths.read_text(path)
  try:
    records = json.loads(text)
  except ValueError:
    try:
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
      raise ValueError(f"{path}: neither a JSON list nor JSON lines ({e})") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
    raise ValueError(f"{path}: expected a list of JSON objects")
  return records


def find_video(media_root: str, name: str, listings: dict[str, set[str]] | None = None) -> str:
  """`name` relative to the media root, its extension found in its folder when it has none (the
  name as given when nothing is found: loading it then reports the missing file). `listings`: the
  folders' names, kept between calls (a folder is listed once, not asked about each name: on a
  store each question is a request)."""
  from vllm_jax.data.media import media_path
  folder, slash, base = name.rpartition("/")
  where = media_path(media_root, folder + slash)
  listings = {} if listings is None else listings
  if where not in listings:
    listings[where] = set(paths.listdir(where)) if paths.is_dir(where) else set()
  for candidate in (base, *(stem + ext for stem in (base, "v_" + base) for ext in VIDEO_EXTENSIONS)):
    if candidate in listings[where]:
      return folder + slash + candidate
  return name


def field(record: dict[str, Any], names: tuple[str, ...], where: str, required: bool = True) -> Any:
  """The first of `names` present in the record."""
  for name in names:
    if record.get(name) is not None:
      return record[name]
  if required:
    raise ValueError(f"{where}: missing {' or '.join(repr(n) for n in names)}")
  return None


def open_ended(annotations: str, media_root: str, answer_file: str | None = None) -> list[Item]:
  records = read_records(annotations)
  answers, listings = {}, {}
  if answer_file:
    answers = {str(field(r, ("question_id",), f"{answer_file} item {i}")): r
               for i, r in enumerate(read_records(answer_file))}
  items = []
  for i, record in enumerate(records):
    where = f"{annotations} item {i}"
    qid = str(field(record, ("question_id", "id"), where))
    if answer_file:
      if qid not in answers:
        raise ValueError(f"{where}: question_id {qid!r} has no answer in {answer_file}")
      record = {**answers[qid], **record}
    elif "answer" not in record:
      raise ValueError(f"{where}: missing 'answer' (are the answers in a file of their own?)")
    video = str(field(record, ("video_name", "video"), where))
    items.append(Item(id=qid, media=find_video(media_root, video, listings),
                      question=str(field(record, ("question",), where)), answer=str(field(record, ("answer",), where)),
                      category=str(record.get("type", "all"))))
  return items


def multiple_choice(annotations: str, media_root: str) -> list[Item]:
  items, listings = [], {}
  for i, record in enumerate(read_records(annotations)):
    where = f"{annotations} item {i}"
    video = str(field(record, ("video", "video_name", "video_path"), where))
    question = str(field(record, ("question",), where))
    candidates = field(record, ("candidates", "options", "choices"), where)
    if not isinstance(candidates, list) or len(candidates) < 2 or len(candidates) > len(LETTERS):
      raise ValueError(f"{where}: expected a list of 2 to {len(LETTERS)} candidates")
    candidates = tuple(strip_letters([str(c) for c in candidates]))
    correct = answer_index(field(record, ("answer",), where), candidates, where)
    qid = field(record, ("question_id", "id", "qid"), where, required=False)
    if qid is None:
      qid = "sha1:" + hashlib.sha1(json.dumps([video, question, candidates]).encode()).hexdigest()[:16]
    category = field(record, ("category", "task_type", "type"), where, required=False)
    items.append(Item(id=str(qid), media=find_video(media_root, video, listings), question=question,
                      answer=candidates[correct], category=str(category or "all"), candidates=candidates,
                      truth={"index": correct}))
  return items


def strip_letters(candidates: list[str]) -> list[str]:
  """Options written as "A. text" / "(A) text" (each with its own letter, in order) -> the texts."""
  matches = [_LETTER_PREFIX.match(c) for c in candidates]
  if all(m and m.group(1) == LETTERS[i] for i, m in enumerate(matches)):
    return [c[m.end():] for c, m in zip(candidates, matches)]
  return candidates


def answer_index(answer: Any, candidates: tuple[str, ...], where: str) -> int:
  """The correct option of an "answer" given as its text, its letter or its index."""
  if isinstance(answer, int) and not isinstance(answer, bool):
    index = answer
  elif isinstance(answer, str) and answer.strip() in candidates:
    index = candidates.index(answer.strip())
  elif isinstance(answer, str) and re.fullmatch(r"\(?[A-Z]\)?", answer.strip()):
    index = LETTERS.index(answer.strip("() "))
  elif isinstance(answer, str) and answer.strip().isdigit():
    index = int(answer)
  else:
    raise ValueError(f"{where}: answer {answer!r} is neither one of the candidates nor a letter or an index")
  if not 0 <= index < len(candidates):
    raise ValueError(f"{where}: answer {answer!r} is out of range for {len(candidates)} candidates")
  return index
