"""The synthetic shapes-and-sounds dataset: reproducible real mp4s (decord frames, an AAC track
that gives valid fbank clips) whose captions name the attributes the pixels and sound show."""

import filecmp
import os

import numpy as np
import pytest

from vllm_jax.data import synthetic
from vllm_jax.data.audio import AudioClipConfig, load_audio_clips
from vllm_jax.data.datasets import llava_records, webvid_records
from vllm_jax.data.video import load_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.make_dataset(str(tmp_path_factory.mktemp("synthetic")), num_train=6, num_val=3, progress=False)


def test_layout_captions_and_determinism(dataset, tmp_path):
  train = synthetic.read_split(dataset["train_csv"])
  assert len(train) == 6 and len(synthetic.read_split(dataset["val_csv"])) == 3
  for row in train:
    assert row["name"] == synthetic.caption(row["colour"], row["shape"], row["direction"], row["sound"])
    assert synthetic.parse_caption(row["name"]) == {k: row[k] for k in synthetic.ATTRIBUTES}
  records = webvid_records(dataset["train_csv"], dataset["videos"])
  assert all(os.path.isfile(r["media"]) for r in records)
  conversations = llava_records(dataset["train_json"], dataset["videos"])
  assert [c["media"] for c in conversations] == [r["media"] for r in records]
  for c, r, row in zip(conversations, records, train):
    said = [m["value"] for m in c["conversation"]]
    assert said[1] == r["caption"] and said[0].startswith("<video>\n")
    # Then every attribute asked once, answered with its value.
    assert sorted(said[2::2]) == sorted(synthetic.FOLLOW_UPS.values())
    asked = {question: name for name, question in synthetic.FOLLOW_UPS.items()}
    for question, answer in zip(said[2::2], said[3::2]):
      assert synthetic.parse_caption(answer)[asked[question]] == row[asked[question]], (question, answer)

  again = synthetic.make_dataset(str(tmp_path), num_train=6, num_val=3, progress=False)
  for key in ("train_csv", "train_json", "val_csv"):
    assert filecmp.cmp(dataset[key], again[key], shallow=False)
  # The same frames and sound each time. The bytes may differ: PyAV's libx264 makes slightly different
  # choices when the CPU is loaded (seen: 1 file in 4 under load, a mean pixel change of 0.2 levels).
  for record in records:
    ours, theirs = (load_video(path, num_frames=8, size=64).frames for path in (
        record["media"], record["media"].replace(os.path.dirname(dataset["videos"]), str(tmp_path))))
    assert np.abs(ours - theirs).mean() < 0.05  # normalised units: about 3 of 255 levels
  # The held-out split draws other videos.
  val = synthetic.read_split(dataset["val_csv"])[0]
  assert not filecmp.cmp(os.path.join(dataset["videos"], "val", val["videoid"] + ".mp4"), records[0]["media"],
                         shallow=False)


def test_cached_unless_arguments_change(dataset):
  out = os.path.dirname(dataset["videos"])
  mtime = os.path.getmtime(dataset["train_csv"])
  synthetic.make_dataset(out, num_train=6, num_val=3, progress=False)
  assert os.path.getmtime(dataset["train_csv"]) == mtime
  with pytest.raises(ValueError, match="at least one video"):
    synthetic.write_split(out, "empty", 0, seed=0)


def test_pixels_and_sound_match_the_caption(dataset):
  for row in synthetic.read_split(dataset["train_csv"]):
    path = os.path.join(dataset["videos"], row["page_dir"], row["videoid"] + ".mp4")
    frames = load_video(path, num_frames=8, size=64)
    assert frames.frame_mask.all() and frames.timestamps[-1] > 2.0
    # Where the shape is: the pixels far from the background, their centroid first vs last frame.
    pixels = frames.frames * 0.27 + 0.45  # roughly undo CLIP's normalisation
    ink = np.abs(pixels - pixels[0, 0, 0]).sum(-1) > 0.5
    centre = [np.argwhere(m).mean(0) for m in ink[[0, -1]]]  # (y, x)
    dy, dx = centre[1] - centre[0]
    moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
    assert max(moved, key=moved.get) == row["direction"], (row, dx, dy)
    # As a set the sampled frames hide the direction: the path is centred on them.
    along = 1 if row["direction"] in ("left", "right") else 0
    track = np.array([np.argwhere(m).mean(0)[along] for m in ink])
    assert abs(track.mean() - (ink.shape[1] - 1) / 2) < 1.0, track
    colour = pixels[0][ink[0]].mean(0) * 255
    nearest = min(synthetic.COLOURS, key=lambda c: np.abs(np.asarray(synthetic.COLOURS[c]) - colour).sum())
    assert nearest == row["colour"]

    clips, valid = load_audio_clips(path, AudioClipConfig(num_clips=2))
    assert valid and clips.shape == (2, 1, 128, 204)
    # A tone is one sharp mel peak (the low tone's below the high tone's); noise spreads out.
    spectrum = clips[0, 0].mean(-1)
    peak, sharpness = int(np.argmax(spectrum)), float(spectrum.max() - np.median(spectrum))
    if row["sound"] == "noise":
      assert sharpness < 1.0, sharpness
    else:
      assert sharpness > 1.0 and (peak < 40) == (row["sound"] == "low tone"), (peak, sharpness)


def test_parse_caption_rejects_repeated_mentions():
  caption = synthetic.caption("yellow", "circle", "right", "low tone")
  assert synthetic.parse_caption(caption.upper() + ".") == dict(colour="yellow", shape="circle", direction="right",
                                                                 sound="low tone")
  # A caption that starts over names colour, shape and direction twice: none of them counts.
  repeated = caption.replace(" with ", " with " + caption.removesuffix(" with a low tone") + " with ", 1)
  assert synthetic.parse_caption(repeated) == dict(colour=None, shape=None, direction=None, sound="low tone")
  assert synthetic.parse_caption("a red or blue square")["colour"] is None
  assert synthetic.parse_caption("a yellow square")["sound"] is None  # "low" inside "yellow" is no sound


def test_eval_items_and_scores(dataset):
  from vllm_jax.eval import synthetic as eval_synthetic
  items = eval_synthetic.load(dataset["val_csv"])
  rows = synthetic.read_split(dataset["val_csv"])
  assert [i.id for i in items] == [r["videoid"] for r in rows] and all(os.path.isfile(i.media) for i in items)
  # Another media root: the same layout under it.
  moved = eval_synthetic.load(dataset["val_csv"], "/elsewhere")[0].media
  assert moved == f"/elsewhere/videos/val/{rows[0]['videoid']}.mp4"
  item = items[0]
  assert item.question == synthetic.QUESTIONS[0] and item.answer == rows[0]["name"]
  assert item.truth == {name: rows[0][name] for name in synthetic.ATTRIBUTES}
  right = dict.fromkeys(eval_synthetic.METRICS, 1.0)
  assert eval_synthetic.score(item, " " + item.answer.capitalize() + ". ") == right
  wrong = synthetic.caption(**{**item.truth, "sound": next(s for s in synthetic.SOUNDS if s != item.truth["sound"])})
  assert eval_synthetic.score(item, wrong) == {**dict.fromkeys(synthetic.ATTRIBUTES, 1.0), "sound": 0.0, "exact": 0.0}
  longer = item.answer + " and " + item.answer
  assert eval_synthetic.score(item, longer) == dict.fromkeys(eval_synthetic.METRICS, 0.0)
