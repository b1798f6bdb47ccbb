"""`vllm-jax eval` on the video benchmarks' own published layouts (file names and keys as their
evaluation code and dataset cards give them), with a tiny random Video-LLaMA and generated videos:
categories, ids and counts, and what reaches the loader (MVBench's bounds and frame folders,
Video-MME's subtitles at the sampled frames)."""

import json

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
from PIL import Image

import test_eval
from test_eval import read_answers, write_json
from test_video_loading import write_video
from vllm_jax import cli
from vllm_jax.systems.video_llama import VideoLlamaSystem

RUN = ["--batch-size", "2", "--max-new-tokens", "2"]
data, load_once = test_eval.data, test_eval.load_once  # its module fixtures: the tiny model, loaded once


@pytest.fixture
def loads(monkeypatch):
  """Every media the system loads: [(path, bounds, folder_fps, timestamps)]."""
  seen = []
  load_media = VideoLlamaSystem.load_media

  def recording(self, path, *args, **kwargs):
    media = load_media(self, path, *args, **kwargs)
    seen.append((path, kwargs.get("bounds"), kwargs.get("folder_fps"), media.frames.timestamps))
    return media
  monkeypatch.setattr(VideoLlamaSystem, "load_media", recording)
  return seen


def run_eval(model, fmt, annotations, media_root, out, *extra):
  return cli.main(["eval", "--model", model, "--format", fmt, "--annotations", str(annotations), "--media-root",
                   str(media_root), "--out", str(out), *RUN, *extra])


def results(out):
  return json.loads((out / "results.json").read_text())


def mc(question, candidates, answer, **more):
  return {"question": question, "candidates": candidates, "answer": answer, **more}


def test_mvbench_task_files_bounds_and_frame_folders(data, tmp_path, capsys, loads):
  """The json/ folder's task files (others missing: noted) with their videos in MVBench's folders:
  the bounded item's frames all lie within [start, end]; the TVQA frame folder is read at 3 fps
  within its bounds; categories are the task names, ids the task file and index."""
  model, _ = data
  videos, annotations = tmp_path / "video", tmp_path / "json"
  annotations.mkdir()
  (videos / "star/Charades_v1_480").mkdir(parents=True)
  (videos / "ssv2_video").mkdir()
  write_video(videos / "star/Charades_v1_480/3MSZA.mp4", num_frames=40, fps=10, size=(32, 32))  # 4 s
  write_video(videos / "ssv2_video/74225.mp4", num_frames=12, fps=10, size=(32, 32))
  frames = videos / "tvqa/frames_fps3_hq/s01e02_seg02_clip_12"
  frames.mkdir(parents=True)
  for i in range(1, 25):  # 8 s at 3 fps, numbered from 1 as MVBench's frames are
    Image.fromarray(np.full((24, 32, 3), 10 * i, np.uint8)).save(frames / f"{i:05d}.jpg")
  write_json(annotations / "action_sequence.json", [mc(
      "What did the person do after holding the towel?", ["Took the bag.", "Threw the shoe."], "Took the bag.",
      video="3MSZA.mp4", start=1.2, end=2.5)])
  write_json(annotations / "action_antonym.json", [mc(
      "What is the action performed by the person in the video?", ["Pushing something", "Pulling something",
                                                                    "Not sure"], "Pulling something",
      video="74225.mp4")])
  write_json(annotations / "episodic_reasoning.json", [mc(
      "What is Sheldon holding?", ["A cup", "A book", "A phone"], "A book", video="s01e02_seg02_clip_12",
      start=2.0, end=6.0)])
  out = tmp_path / "out"

  assert run_eval(model, "mvbench", annotations, videos, out) == 0
  err = capsys.readouterr().err
  assert "MVBench: 3 of its 20 task files in" in err and "missing: action_prediction.json" in err
  records = read_answers(out)
  assert [(r["id"], r["category"]) for r in records] == [
      ("action_sequence/0", "Action Sequence"), ("action_antonym/0", "Action Antonym"),
      ("episodic_reasoning/0", "Episodic Reasoning")]
  assert set(results(out)["categories"]) == {"Action Sequence", "Action Antonym", "Episodic Reasoning"}
  bounded, whole, folder = loads
  assert bounded[0].endswith("star/Charades_v1_480/3MSZA.mp4") and bounded[1:3] == ((1.2, 2.5), None)
  assert len(bounded[3]) == 4 and all(1.2 <= t <= 2.5 for t in bounded[3])
  assert whole[1:3] == (None, None) and whole[3][0] == 0.0
  assert folder[0].endswith("tvqa/frames_fps3_hq/s01e02_seg02_clip_12") and folder[1:3] == ((2.0, 6.0), 3.0)
  assert len(folder[3]) == 4 and all(2.0 <= t <= 6.0 for t in folder[3])

  # A bounded task's item without its bounds: one error line naming the file and the item.
  write_json(annotations / "action_sequence.json", [mc("Why?", ["a", "b"], "a", video="3MSZA.mp4")])
  assert run_eval(model, "mvbench", annotations / "action_sequence.json", videos, tmp_path / "o2") == 2
  err = capsys.readouterr().err
  assert [line for line in err.splitlines() if "error:" in line] == [
      f"error: {annotations / 'action_sequence.json'} item 0: a bounded task's item needs \"start\" and \"end\" in "
      "seconds, got None and None"]


