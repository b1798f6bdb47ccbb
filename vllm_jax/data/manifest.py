"""Annotation manifests: an annotation file (WebVid CSV, LLaVA / MiniGPT-4 / VideoChat JSON) read
once and written as ArrayRecord files that training reads a record at a time, so that a 10M-row
annotation costs each process an index (~37 bytes a record) instead of a list of dicts (~490 bytes
a record), and opens in seconds instead of parsing the file again.

A manifest folder (`manifest_writer.make`, `vllm-jax make-manifest`):
  manifest.json          format, the annotation file it was made from (reader format, path, size
                         and SHA-256 of its text), media root, record counts per kind, the files
  {kind}.array_record    the records of one kind ("image", "video", "text") in file order: each
                         entry one record (`datasets` module doc) as a msgpack map, its media path
                         stored relative to the media root ("./page/1.mp4") when it lies inside it
  order.u8               only when the file mixes kinds: one byte per record, its kind's index
                         in KINDS, so that the whole manifest reads in the file's order
Wherever a config names an annotation file it may name a manifest folder instead: the readers in
`datasets` then return `Records`, a lazy random-access sequence equal, record for record, to the
list they return for the file (`by_media_kind` takes each kind's file without a scan). Media
paths are joined to the reader's media folder when one is given (videos moved or copied to a
bucket need no new manifest), else to the recorded root.
"""

import functools
import hashlib
import operator
import threading
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import msgpack
import numpy as np

from vllm_jax import paths

FORMAT = "vllm_jax.manifest/1"
META = "manifest.json"
ORDER = "order.u8"
KINDS = ("image", "video", "text")
RELATIVE = "./"  # the readers give absolute paths and URLs: this prefix marks a path under the root
BLOCK = 4096     # records read at once when iterating


def is_manifest(path: str) -> bool:
  """Whether `path` is a manifest folder (holds manifest.json); False for a file or nothing."""
  return paths.is_dir(path) and paths.is_file(paths.join(path, META))


def meta_path(folder: str) -> str:
  return paths.join(folder, META)


def file_fingerprint(path: str) -> dict:
  """A file's size and the SHA-256 of its text (the same wherever the file is read from)."""
  digest = hashlib.sha256()
  with paths.open_text(path) as f:
    for text in iter(lambda: f.read(1 << 20), ""):
      digest.update(text.encode())
  return dict(size=paths.size(path), sha256=digest.hexdigest())


# --- reading --------------------------------------------------------------------------------------


def load_meta(folder: str) -> dict:
  meta = paths.read_json(meta_path(folder))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path(folder)}: format {meta.get('format')!r}, expected {FORMAT!r}; remake the "
                     "manifest with `vllm-jax make-manifest`")
  return meta


