"""Annotation manifests (`vllm_jax.data.manifest`, `vllm-jax make-manifest`): each layout's records
read back equal, record for record and kind by kind; the same grain batches as from the file; a
manifest in a bucket; the command from a working folder with relative paths, refusing an existing
--out; a tiny Video-LLaMA trained from a manifest with the batches of its CSV; a Video-LLaVA feature
cache made from a manifest training with the batches of one made from its JSON, its records lazy."""

import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from test_feature_cache_systems import MEDIA, entries, files, first_batches, recipe  # noqa: F401  (a fixture)
from test_train_video_llama import ROOT, setup  # noqa: F401  (the fixture)
from vllm_jax import cli, paths
from vllm_jax.cli import flags
from vllm_jax.cli.cache_features import cache_features
from vllm_jax.data import datasets, feature_cache, manifest, manifest_writer
from vllm_jax.systems import video_llama
from vllm_jax.systems.video_llava import VideoLlavaSystem
from vllm_jax.train.trainer import read_metrics

CLI = [sys.executable, "-m", "vllm_jax.cli"]
KINDS = manifest.KINDS


def turn(question, answer):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_annotations(folder) -> dict[str, str]:
  """One small annotation file per layout in `folder` -> {format: its path}. The LLaVA one mixes
  images, videos, text-only items and a media URL, kinds interleaved."""
  os.makedirs(folder, exist_ok=True)
  files = {f: os.path.join(folder, name) for f, name in
           (("webvid", "results.csv"), ("llava", "llava.json"), ("minigpt4", "minigpt4.json"),
            ("videochat", "videochat.json"))}
  rows = [f'{1000 + i},https://example.com/{i}.mp4,PT00H00M1{i}S,{i // 3:06d}_x,"clip {i}, ""quoted"" caption"'
          for i in range(7)]
  with open(files["webvid"], "w") as f:
    f.write("videoid,contentUrl,duration,page_dir,name\n" + "\n".join(rows) + "\n")
  items = [{"id": "0", "image": "coco/1.jpg", "conversations": turn("<image>\nWhat is it?", "A cat.")},
           {"id": "1", "video": "vcg/v_1.mp4", "conversations": turn("<video>\nWhat happens?", "Running.")},
           {"id": "2", "conversations": turn("Write a haiku.", "Autumn moon.")},
           {"id": "3", "image": "coco/2.jpg", "conversations": turn("<image>\nAnd this?", "A dog.")},
           {"id": "4", "video": "gs://elsewhere/v_2.mp4", "conversations": turn("<video>\nWho?", "Ünïcode ✓.")},
           {"id": "5", "conversations": turn("Say hi.", "Hi.") + turn("Again?", "Hi again.")},
           {"id": "6", "image": "coco/3.jpg", "conversations": turn("<image>\nColour?", "Red.")}]
  with open(files["llava"], "w") as f:
    json.dump(items, f)
  with open(files["minigpt4"], "w") as f:
    json.dump({"annotations": [{"image_id": str(i), "caption": f"image {i}"} for i in range(5)]}, f)
  with open(files["videochat"], "w") as f:
    json.dump([{"video": f"v/{i}.mp4", "QA": [{"i": "", "q": f"q{i}", "a": f"a{i}"}, {"i": "", "q": "Why?", "a": "So"}]}
               for i in range(4)], f)
  return files


READERS = {"webvid": datasets.webvid_records, "llava": datasets.llava_records,
           "minigpt4": datasets.minigpt4_records, "videochat": datasets.videochat_records}