def test_egoschema_questions_with_the_published_subset_answers(data, tmp_path, capsys):
  """questions.json and subset_answers.json as published: only the answered questions are asked
  (the count is printed), keyed by q_uid, their videos <q_uid>.mp4."""
  model, _ = data
  videos = tmp_path / "videos"
  videos.mkdir()
  uids = ["001934bb-81bd-4cd8-a574-0472ef3f6678", "0074f737-11cb-497d-8d07-77c3a8127391",
          "00b9a0de-c59e-49cb-a127-6081e2fb8c8e"]
  for uid in uids:
    write_video(videos / f"{uid}.mp4", num_frames=8, size=(32, 32))
  questions = write_json(tmp_path / "questions.json", [
      {"q_uid": uid, "google_drive_id": f"drive{i}", "question": f"What is c doing in clip {i}?",
       **{f"option {k}": f"c does thing {k}" for k in range(5)}} for i, uid in enumerate(uids)])
  answers = write_json(tmp_path / "subset_answers.json", {uids[1]: 3, uids[2]: 4})
  out = tmp_path / "out"

  assert run_eval(model, "egoschema", questions, videos, out, "--answer-file", answers) == 0
  assert "EgoSchema: 2 of 3 questions have an answer in" in capsys.readouterr().err
  assert [r["id"] for r in read_answers(out)] == uids[1:]
  assert results(out)["overall"]["answered"] == 2 and set(results(out)["categories"]) == {"all"}

  assert run_eval(model, "egoschema", questions, videos, tmp_path / "o2") == 2
  assert "error: --format egoschema needs its published answers: --answer-file" in capsys.readouterr().err


def test_videomme_parquet_tables_and_subtitles_at_the_sampled_frames(data, tmp_path, capsys):
  """The dataset's parquet with its columns: per task type, duration and domain tables; asked with
  Video-MME's prompt, the subtitle lines shown at the sampled frames (0, 1, 2, 3 s) first."""
  model, _ = data
  videos, subtitles = tmp_path / "data", tmp_path / "subtitle"
  videos.mkdir()
  subtitles.mkdir()
  write_video(videos / "fFjv93ACGo8.mp4", num_frames=40, fps=10, size=(32, 32))
  write_video(videos / "hHT3pSrBYB4.mp4", num_frames=40, fps=10, size=(32, 32))
  (subtitles / "fFjv93ACGo8.srt").write_text(
      '1\n00:00:00,900 --> 00:00:01,100\n<font color="white" size=".72c">Hi guys, welcome back.</font>\n\n'
      '2\n00:00:01,200 --> 00:00:01,800\n<font color="white" size=".72c">Between two frames.</font>\n\n'
      '3\n00:00:02,500 --> 00:00:03,500\n<font color="white" size=".72c">Today we cook.</font>\n')
  rows = [
      {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
       "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
       "task_type": "Counting Problem", "question": "How many people are there?",
       "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": "B"},
      {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
       "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-2",
       "task_type": "OCR Problems", "question": "What is written on the sign?",
       "options": ["A. Stop.", "B. Go.", "C. Wait.", "D. Exit."], "answer": "A"},
      {"video_id": "301", "duration": "medium", "domain": "Sports Competition", "sub_category": "Football",
       "url": "https://www.youtube.com/watch?v=hHT3pSrBYB4", "videoID": "hHT3pSrBYB4", "question_id": "301-1",
       "task_type": "Counting Problem", "question": "How many goals are scored?",
       "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."], "answer": "D"}]
  questions = tmp_path / "test-00000-of-00001.parquet"
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), questions)
  out = tmp_path / "out"

  assert run_eval(model, "videomme", questions, videos, out, "--subtitles", str(subtitles)) == 0
  records = {r["id"]: r for r in read_answers(out)}
  assert records["001-1"]["question"] == (
      "This video's subtitles are listed below:\nHi guys, welcome back.\nToday we cook.\n"
      "Select the best answer to the following multiple-choice question based on the video. Respond with only "
      "the letter (A, B, C, or D) of the correct option.\nHow many people are there?\nA. One.\nB. Two.\nC. Three.\n"
      "D. Four.\nThe best answer is:")
  assert records["301-1"]["question"].startswith("Select the best answer")  # no subtitles for this video
  summary = results(out)
  assert {name: row["answered"] for name, row in summary["categories"].items()} == {"Counting Problem": 2,
                                                                                    "OCR Problems": 1}
  assert {table: {name: row["answered"] for name, row in rows.items()} for table, rows in
          summary["groups"].items()} == {"duration": {"short": 2, "medium": 1},
                                         "domain": {"Knowledge": 2, "Sports Competition": 1}}
  printed = capsys.readouterr().out
  assert "\nduration " in printed and "\ndomain " in printed and "Sports Competition" in printed


