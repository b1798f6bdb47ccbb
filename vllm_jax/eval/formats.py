"""Readers of the evaluation sets' annotation files -> `Item`s (media paths relative to the media root).

open-ended (Video-ChatGPT / Video-LLaVA's MSVD-QA, MSRVTT-QA, ActivityNet-QA, TGIF-QA):
  a JSON list of {"question_id", "video_name", "question", "answer", "type": optional}, or the
  questions alone ([{"video_name", "question_id", "question"}], `test_q.json`) with the answers in a
  second file ([{"answer", "type", "question_id"}], `test_a.json`). A video_name without an
  extension is looked up as `video_name.*` under the media root (VIDEO_EXTENSIONS, in order; then
  `v_video_name.*`, ActivityNet's file names). The category is "type" when given, else "all".

multiple-choice (a generic list: NExT-QA, or any set converted to it): a JSON list, or JSON lines, of
  {"question_id": optional, "video": path, "question": text, "candidates": [text, ...],
   "answer": the correct option's text, its letter ("B", "(B)") or its index (1), "category": optional}
also spelt "id", "video_name"/"video_path", "options"/"choices", "task_type"/"type". Options written
with their letter ("A. text", "(A) text", as Video-MME's) lose it. Without an id an item is keyed
by a hash of its video, question and options.

The benchmarks in their published layouts (multiple choice, keys and file names as published):
mvbench         MVBench's `json/` folder, or one of its task files: per task a list of {"video",
                "question", "candidates", "answer": the correct option's text, "start", "end": seconds};
                videos in the task's folder under the media root (MVBench's `video/`), as MVBench's
                evaluation names them (MVBENCH_TASKS). Category: the task ("Action Sequence"); id: the
                task file's stem and the index ("action_sequence/0"). Bounded tasks read only the
                frames within [start, end]; Episodic Reasoning's videos are folders of frames at 3 fps.
egoschema       `questions.json` ([{"q_uid", "google_drive_id", "question", "option 0", ..., "option 4"}])
                with the answers in `subset_answers.json` ({q_uid: the correct option's index}); videos
                `<q_uid>.mp4`. Questions without an answer are skipped (the full set's are not published).
videomme        Video-MME's questions (the Hugging Face dataset's parquet, or its rows as JSON):
                {"video_id", "duration": short/medium/long, "domain", "sub_category", "url", "videoID",
                "question_id", "task_type", "question", "options": ["A. ...", ...], "answer": a letter};
                videos `<videoID>.mp4`. Category: task_type; further tables per duration and domain.
                Subtitles (optional): a folder of `<videoID>.srt`, their lines at the sampled frames
                asked with the question, as Video-MME's evaluation does.
longvideobench  `lvb_val.json`: [{"video_path", "question", "candidates", "correct_choice": the correct
                option's index, "id", "duration_group", "question_category", ...}]; video paths under the
                media root (LongVideoBench's `videos/`). Category: question_category; a further table
                per duration_group.
mlvu            MLVU's `json/` folder, or one of its multiple-choice task files (MLVU_TASKS): per task a
                list of {"video", "duration", "question", "candidates", "answer": the correct option's
                text, "question_type"}; videos in the folder named as the task file under the media root
                (MLVU's `video/1_plotQA/...`). Category: question_type; id: the task file's stem and
                the index ("1_plotQA/0").
Each file may be a JSON list, JSON lines or a Parquet table.
"""

import dataclasses
import hashlib
import io
import json
import re
import sys
from typing import Any, NamedTuple, Sequence

from vllm_jax import paths
from vllm_jax.eval import Item
from vllm_jax.eval.metrics import LETTERS

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])[.)]\s*")
_SRT_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")


class MVBenchTask(NamedTuple):
  file: str                 # in MVBench's json/ folder
  folder: str               # the task's videos, under MVBench's video/ folder
  frame_fps: float | None   # its videos are folders of frames at this rate (None: video files)
  bounded: bool             # its items hold the "start" and "end" (seconds) of the part asked about