@pytest.mark.parametrize("layout", list(READERS))
def test_each_layout_reads_back_record_for_record(layout, tmp_path):
  files = write_annotations(tmp_path / "annotations")
  root = str(tmp_path / "media")
  meta = manifest_writer.make(layout, files[layout], root, str(tmp_path / "manifest"), progress=False)
  read = READERS[layout]
  want = read(files[layout], root)
  got = read(str(tmp_path / "manifest"), "")  # "": the media root it was made with
  assert isinstance(want, list) and isinstance(got, manifest.Records)
  assert len(got) == len(want) == meta["records"]
  assert list(got) == [got[i] for i in range(len(got))] == got[:] == want
  assert got[-1] == want[-1] and got[np.int64(2)] == want[2] and got[1:5:2] == want[1:5:2]
  with pytest.raises(IndexError):
    got[len(want)]
  assert list(pickle.loads(pickle.dumps(got))) == want  # as grain worker processes get it

  # Kinds grouped: a file per kind present, each in file order; the counts in manifest.json.
  counts = {k: sum(r["kind"] == k for r in want) for k in KINDS if any(r["kind"] == k for r in want)}
  assert meta["counts"] == counts
  assert sorted(os.listdir(tmp_path / "manifest")) == sorted(
      ["manifest.json", *(f"{k}.array_record" for k in counts), *(["order.u8"] if len(counts) > 1 else [])])
  for kinds in (("image",), ("video",), ("text",), ("image", "video")):  # the last: file order across kinds
    chosen = datasets.of_kinds(got, *kinds)
    assert isinstance(chosen, manifest.Records) and list(chosen) == datasets.of_kinds(want, *kinds)
    assert [chosen[i] for i in range(len(chosen))] == datasets.of_kinds(want, *kinds)
  saved = json.loads((tmp_path / "manifest" / "manifest.json").read_text())
  fingerprint = feature_cache.file_fingerprint(files[layout])
  assert saved["annotations"] == dict(format=layout, file=files[layout], **fingerprint)
  assert saved["media_root"] == root and saved["format"] == manifest.FORMAT
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_media_follow_the_readers_folder_and_formats_are_checked(tmp_path):
  files = write_annotations(tmp_path)
  manifest_writer.make("llava", files["llava"], str(tmp_path / "media"), str(tmp_path / "m"), progress=False)
  moved = datasets.llava_records(str(tmp_path / "m"), "gs://bucket/media")
  assert list(moved) == datasets.llava_records(files["llava"], "gs://bucket/media")
  assert moved[4]["media"] == "gs://elsewhere/v_2.mp4" and moved[2]["media"] is None  # a URL stays as it is

  # A feature cache fingerprints a manifest by its manifest.json (which holds its file's).
  assert feature_cache.file_fingerprint(str(tmp_path / "m")) == \
      feature_cache.file_fingerprint(str(tmp_path / "m" / "manifest.json"))
  with pytest.raises(ValueError, match="a manifest of llava annotations, not of videochat ones"):
    datasets.videochat_records(str(tmp_path / "m"), "")
  with pytest.raises(ValueError, match="already a manifest"):
    manifest_writer.make("llava", str(tmp_path / "m"), "", str(tmp_path / "m2"))
  os.remove(tmp_path / "m" / "video.array_record")
  with pytest.raises(FileNotFoundError, match="video.array_record is missing"):
    datasets.llava_records(str(tmp_path / "m"), "")[1]


def tokens_and_kind(record):
  """Record -> text [32] uint8 (its caption's first bytes), kind [] (an index into KINDS): no media read."""
  text = np.frombuffer(record["caption"].encode()[:32].ljust(32), np.uint8)
  return dict(text=text, kind=np.int32(KINDS.index(record["kind"])))


def test_grain_batches_match_the_files(tmp_path):
  """The same shuffled examples and batches from a manifest as from its file: whole (`examples`)
  and grouped by media kind (`by_media_kind`), over two epochs and two processes."""
  files = write_annotations(tmp_path)
  manifest_writer.make("llava", files["llava"], "/data", str(tmp_path / "m"), progress=False)
  sides = [datasets.llava_records(files["llava"], "/data"), datasets.llava_records(str(tmp_path / "m"), "")]

  def stacked(ds):
    return [{k: np.asarray(v) for k, v in b.items()} for b in ds]

  whole = [stacked(datasets.batches(datasets.examples(r, tokens_and_kind, seed=3, num_epochs=2), 4,
                                    process_index=1, process_count=2)) for r in sides]
  data_cfg = ml_collections.ConfigDict(dict(shuffle=True, num_epochs=2))
  grouped = [stacked(datasets.batches(datasets.by_media_kind(data_cfg, r, tokens_and_kind, seed=5), 2,
                                      process_index=0, process_count=1)) for r in sides]
  for ours, theirs in (whole, grouped):
    assert len(ours) == len(theirs) > 1
    for a, b in zip(ours, theirs):
      assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert {len(set(b["kind"].tolist())) for b in grouped[1]} == {1}  # each batch one kind


