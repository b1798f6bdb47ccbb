"""Writing annotation manifests (`vllm_jax.data.manifest` reads them): `make`, behind
`vllm-jax make-manifest`. A writer of its own, apart from the reader, as it reads the annotation
file with the `datasets` readers, which in turn read manifests."""

import csv
import os
import tempfile
from typing import Iterable

import msgpack

from vllm_jax import paths
from vllm_jax.data import datasets
from vllm_jax.data.manifest import FORMAT, KINDS, ORDER, RELATIVE, file_fingerprint, is_manifest, meta_path

# A format's reader (one that yields records as they come: a 10M-row CSV is not held).
READERS = {"webvid": datasets.webvid_rows, "llava": datasets.llava_records, "minigpt4": datasets.minigpt4_records,
           "videochat": datasets.videochat_records}
# One record per ArrayRecord chunk (grain's random access), stored as it is: a ~150-byte chunk does
# not compress, and compressing it triples the writing time.
WRITER_OPTIONS = "group_size:1,uncompressed"


def stored(record: dict, root_prefix: str) -> bytes:
  """A record as a manifest entry: msgpack, its media relative to the root when inside it."""
  media = record.get("media")
  if media is not None and media.startswith(root_prefix) and "://" not in media[len(root_prefix):]:
    record = dict(record, media=RELATIVE + media[len(root_prefix):])
  return msgpack.packb(record)


def write_entries(folder: str, rows: Iterable[dict], media_root: str, progress: bool = True) -> tuple[dict, bytes]:
  """Write `rows` into the local `folder` as one ArrayRecord file per kind -> (counts per kind,
  each record's kind code in order)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  writers, counts, order = {}, {}, bytearray()
  prefix = media_root + "/"  # as `Records` joins them back
  total = len(rows) if hasattr(rows, "__len__") else None
  try:
    for record in tqdm(rows, total=total, desc="writing the manifest", unit=" records",
                       disable=not progress, mininterval=1.0):
      kind = record["kind"]
      if kind not in writers:
        writers[kind] = ArrayRecordWriter(os.path.join(folder, f"{kind}.array_record"), WRITER_OPTIONS)
      writers[kind].write(stored(record, prefix))
      counts[kind] = counts.get(kind, 0) + 1
      order.append(KINDS.index(kind))
  finally:
    for writer in writers.values():
      writer.close()
  return counts, bytes(order)


def make(annotation_format: str, annotations: str, media_root: str, out: str, *, overwrite: bool = False,
         progress: bool = True) -> dict:
  """Read the annotation file `annotations` (READERS' `annotation_format`, media under
  `media_root`) once and write it as the manifest folder `out` (local or a URL), which appears
  only once complete (`paths.staged_folder`; `overwrite`: replacing what is there). -> its meta."""
  if annotation_format not in READERS:
    raise ValueError(f"unknown annotation format {annotation_format!r}; one of {', '.join(READERS)}")
  if is_manifest(annotations):
    raise ValueError(f"{annotations} is already a manifest")
  if not paths.is_file(annotations):
    raise FileNotFoundError(f"no such file: {annotations}")
  root = paths.resolve(media_root or ".")
  meta = dict(format=FORMAT, annotations=dict(format=annotation_format, file=paths.resolve(annotations),
                                              **file_fingerprint(annotations)), media_root=root)
  rows = READERS[annotation_format](annotations, root)
  with paths.staged_folder(out, replace=overwrite) as staging, tempfile.TemporaryDirectory(prefix="vllm_jax-") as tmp:
    # ArrayRecordWriter writes local files only: a folder on a store is written here, then copied.
    local = staging if not paths.is_url(staging) else tmp
    try:  # the JSON readers check their file whole; a CSV is checked as its rows come
      counts, order = write_entries(local, rows, root, progress)
    except (KeyError, csv.Error) as e:
      raise ValueError(f"{annotations} is not a {annotation_format} annotation file: "
                       f"{'a row has no column ' if isinstance(e, KeyError) else ''}{e}") from None
    if not order:
      raise ValueError(f"{annotations} holds no records")
    meta.update(records=len(order), counts={k: counts[k] for k in KINDS if k in counts},
                files={k: f"{k}.array_record" for k in KINDS if k in counts}, order=None)
    if len(counts) > 1:
      meta["order"] = ORDER
      paths.write_bytes(paths.join(staging, ORDER), order)
    if local != staging:
      for kind in meta["files"].values():
        paths.copy_tree(os.path.join(local, kind), paths.join(staging, kind))
    paths.write_json(meta_path(staging), meta)
  return meta
