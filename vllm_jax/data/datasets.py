"""Training data: annotation readers, and grain pipelines that decode, skip unreadable media and batch.

Records are plain dicts:
  media: absolute path or URL (gs://...) of the image or video, None for a text-only record;
  kind: "image" | "video" | "text";
  caption: str (caption data) and/or conversation: [{"from": "human" | "gpt", "value": str}, ...].
A `decode(record) -> example` function (a top-level, picklable callable: it runs in grain worker
processes) turns a record into fixed-shape numpy arrays: frames, token ids, labels. When it raises,
the pipeline reads the next record instead and counts the miss in the example's `skipped` entry, so
the counts reach the training loop through batches, whichever process decoded them.
"""

import csv
import dataclasses
import functools
import logging
from collections import abc
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from vllm_jax import paths
from vllm_jax.data import manifest
from vllm_jax.data.media import media_path

log = logging.getLogger(__name__)

Record = dict[str, Any]
Decode = Callable[[Record], dict[str, np.ndarray]]


def layout(description: str):
  """A reader of annotation files of this layout: a file of another layout (a missing key, an object
  where a list is expected) or one without records is a ValueError naming the file and the layout,
  before any model loads."""
  def wrap(read):
    @functools.wraps(read)
    def checked(path: str, media_dir: str) -> list[Record]:
      try:
        records = read(path, media_dir)
      except KeyError as e:
        raise ValueError(f"{path} is not {description}: an entry has no {e}") from None
      except (TypeError, AttributeError, csv.Error):
        raise ValueError(f"{path} is not {description}") from None
      if not records:
        raise ValueError(f"{path} holds no records: expected {description}")
      return records
    return checked
  return wrap


def json_list(path: str) -> list:
  """The JSON file's list (TypeError for another JSON value: a reader's layout error)."""
  items = paths.read_json(path)
  if not isinstance(items, list):
    raise TypeError(f"{path} holds a JSON {type(items).__name__}, not a list")
  return items


# Each reader also takes a manifest folder (`vllm_jax.data.manifest`) made from its format, and
# then returns a lazy random-access sequence of the same records instead of a list.
@manifest.readable("webvid")
@layout("a WebVid CSV (columns videoid, name, page_dir, ...)")
def webvid_records(csv_path: str, video_dir: str) -> list[Record]:
  """WebVid-style CSV (`videoid,name,page_dir,...`); videos at `{video_dir}/{page_dir}/{videoid}.mp4`."""
  return list(webvid_rows(csv_path, video_dir))


def webvid_rows(csv_path: str, video_dir: str) -> Iterator[Record]:
  """`webvid_records` one row at a time (a manifest is written without holding them all)."""
  root = paths.resolve(video_dir or ".")  # joined as text: `paths.join` per row would take 5x as long
  with paths.open_text(csv_path) as f:  # rows as they come: a 10M-row CSV is not held as text
    for row in csv.DictReader(f):
      yield dict(media=f"{root}/{row['page_dir']}/{row['videoid']}.mp4", kind="video", caption=row["name"])


@manifest.readable("llava")
@layout('LLaVA JSON ([{"id", "image" | "video", "conversations": [{"from", "value"}, ...]}, ...])')
def llava_records(json_path: str, media_dir: str) -> list[Record]:
  """LLaVA JSON: CC3M-595k captions or instruction data, `[{"id", "image" | "video", "conversations":
  [{"from", "value"}, ...]}]`; the last answer doubles as the caption. An item with neither media
  key is a text-only conversation (LLaVA-665K's ShareGPT part, Video-LLaVA's nlp_tune.json): kind
  "text", media None."""
  records = []
  for item in json_list(json_path):
    kind = next((k for k in ("video", "image") if k in item), "text")
    conversation = [{"from": t["from"], "value": t["value"]} for t in item["conversations"]]
    records.append(dict(media=None if kind == "text" else media_path(media_dir, item[kind]), kind=kind,
                        conversation=conversation, caption=conversation[-1]["value"]))
  return records