# MVBench's 20 tasks, as its evaluation notebook (Ask-Anything's video_chat2/mvbench.ipynb) lists them.
MVBENCH_TASKS = {
    "Action Sequence": MVBenchTask("action_sequence.json", "star/Charades_v1_480", None, True),
    "Action Prediction": MVBenchTask("action_prediction.json", "star/Charades_v1_480", None, True),
    "Action Antonym": MVBenchTask("action_antonym.json", "ssv2_video", None, False),
    "Fine-grained Action": MVBenchTask("fine_grained_action.json", "Moments_in_Time_Raw/videos", None, False),
    "Unexpected Action": MVBenchTask("unexpected_action.json", "FunQA_test/test", None, False),
    "Object Existence": MVBenchTask("object_existence.json", "clevrer/video_validation", None, False),
    "Object Interaction": MVBenchTask("object_interaction.json", "star/Charades_v1_480", None, True),
    "Object Shuffle": MVBenchTask("object_shuffle.json", "perception/videos", None, False),
    "Moving Direction": MVBenchTask("moving_direction.json", "clevrer/video_validation", None, False),
    "Action Localization": MVBenchTask("action_localization.json", "sta/sta_video", None, True),
    "Scene Transition": MVBenchTask("scene_transition.json", "scene_qa/video", None, False),
    "Action Count": MVBenchTask("action_count.json", "perception/videos", None, False),
    "Moving Count": MVBenchTask("moving_count.json", "clevrer/video_validation", None, False),
    "Moving Attribute": MVBenchTask("moving_attribute.json", "clevrer/video_validation", None, False),
    "State Change": MVBenchTask("state_change.json", "perception/videos", None, False),
    "Fine-grained Pose": MVBenchTask("fine_grained_pose.json", "nturgbd", None, False),
    "Character Order": MVBenchTask("character_order.json", "perception/videos", None, False),
    "Egocentric Navigation": MVBenchTask("egocentric_navigation.json", "vlnqa", None, False),
    "Episodic Reasoning": MVBenchTask("episodic_reasoning.json", "tvqa/frames_fps3_hq", 3.0, True),
    "Counterfactual Inference": MVBenchTask("counterfactual_inference.json", "clevrer/video_validation", None, False),
}
# MLVU's multiple-choice tasks (8_sub_scene.json and 9_summary.json are open-ended generation).
MLVU_TASKS = ("1_plotQA.json", "2_needle.json", "3_ego.json", "4_count.json", "5_order.json", "6_anomaly_reco.json",
              "7_topic_reasoning.json")


def read_records(path: str) -> list[dict[str, Any]]:
  """A JSON list of objects, JSON lines or a Parquet table (by its .parquet name) -> the objects."""
  if path.endswith(".parquet"):
    import pyarrow.parquet
    try:
      return pyarrow.parquet.read_table(io.BytesIO(paths.read_bytes(path))).to_pylist()
    except pyarrow.ArrowException as e:
      raise ValueError(f"{path}: not a readable Parquet table ({e})") from None
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


def choice_item(where: str, qid: Any, media: str, question: Any, candidates: Any, answer: Any, **fields) -> Item:
  """A multiple-choice Item, its options (lettered ones lose their letter) and answer checked;
  `fields`: the Item's other fields."""
  if not isinstance(candidates, list) or not 2 <= len(candidates) <= len(LETTERS):
    raise ValueError(f"{where}: expected a list of 2 to {len(LETTERS)} candidates")
  candidates = tuple(strip_letters([str(c) for c in candidates]))
  correct = answer_index(answer, candidates, where)
  return Item(id=str(qid), media=media, question=str(question), answer=candidates[correct], candidates=candidates,
              truth={"index": correct}, **fields)


def multiple_choice(annotations: str, media_root: str) -> list[Item]:
  items, listings = [], {}
  for i, record in enumerate(read_records(annotations)):
    where = f"{annotations} item {i}"
    video = str(field(record, ("video", "video_name", "video_path"), where))
    question = str(field(record, ("question",), where))
    qid = field(record, ("question_id", "id", "qid"), where, required=False)
    category = field(record, ("category", "task_type", "type"), where, required=False)
    item = choice_item(where, qid, find_video(media_root, video, listings), question,
                       field(record, ("candidates", "options", "choices"), where), field(record, ("answer",), where),
                       category=str(category or "all"))
    if qid is None:
      digest = hashlib.sha1(json.dumps([video, question, item.candidates]).encode()).hexdigest()[:16]
      item = dataclasses.replace(item, id="sha1:" + digest)
    items.append(item)
  return items


def task_files(annotations: str, names: Sequence[str], benchmark: str) -> list[str]:
  """A benchmark's task files: those of `names` in the folder `annotations` (a note on stderr names
  the missing ones), or `annotations` itself when it is one of them."""
  if not paths.is_dir(annotations):
    if paths.name(annotations) not in names:
      raise ValueError(f"{annotations}: not one of {benchmark}'s task files ({', '.join(names)}) nor their folder")
    return [annotations]
  present = set(paths.listdir(annotations))
  found = [name for name in names if name in present]
  if not found:
    raise ValueError(f"{annotations}: holds none of {benchmark}'s task files ({', '.join(names)})")
  if len(found) < len(names):
    print(f"{benchmark}: {len(found)} of its {len(names)} task files in {annotations}; missing: "
          f"{', '.join(name for name in names if name not in present)}", file=sys.stderr)
  return [paths.join(annotations, name) for name in found]