class Records(Sequence):
  """The records of a manifest (or of some of its kinds), read on demand: len, [i] (an int or a
  slice: a list), iteration (in blocks). Picklable: a grain worker process opens its own readers.
  Holds per kind an ArrayRecord reader and its index (in memory: ~37 bytes a record), and, for a
  mixed-kind manifest read whole, each record's kind and position [N] (5 bytes a record)."""

  def __init__(self, folder: str, meta: dict, media_root: str, kinds: tuple[str, ...] | None = None):
    self.folder, self.meta, self.media_root = paths.resolve(folder), meta, media_root
    self.kinds = tuple(k for k in KINDS if meta["counts"].get(k) and (kinds is None or k in kinds))
    self._length = sum(meta["counts"][k] for k in self.kinds)
    self._readers: dict[str, Any] = {}
    self._order: tuple[np.ndarray, np.ndarray] | None = None
    self._lock = threading.Lock()

  def of_kind(self, *kinds: str) -> "Records":
    """This sequence's records of `kinds` ("image" | "video" | "text"), in file order: no scan."""
    return Records(self.folder, self.meta, self.media_root, tuple(k for k in self.kinds if k in kinds))

  def positions(self, *kinds: str) -> np.ndarray:
    """The positions in this sequence [M] int32 of its records of `kinds`, in order: where each
    record of `of_kind(*kinds)` lies here (a feature cache's entry of it). From order.u8, no scan."""
    chosen = [KINDS.index(k) for k in self.kinds if k in kinds]
    if len(self.kinds) < 2:
      return np.arange(self._length if chosen else 0, dtype=np.int32)
    return np.flatnonzero(np.isin(self._codes(), chosen)).astype(np.int32)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._length))]
    index = operator.index(index)  # numpy integers too (grain's indices)
    if index < 0:
      index += self._length
    if not 0 <= index < self._length:
      raise IndexError(f"record {index} of {self._length}")
    kind, position = self._locate(index)
    # A range read: `read([position])` goes through a thread pool, 100x slower for one record.
    return self._decode(self._reader(kind).read(position, position + 1)[0])

  def __iter__(self) -> Iterator[dict]:
    if not self.kinds:
      return
    if len(self.kinds) == 1:
      yield from self._scan(self.kinds[0])
      return
    scans = {k: self._scan(k) for k in self.kinds}
    for code in self._kind_order()[0]:
      yield next(scans[KINDS[code]])

  def __repr__(self) -> str:
    return f"Records({self.folder!r}, kinds={self.kinds}, {self._length} records)"

  def __getstate__(self):
    return dict(self.__dict__, _readers={}, _order=None, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _locate(self, index: int) -> tuple[str, int]:
    """Record `index` of this sequence -> (its kind, its position in that kind's file)."""
    if len(self.kinds) == 1:
      return self.kinds[0], index
    codes, positions = self._kind_order()
    return KINDS[codes[index]], int(positions[index])

  def _kind_order(self) -> tuple[np.ndarray, np.ndarray]:
    """Each record's kind code [N] uint8 and position in its kind's file [N] int32, of this
    sequence's records in file order (read once, when a mixed manifest is indexed whole)."""
    if self._order is None:
      codes = self._codes()
      positions = np.empty(len(codes), np.int32)
      for code in np.unique(codes):
        chosen = codes == code
        positions[chosen] = np.arange(chosen.sum(), dtype=np.int32)
      self._order = codes, positions
    return self._order

  def _codes(self) -> np.ndarray:
    """The kind code [N] uint8 of each of this sequence's records, in file order (order.u8's)."""
    if self._order is not None:
      return self._order[0]
    codes = np.frombuffer(paths.read_bytes(paths.join(self.folder, self.meta["order"])), np.uint8)
    return codes[np.isin(codes, [KINDS.index(k) for k in self.kinds])]

  def _reader(self, kind: str):
    if kind not in self._readers:
      with self._lock:
        if kind not in self._readers:
          self._readers[kind] = open_reader(paths.join(self.folder, self.meta["files"][kind]))
    return self._readers[kind]

  def _scan(self, kind: str) -> Iterator[dict]:
    reader, count = self._reader(kind), self.meta["counts"][kind]
    for start in range(0, count, BLOCK):
      yield from map(self._decode, reader.read(start, min(start + BLOCK, count)))

  def _decode(self, entry: bytes) -> dict:
    record = msgpack.unpackb(entry)
    media = record.get("media")
    if media is not None and media.startswith(RELATIVE):
      record["media"] = f"{self.media_root}/{media[len(RELATIVE):]}"
    return record


def open_reader(path: str):
  """An ArrayRecord reader of `path` (local or a URL) for random access: no read-ahead."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} is missing: the manifest is incomplete; remake it with `vllm-jax make-manifest`")
  return ArrayRecordReader(path, options="readahead_buffer_size:0", file_reader_buffer_size=32768)


def records(folder: str, annotation_format: str, media_dir: str = "") -> Records:
  """The records of manifest `folder`, made from `annotation_format` annotations; media under
  `media_dir` ("" -> the media root it was made with)."""
  meta = load_meta(folder)
  made_from = meta["annotations"]["format"]
  if made_from != annotation_format:
    raise ValueError(f"{folder} is a manifest of {made_from} annotations, not of {annotation_format} ones")
  return Records(folder, meta, paths.resolve(media_dir) if media_dir else meta["media_root"])


def readable(annotation_format: str) -> Callable:
  """Decorates an annotation reader `(path, media_dir) -> records`: given a manifest folder made from
  such annotations, it returns the manifest's `Records` instead of reading a file."""
  def wrap(reader):
    @functools.wraps(reader)
    def read(path: str, media_dir: str):
      if is_manifest(path):
        return records(path, annotation_format, media_dir)
      return reader(path, media_dir)
    return read
  return wrap
