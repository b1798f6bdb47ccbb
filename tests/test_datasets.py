"""Annotation readers and grain pipelines on real mp4/png files: decoding in worker processes,
corrupt/truncated/missing videos skipped and counted through training, mixtures, per-process shards."""

import json
import logging
import os

import av
import decord
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

import train_tiny
from vllm_jax.data import datasets
from vllm_jax.train import sharding, trainer

FRAMES, SIZE, SEQ, VOCAB = 4, 16, 12, 128


def write_mp4(path, seed, frames=8):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.RandomState(seed)
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=8)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for _ in range(frames):
      frame = av.VideoFrame.from_ndarray(rng.randint(0, 255, (32, 32, 3), np.uint8), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def tokens(text):
  ids = np.zeros(SEQ, np.int32)
  chars = [min(ord(c), VOCAB - 1) for c in text[:SEQ]]
  ids[:len(chars)] = chars
  labels = np.where(np.arange(SEQ) < len(chars), ids, trainer.IGNORE_INDEX)
  return ids, labels


class DecordClip:
  """Record -> frames [FRAMES, SIZE, SIZE, 3] uint8, input_ids/labels [SEQ], is_video []."""

  def __call__(self, record):
    if record["kind"] == "video":
      reader = decord.VideoReader(record["media"])
      frames = reader.get_batch(np.linspace(0, len(reader) - 1, FRAMES).astype(int)).asnumpy()[:, ::2, ::2]
    else:
      image = np.asarray(Image.open(record["media"]).convert("RGB").resize((SIZE, SIZE)))
      frames = np.repeat(image[None], FRAMES, axis=0)
    ids, labels = tokens(record["caption"])
    return dict(frames=frames, input_ids=ids, labels=labels, is_video=np.int32(record["kind"] == "video"))


@pytest.fixture(scope="module")
def webvid(tmp_path_factory):
  """10 WebVid rows; rows 1, 4 and 7 are a corrupt, a truncated and a missing video."""
  root = tmp_path_factory.mktemp("webvid")
  rows = []
  for i in range(10):
    page_dir = f"{i // 5:03d}"
    path = root / "videos" / page_dir / f"{1000 + i}.mp4"
    write_mp4(str(path), seed=i)
    if i == 1:
      path.write_bytes(np.random.RandomState(0).bytes(4096))
    elif i == 4:
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif i == 7:
      path.unlink()
    rows.append(f'{1000 + i},"clip {i}, a caption",{page_dir},1,2')
  (root / "results.csv").write_text("videoid,name,page_dir,duration,contentUrl\n" + "\n".join(rows) + "\n")
  return datasets.webvid_records(str(root / "results.csv"), str(root / "videos"))


def test_webvid_records(webvid):
  assert len(webvid) == 10
  assert webvid[6]["media"].endswith(os.path.join("videos", "001", "1006.mp4"))
  assert webvid[6]["caption"] == "clip 6, a caption" and webvid[6]["kind"] == "video"


def test_instruction_formats(tmp_path):
  (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "a/1.jpg", "conversations": [
      {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}]}]))
  (tmp_path / "minigpt4.json").write_text(json.dumps({"annotations": [{"image_id": "7", "caption": "A dog."}]}))
  (tmp_path / "videochat.json").write_text(json.dumps([{"video": "v/1.mp4", "QA": [
      {"i": "", "q": "What happens?", "a": "Running."}, {"i": "", "q": "Where?", "a": "A park."}]}]))
  (llava,) = datasets.llava_records(str(tmp_path / "llava.json"), "/img")
  assert llava == dict(media="/img/a/1.jpg", kind="image", caption="A cat.", conversation=[
      {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}])
  (minigpt4,) = datasets.minigpt4_records(str(tmp_path / "minigpt4.json"), "/cc")
  assert minigpt4 == dict(media="/cc/7.jpg", kind="image", caption="A dog.")
  (videochat,) = datasets.videochat_records(str(tmp_path / "videochat.json"), "/vid")
  assert videochat["media"] == "/vid/v/1.mp4" and videochat["kind"] == "video"
  assert [t["from"] for t in videochat["conversation"]] == ["human", "gpt", "human", "gpt"]
  assert videochat["conversation"][3]["value"] == "A park."


KINDS = ("image", "video", "text")


def caption_and_kind(record):
  """Record -> input_ids [SEQ] (its caption), kind [] (an index into KINDS): no media read."""
  return dict(input_ids=tokens(record["caption"])[0], kind=np.int32(KINDS.index(record["kind"])))