def mvbench(annotations: str, media_root: str) -> list[Item]:
  tasks = {task.file: (name, task) for name, task in MVBENCH_TASKS.items()}
  items, listings = [], {}
  for path in task_files(annotations, list(tasks), "MVBench"):
    name, task = tasks[paths.name(path)]
    for i, record in enumerate(read_records(path)):
      where = f"{path} item {i}"
      video = f"{task.folder}/{field(record, ('video',), where)}"
      items.append(choice_item(
          where, f"{task.file.removesuffix('.json')}/{i}",
          video if task.frame_fps else find_video(media_root, video, listings), field(record, ("question",), where),
          field(record, ("candidates",), where), field(record, ("answer",), where), category=name,
          bounds=read_bounds(record, where) if task.bounded else None, folder_fps=task.frame_fps))
  return items


def read_bounds(record: dict[str, Any], where: str) -> tuple[float, float]:
  """A bounded item's ("start", "end") in seconds."""
  try:
    start, end = float(record["start"]), float(record["end"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"{where}: a bounded task's item needs \"start\" and \"end\" in seconds, got "
                     f"{record.get('start')!r} and {record.get('end')!r}") from None
  if not 0 <= start < end:
    raise ValueError(f"{where}: \"start\" {start:g} must be at least 0 and before \"end\" {end:g}")
  return start, end


def egoschema(annotations: str, media_root: str, answer_file: str) -> list[Item]:
  answers = paths.read_json(answer_file)
  if not isinstance(answers, dict):
    raise ValueError(f"{answer_file}: expected a JSON object of q_uid: the correct option's index")
  records, items, listings = read_records(annotations), [], {}
  for i, record in enumerate(records):
    where = f"{annotations} item {i}"
    uid = str(field(record, ("q_uid",), where))
    if uid in answers:
      items.append(choice_item(where, uid, find_video(media_root, uid, listings), field(record, ("question",), where),
                               [field(record, (f"option {k}",), where) for k in range(5)], answers[uid]))
  print(f"EgoSchema: {len(items)} of {len(records)} questions have an answer in {answer_file} (the others are "
        "skipped)", file=sys.stderr)
  return items


def videomme(annotations: str, media_root: str, subtitles: str | None = None) -> list[Item]:
  records, items, listings = read_records(annotations), [], {}
  srt_files = set(paths.listdir(subtitles)) if subtitles else set()
  for i, record in enumerate(records):
    where = f"{annotations} item {i}"
    video = str(field(record, ("videoID",), where))
    srt = f"{video}.srt"
    items.append(choice_item(
        where, field(record, ("question_id",), where), find_video(media_root, video, listings),
        field(record, ("question",), where), field(record, ("options",), where), field(record, ("answer",), where),
        category=str(field(record, ("task_type",), where)),
        groups={"duration": str(field(record, ("duration",), where)), "domain": str(field(record, ("domain",), where))},
        subtitles=read_srt(paths.join(subtitles, srt)) if srt in srt_files else ()))
  if subtitles and not any(item.subtitles for item in items):
    raise ValueError(f"{subtitles}: holds no <videoID>.srt with lines for these questions' videos")
  return items


def read_srt(path: str) -> tuple[tuple[float, float, str], ...]:
  """An .srt file -> its cues (start s, end s, text without markup such as Video-MME's <font>)."""
  cues = []
  for block in re.split(r"\n\s*\n", paths.read_text(path).replace("\r\n", "\n")):
    lines = block.strip().splitlines()
    timing = next((j for j, line in enumerate(lines) if "-->" in line), None)
    if timing is None:
      continue
    times = [_SRT_TIME.search(t) for t in lines[timing].split("-->")]
    if len(times) != 2 or not all(times):
      raise ValueError(f"{path}: a cue's timing {lines[timing]!r} is not HH:MM:SS,mmm --> HH:MM:SS,mmm")
    start, end = (int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 10 ** len(ms) for h, m, s, ms in
                  (t.groups() for t in times))
    text = " ".join(re.sub(r"<[^>]+>", "", line).strip() for line in lines[timing + 1:]).strip()
    if text:
      cues.append((start, end, text))
  return tuple(cues)


def longvideobench(annotations: str) -> list[Item]:
  items = []
  for i, record in enumerate(read_records(annotations)):
    where = f"{annotations} item {i}"
    items.append(choice_item(
        where, field(record, ("id",), where), str(field(record, ("video_path",), where)),
        field(record, ("question",), where), field(record, ("candidates",), where),
        field(record, ("correct_choice",), where), category=str(field(record, ("question_category",), where)),
        groups={"duration_group": str(field(record, ("duration_group",), where))}))
  return items


def mlvu(annotations: str, media_root: str) -> list[Item]:
  items, listings = [], {}
  for path in task_files(annotations, MLVU_TASKS, "MLVU"):
    task = paths.name(path).removesuffix(".json")
    for i, record in enumerate(read_records(path)):
      where = f"{path} item {i}"
      video = f"{task}/{field(record, ('video',), where)}"
      items.append(choice_item(
          where, f"{task}/{i}", find_video(media_root, video, listings), field(record, ("question",), where),
          field(record, ("candidates",), where), field(record, ("answer",), where),
          category=str(field(record, ("question_type",), where))))
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