@manifest.readable("minigpt4")
@layout('MiniGPT-4 JSON ({"annotations": [{"image_id", "caption"}, ...]})')
def minigpt4_records(json_path: str, image_dir: str) -> list[Record]:
  """MiniGPT-4 aligned captions: `{"annotations": [{"image_id", "caption"}]}`, images `{image_id}.jpg`."""
  return [dict(media=media_path(image_dir, f"{item['image_id']}.jpg"), kind="image", caption=item["caption"])
          for item in paths.read_json(json_path)["annotations"]]


@manifest.readable("videochat")
@layout('VideoChat JSON ([{"video", "QA": [{"q", "a"}, ...]}, ...])')
def videochat_records(json_path: str, video_dir: str) -> list[Record]:
  """VideoChat instructions: `[{"video", "QA": [{"q", "a"}, ...]}]`."""
  records = []
  for item in json_list(json_path):
    conversation = []
    for qa in item["QA"]:
      conversation += [{"from": "human", "value": qa["q"]}, {"from": "gpt", "value": qa["a"]}]
    records.append(dict(media=media_path(video_dir, item["video"]), kind="video",
                        conversation=conversation, caption=conversation[-1]["value"]))
  return records


class UnreadableData(ValueError):
  """Many records in a row could not be read: the media are missing or the media folder is wrong."""


class DecodeOrSkip(grain.MapDataset):
  """Decoded examples; a record whose decode raises is replaced by the next readable one (up to
  `max_tries` records), and `skipped` [] int32 says how many were passed over. `max_tries` failures
  in a row raise one UnreadableData naming the first; a store that cannot be reached
  (`paths.StorageError`) is raised at once, as every other record would fail alike."""

  def __init__(self, parent: grain.MapDataset, decode: Decode, max_tries: int = 10):
    super().__init__(parent)
    self._decode, self._max_tries = decode, max_tries

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    failed = []  # (media, error), logged only once a readable record replaces them
    for k in range(min(self._max_tries, len(self._parent))):
      record = self._parent[(index + k) % len(self._parent)]
      try:
        example = self._decode(record)
      except paths.StorageError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failed.append((record.get("media"), e))
        continue
      for media, e in failed:
        log.warning("skipping unreadable %s: %s: %s", media, type(e).__name__, e)
      return {**example, "skipped": np.int32(k)}
    media, e = failed[0]
    named = str(e) if media and str(media) in str(e) else f"{media}: {e}"  # most errors name their file
    raise UnreadableData(f"{len(failed)} records in a row could not be read; the first: {named}")


def examples(records: Sequence[Record], decode: Decode, *, seed: int, shuffle: bool = True,
             num_epochs: int | None = None, max_tries: int = 10) -> grain.MapDataset:
  """One source: records (a list, or a manifest's lazy sequence, read as it is) shuffled with `seed`
  (a fresh order every epoch), repeated `num_epochs` times (None: forever), decoded lazily with
  unreadable records skipped."""
  ds = grain.MapDataset.source(records if isinstance(records, abc.Sequence) else list(records))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs, reseed_each_epoch=True) if num_epochs != 1 else ds
  return DecodeOrSkip(ds, decode, max_tries)