def test_a_manifest_in_a_bucket(gcs, tmp_path, monkeypatch):
  """Made from a CSV in a bucket into the bucket (written locally, then copied), read from there,
  fingerprinted by its manifest.json; no local `gs:` folder."""
  bucket = gcs("manifests")
  files = write_annotations(tmp_path / "local")
  paths.copy_tree(files["webvid"], f"{bucket}/webvid.csv")
  monkeypatch.chdir(tmp_path)
  manifest_writer.make("webvid", f"{bucket}/webvid.csv", f"{bucket}/videos", f"{bucket}/m", progress=False)
  assert sorted(paths.listdir(bucket)) == ["m", "webvid.csv"]
  assert manifest.is_manifest(f"{bucket}/m") and not manifest.is_manifest(f"{bucket}/webvid.csv")
  got = datasets.webvid_records(f"{bucket}/m", "")
  assert list(got) == datasets.webvid_records(f"{bucket}/webvid.csv", f"{bucket}/videos")
  assert got[3]["media"] == f"{bucket}/videos/000001_x/1003.mp4"
  assert feature_cache.file_fingerprint(f"{bucket}/m") == feature_cache.file_fingerprint(f"{bucket}/m/manifest.json")
  assert not os.path.exists(tmp_path / "gs:")


def run(args, cwd):
  return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=300)


def one_error(done, *words):
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and lines[-1].startswith("error:"), done.stderr[-3000:]
  assert "Traceback" not in done.stderr and all(w in lines[-1] for w in words), lines[-1]


def test_the_command_from_a_working_folder(tmp_path, monkeypatch, capsys):
  """Relative paths (with spaces) as typed in a working folder; an existing --out refused unless
  --overwrite; an --out holding the annotations always refused; nothing written beside --out."""
  work = tmp_path / "work"
  files = write_annotations(work / "my data")
  made = run(["make-manifest", "--format", "webvid", "--annotations", "my data/results.csv", "--media-root",
              "../videos", "--out", "./manifests/web vid/"], work)
  assert made.returncode == 0, made.stderr[-3000:]
  assert "wrote manifests/web vid: 7 records (7 video)" in made.stderr
  assert os.listdir(work / "manifests") == ["web vid"]
  meta = json.loads((work / "manifests" / "web vid" / "manifest.json").read_text())
  assert meta["media_root"] == str(tmp_path / "videos") and meta["annotations"]["file"] == files["webvid"]
  assert list(datasets.webvid_records(str(work / "manifests" / "web vid"), "")) == \
      datasets.webvid_records(files["webvid"], str(tmp_path / "videos"))

  again = ["make-manifest", "--format", "llava", "--annotations", "my data/llava.json", "--media-root", ".",
           "--out", "manifests/web vid"]
  one_error(run(again, work), "manifests/web vid already exists", "--overwrite")
  assert json.loads((work / "manifests" / "web vid" / "manifest.json").read_text()) == meta  # untouched
  # The rest in this process (the same `main`), from the same working folder.
  monkeypatch.chdir(work)

  def main_error(args, *words):
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error:") and all(w in lines[-1] for w in words), lines

  assert cli.main(again + ["--overwrite"]) == 0
  assert json.loads((work / "manifests" / "web vid" / "manifest.json").read_text())["counts"] == \
      {"image": 3, "video": 2, "text": 2}
  assert os.listdir(work / "manifests") == ["web vid"]
  main_error(["make-manifest", "--format", "webvid", "--annotations", "my data/results.csv", "--media-root", ".",
              "--out", "my data", "--overwrite"], "holds the annotation file")
  with pytest.raises(SystemExit):  # argparse's usage error
    cli.main(["make-manifest", "--format", "webvid", "--annotations", "nothing.csv", "--media-root", ".", "--out", "m"])
  assert "no such file: nothing.csv" in capsys.readouterr().err
  (work / "my data" / "other.csv").write_text("id,caption\n1,a cat\n")
  main_error(["make-manifest", "--format", "webvid", "--annotations", "my data/other.csv", "--media-root", ".",
              "--out", "m"], "my data/other.csv is not a webvid annotation file", "'page_dir'")
  assert sorted(os.listdir(work)) == ["manifests", "my data"]