def test_longvideobench_val_file_per_category_and_duration_group(data, tmp_path):
  model, _ = data
  videos = tmp_path / "videos"
  videos.mkdir()
  write_video(videos / "86CxyhFV9MI.mp4", num_frames=10, size=(32, 32))
  write_video(videos / "AfXd9-mbFpI.mp4", num_frames=10, size=(32, 32))
  common = {"subtitle_path": "x_en.json", "starting_timestamp_for_subtitles": 0.0, "topic_category": "NP-News-Programs"}
  annotations = write_json(tmp_path / "lvb_val.json", [
      {"video_id": "86CxyhFV9MI", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4", "duration": 8.0,
       "duration_group": 15, "question_category": "TOS", "question": "What happens first?",
       "candidates": ["a man talks", "a car passes", "it rains"], "correct_choice": 1, **common},
      {"video_id": "AfXd9-mbFpI", "id": "AfXd9-mbFpI_3", "video_path": "AfXd9-mbFpI.mp4", "duration": 500.0,
       "duration_group": 600, "question_category": "S2E", "question": "Which object is on the table?",
       "candidates": ["a cup", "a pen", "a plate", "a lamp", "a hat"], "correct_choice": 4, **common}])
  out = tmp_path / "out"

  assert run_eval(model, "longvideobench", annotations, videos, out) == 0
  assert [r["id"] for r in read_answers(out)] == ["86CxyhFV9MI_0", "AfXd9-mbFpI_3"]
  summary = results(out)
  assert set(summary["categories"]) == {"TOS", "S2E"}
  assert set(summary["groups"]["duration_group"]) == {"15", "600"}


def test_mlvu_json_folder_multiple_choice_tasks(data, tmp_path, capsys):
  """The json/ folder: the multiple-choice task files are read (the generation tasks' files are
  not), videos in video/<task file's stem>/, categories the question types."""
  model, _ = data
  videos, annotations = tmp_path / "video", tmp_path / "json"
  annotations.mkdir()
  for task, video in (("1_plotQA", "movie101_66.mp4"), ("4_count", "count_126.mp4")):
    (videos / task).mkdir(parents=True)
    write_video(videos / task / video, num_frames=10, size=(32, 32))
  write_json(annotations / "1_plotQA.json", [
      mc("What color is the main male character in the video?", ["Yellow", "Red", "Green", "Blue"], "Yellow",
         video="movie101_66.mp4", duration=246, question_type="plotQA")])
  write_json(annotations / "4_count.json", [
      mc("How many times does the man jump?", ["2", "1", "5", "4"], "1", video="count_126.mp4", duration=572.86,
         question_type="count"),
      mc("How many cars pass?", ["3", "6", "1", "0"], "6", video="count_126.mp4", duration=572.86,
         question_type="count")])
  write_json(annotations / "9_summary.json", [{"video": "subPlot_1.mp4", "duration": 500, "question": "Summarize.",
                                                "answer": "A story.", "question_type": "summary"}])
  out = tmp_path / "out"

  assert run_eval(model, "mlvu", annotations, videos, out) == 0
  assert "MLVU: 2 of its 7 task files in" in capsys.readouterr().err
  records = read_answers(out)
  assert [(r["id"], r["category"]) for r in records] == [("1_plotQA/0", "plotQA"), ("4_count/0", "count"),
                                                         ("4_count/1", "count")]
  assert {name: row["answered"] for name, row in results(out)["categories"].items()} == {"plotQA": 1, "count": 2}