def mixture(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
  """Interleave sources in proportion to `weights`; examples must share keys and shapes (e.g.
  images decoded as one-frame clips padded to the video length), so a batch can hold both."""
  return grain.MapDataset.mix(list(datasets), weights=list(weights))


def check_readable(ds: grain.MapDataset | Sequence[tuple[grain.MapDataset, float]]) -> None:
  """Decode the first example of `ds` (or of each of its groups, as `batches` takes them): media
  that cannot be read (a wrong media folder) raise `UnreadableData` here, before a model loads,
  rather than at the first step; ValueError when there are no examples at all."""
  groups = [ds] if isinstance(ds, grain.MapDataset) else [group for group, _ in ds]
  if not groups or not all(len(group) for group in groups):
    raise ValueError("the training data holds no examples: check the config's data files")
  for group in groups:
    group[0]  # pylint: disable=pointless-statement


def batches(ds: grain.MapDataset | Sequence[tuple[grain.MapDataset, float]], global_batch_size: int, *,
            worker_count: int = 0, process_index: int | None = None,
            process_count: int | None = None) -> grain.IterDataset:
  """This process's batches: every `process_count`-th example from `process_index` on, stacked
  [global_batch_size / process_count, ...], decoded in `worker_count` processes (0: in this one).
  `ds` may also be groups [(examples, weight)]: each batch is then drawn from one group (say, all
  images or all videos, so that a model runs only the encoder the batch needs), the groups taking
  turns in proportion to their weights, in the same order on every process.
  Iterators of the result support `get_state`/`set_state` (checkpointed with the train state)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes")
  groups = [(ds, 1.0)] if isinstance(ds, grain.MapDataset) else list(ds)
  local = [(group[process_index::process_count].batch(global_batch_size // process_count, drop_remainder=True),
            weight) for group, weight in groups]
  ds = local[0][0] if len(local) == 1 else grain.MapDataset.mix([g for g, _ in local], [w for _, w in local])
  it = ds.to_iter_dataset()
  if worker_count:
    # Worker processes re-import absl-flagged modules; they must see parsed flags.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


@dataclasses.dataclass(frozen=True)
class Cached:
  """A decode whose examples are kept in this process's memory, keyed by the whole record (records
  may share media, and text-only ones have none): a decode that gives the same example for a
  record every epoch decodes a small dataset once."""
  decode: Decode
  memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __call__(self, record: Record) -> dict[str, np.ndarray]:
    key = repr(record)
    if key not in self.memo:
      self.memo[key] = self.decode(record)
    return self.memo[key]


def from_sources(data_cfg, sources: Sequence[tuple[Sequence[Record], Decode, float, int]]) -> grain.MapDataset:
  """The training examples of (records, decode, mixture weight, shuffle seed) sources, as a
  config's `data` section asks: `shuffle`, `num_epochs` (-1: forever) and, optionally,
  `cache_examples` (each example decoded once and kept in memory)."""
  num_epochs = None if data_cfg.num_epochs < 0 else data_cfg.num_epochs
  wrap = Cached if data_cfg.get("cache_examples", False) else lambda decode: decode
  parts = [examples(records, wrap(decode), seed=seed, shuffle=data_cfg.shuffle, num_epochs=num_epochs)
           for records, decode, _, seed in sources]
  return parts[0] if len(parts) == 1 else mixture(parts, [weight for _, _, weight, _ in sources])


def of_kinds(records: Sequence[Record], *kinds: str) -> Sequence[Record]:
  """The records of these media kinds ("image", "video", "text"), in order: a sequence with an
  `of_kind` picks them itself (a manifest's `Records`: its files of those kinds, no scan; a feature
  cache's `feature_cache.Indexed`: each record keeping its cache_index), else a filtered list."""
  if hasattr(records, "of_kind"):
    return records.of_kind(*kinds)
  return [r for r in records if r["kind"] in kinds]


def by_media_kind(data_cfg, records: Sequence[Record], decode: Decode, seed: int) -> list[tuple[grain.MapDataset, int]]:
  """Images, videos and text-only records as up to three groups [(examples, weight: their count)],
  each batch then drawn from one (`batches`). The references' modality-grouped sampler keeps
  text-only batches apart from those with media (only the last, partial batch of each mixes);
  images and videos go apart here too, so that a batch runs only the encoder it needs."""
  groups = []
  for i, kind in enumerate(("image", "video", "text")):
    chosen = of_kinds(records, kind)
    if chosen:
      groups.append((from_sources(data_cfg, [(chosen, decode, 1.0, seed + i)]), len(chosen)))
  return groups