def test_text_only_conversations_make_a_third_group(tmp_path):
  """LLaVA's published keys: an item with neither "image" nor "video" (LLaVA-665K's ShareGPT part,
  Video-LLaVA's nlp_tune.json) is a text-only record; `by_media_kind` makes images, videos and
  text three groups, and kept examples stay apart by record although text-only ones share no media."""
  turn = lambda question, answer: [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
  items = [{"id": "0", "image": "coco/train2017/1.jpg", "conversations": turn("<image>\nWhat is it?", "A cat.")},
           {"id": "1", "video": "videochatgpt/v_1.mp4", "conversations": turn("<video>\nWhat happens?", "Run.")},
           {"id": "2", "conversations": turn("Write a haiku.", "Autumn moon.")},
           {"id": "3", "image": "coco/train2017/2.jpg", "conversations": turn("<image>\nAnd this?", "A dog.")},
           {"id": "4", "conversations": turn("Say hi.", "Hi.") + turn("Again?", "Hi again.")}]
  (tmp_path / "mix.json").write_text(json.dumps(items))
  records = datasets.llava_records(str(tmp_path / "mix.json"), "/data")
  assert [r["kind"] for r in records] == ["image", "video", "text", "image", "text"]
  assert records[1]["media"] == "/data/videochatgpt/v_1.mp4"
  assert records[4] == dict(media=None, kind="text", caption="Hi again.", conversation=items[4]["conversations"])

  data_cfg = ml_collections.ConfigDict(dict(shuffle=True, num_epochs=1, cache_examples=True))
  groups = datasets.by_media_kind(data_cfg, records, caption_and_kind, seed=0)
  assert [weight for _, weight in groups] == [2, 1, 2]
  for (group, _), kind in zip(groups, KINDS):
    examples = list(group)
    want = sorted(tuple(tokens(r["caption"])[0]) for r in records if r["kind"] == kind)
    assert sorted(tuple(e["input_ids"]) for e in examples) == want
    assert {KINDS[int(e["kind"])] for e in examples} == {kind}


class FramesToText(nn.Module):
  @nn.compact
  def __call__(self, frames, input_ids):
    pooled = frames.astype(jnp.float32).mean(axis=(1, 2, 3)) / 255.0  # [B, 3]
    return nn.Embed(VOCAB, 8)(input_ids) @ nn.Dense(8 * VOCAB)(pooled).reshape(-1, 8, VOCAB)


def test_training_skips_and_counts_unreadable_videos(webvid, caplog):
  """Decoded by 2 worker processes; every bad video is replaced by the next one and counted."""
  cfg = train_tiny.config(**{"train.log_every": 2, "train.batch_size": 5, "optim.trainable": (".*",)})
  model = FramesToText()

  def loss_fn(params, batch, rng):
    del rng
    return trainer.cross_entropy(model.apply({"params": params}, batch["frames"], batch["input_ids"]),
                                 batch["labels"])

  params_fn = lambda rng: model.init(rng, jnp.zeros((1, FRAMES, SIZE, SIZE, 3), jnp.uint8),
                                     jnp.zeros((1, SEQ), jnp.int32))["params"]
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  replicate = jax.tree.map(lambda _: sharding.replicated(mesh), jax.eval_shape(params_fn, jax.random.key(0)))
  t = trainer.Trainer(cfg, mesh, loss_fn, params_fn, replicate)

  ds = datasets.examples(webvid, DecordClip(), seed=0, shuffle=False, num_epochs=1)
  it = iter(datasets.batches(ds, 5, worker_count=2))
  caplog.set_level(logging.INFO, logger="vllm_jax.train.trainer")
  with jax.threefry_partitionable(False):
    state = t.init()
  result = trainer.train_loop(t, state, it, steps=2)
  assert result.skipped_examples == 3
  assert np.isfinite([m["loss"] for m in result.history]).all()
  assert any("skipped 3" in r.getMessage() for r in caplog.records)

  # The replacements are the following readable videos (decoded here, in this process).
  seen = [b["input_ids"] for b in datasets.batches(ds, 5, process_index=0, process_count=1)]
  captions = ["".join(chr(c) for c in ids if c) for ids in np.concatenate(seen)]
  assert captions[:6] == ["clip 0, a ca", "clip 2, a ca", "clip 2, a ca", "clip 3, a ca",
                          "clip 5, a ca", "clip 5, a ca"]


def test_mixture_puts_images_and_videos_in_one_batch(webvid, tmp_path):
  good = [r for i, r in enumerate(webvid) if i not in (1, 4, 7)]
  images = []
  for i in range(4):
    Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    images.append(dict(media=str(tmp_path / f"{i}.png"), kind="image", caption=f"image {i}"))
  mix = datasets.mixture([datasets.examples(good, DecordClip(), seed=1),
                          datasets.examples(images, DecordClip(), seed=2)], weights=[0.5, 0.5])
  it = iter(datasets.batches(mix, 8, process_index=0, process_count=1))
  batch = next(it)
  assert batch["frames"].shape == (8, FRAMES, SIZE, SIZE, 3)
  assert 0 < batch["is_video"].sum() < 8


def test_per_process_shards_are_disjoint_and_seeded():
  records = [dict(seed=i) for i in range(40)]
  decode = train_tiny.SyntheticTokens(4, VOCAB)
  rows = lambda ds, p, n: [tuple(r) for b in (next(it) for it in [iter(datasets.batches(ds, 8, process_index=p,
                                                                                       process_count=n))] * 2)
                           for r in b["input_ids"]]
  ds = datasets.examples(records, decode, seed=3)
  shards = [rows(ds, p, 2) for p in range(2)]  # 2 global batches of 8, 4 rows per process each
  everything = rows(ds, 0, 1)
  assert len(shards[0]) == len(shards[1]) == 8 and not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(everything)
  assert rows(datasets.examples(records, decode, seed=4), 0, 1) != everything


def test_grouped_batches_take_the_same_group_on_every_process():
  """Groups (e.g. images / videos): each batch from one group, groups in turn by weight, and
  every process draws from the same group at the same step."""
  decode = train_tiny.SyntheticTokens(4, VOCAB)
  groups = [(datasets.examples([dict(seed=i) for i in range(30)], decode, seed=1), 3.0),
            (datasets.examples([dict(seed=100 + i) for i in range(10)], decode, seed=2), 1.0)]
  first = {tuple(decode(dict(seed=i))["input_ids"]): i < 100 for i in list(range(30)) + list(range(100, 110))}
  kinds = []
  for p in range(2):
    it = iter(datasets.batches(groups, 4, process_index=p, process_count=2))
    kinds.append([{first[tuple(row)] for row in next(it)["input_ids"]} for _ in range(16)])
  assert kinds[0] == kinds[1] and all(len(k) == 1 for k in kinds[0])
  assert sum(k == {True} for k in kinds[0]) == 12  # weights 3 : 1