def tiny_config(root, annotations, *overrides):
  return flags.load_config(os.path.join(ROOT, "configs/video_llama.py:tiny_stage1"), [
      f"--config.init_from={root / 'model'}", f"--config.data.webvid_csv={annotations}",
      f"--config.data.webvid_dir={root / 'videos'}", *overrides])


def test_training_from_a_manifest(setup, tmp_path):  # noqa: F811
  """Video-LLaMA's stage-1 batches are the same from the manifest as from the CSV (same seed, same
  records, the missing video skipped alike); then `vllm-jax train` runs from the manifest with a
  decoding worker process (the manifest's sequence pickled to it)."""
  root, config, _ = setup
  manifest_writer.make("webvid", str(root / "webvid.csv"), str(root / "videos"), str(tmp_path / "webvid"), progress=False)
  tokenizer = str(root / "model" / "tokenizer")
  sides = []
  for annotations in (root / "webvid.csv", tmp_path / "webvid"):
    cfg = tiny_config(root, annotations)
    it = iter(datasets.batches(video_llama.VideoLlamaSystem.dataset(cfg, config, tokenizer), 4,
                               process_index=0, process_count=1))
    sides.append([next(it) for _ in range(3)])
  for a, b in zip(*sides):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert sum(int(b["skipped"].sum()) for b in sides[1]) >= 1  # the missing video, stepped over from both

  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_force_host_platform_device_count=1")
  trained = subprocess.run(CLI + [
      "train", "--config", os.path.join(ROOT, "configs/video_llama.py:tiny_stage1"),
      f"--config.init_from={root / 'model'}",
      f"--config.data.webvid_csv={tmp_path / 'webvid'}", "--config.data.worker_count=1", "--config.train.steps=2",
      "--config.train.batch_size=4", "--config.train.log_every=1", f"--config.train.workdir={tmp_path / 'run'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
  assert len(losses) == 2 and np.isfinite(losses).all()


def test_training_from_a_feature_cache_of_a_manifest(files, tmp_path, monkeypatch):  # noqa: F811
  """A Video-LLaVA feature cache made from a manifest (images, videos, a missing video, text-only
  chats, kinds interleaved) holds the entries of one made from its JSON and trains with the same
  batches; the records grain gets stay lazy (no list of every record), each group's records with
  their places in the whole file as cache_index."""
  root = files
  manifest_writer.make("llava", str(root / "data.json"), str(root / "media"), str(tmp_path / "m"), progress=False)
  cfgs, caches = {}, {}
  for name, annotations in (("json", root / "data.json"), ("manifest", tmp_path / "m")):
    caches[name] = str(tmp_path / f"cache_of_{name}")
    made = cache_features(recipe(root, "video_llava", "stage1", **{"data.instruct_json": annotations}),
                          caches[name], batch_size=2, chunk_size=3, progress=False)
    assert made == 3
    cfgs[name] = recipe(root, "video_llava", "stage1", **{"data.instruct_json": annotations,
                                                          "data.feature_cache": caches[name]})
  for a, b in zip(entries(caches["json"]), entries(caches["manifest"])):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  given = []  # the records of each source that grain is given: the real `examples`, watched
  examples = datasets.examples

  def watched(records, *args, **kwargs):
    given.append(records)
    return examples(records, *args, **kwargs)

  monkeypatch.setattr(datasets, "examples", watched)
  sides = {name: first_batches(cfg, VideoLlavaSystem) for name, cfg in cfgs.items()}
  for a, b in zip(sides["json"], sides["manifest"]):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  kinds = ["text" if m is None else "image" if m.endswith(".png") else "video" for m in MEDIA]
  assert len(given) == 6  # images, videos, text: from the JSON's cache, then from the manifest's
  for records, lazy in zip(given, (False,) * 3 + (True,) * 3):
    assert isinstance(records, feature_cache.Indexed) and isinstance(records.records, manifest.Records) == lazy
    kind = records[0]["kind"]
    assert [r["cache_index"] for r in records] == [i for i, k in enumerate(kinds) if k == kind]
    assert list(pickle.loads(pickle.dumps(records))) == list(records)  # as grain worker processes get it
