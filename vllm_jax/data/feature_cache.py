"""Frozen-feature cache: what a system's frozen encoders make of each training record's media,
computed once (`vllm-jax cache-features`) instead of every epoch. The system says which encoders,
how a record's media load, how they are encoded and how an example is built from the features
(`systems.base.System`'s feature-cache methods); this module writes, checks and reads the cache.

A record's media are loaded as training loads them (deterministically: random frame sampling and
crops are seeded by the record), so its features are the same every epoch and the cache holds one
entry per record: entry i of a source is its i-th record.

A cache folder:
  features.json                                   what the cache holds and what made it (below)
  {source}.array_record-{k:05d}-of-{n:05d}        chunk k of a source ("captions", "instructions"):
                                                  records [k * chunk_size, (k + 1) * chunk_size)
Each ArrayRecord record is a msgpack map (`flax.serialization.msgpack_serialize`) of numpy arrays:
  ok: bool, error: str ("" when ok; else why the media could not be read: training skips the
  record as it skips unreadable media); the system's facts about the media (timestamps, ...) and,
  for each encoder input the record has ("frame", "image", "audio", ...), "{input}_features"
  [n, ...]: its n units' features, in the dtype `System.feature_shapes` gives (Video-LLaMA:
  float32; Video-LLaVA and LLaMA-VID: their encoders' compute dtype). A record without media (a
  text-only conversation) has none.
Read with `grain.sources.ArrayRecordDataSource` (no TensorFlow in the input path; the encoders'
outputs kept exact, so training from the cache gives the losses of training from the media).

features.json: `encoders` (a SHA-256 over the frozen encoder parameters' paths, dtypes, shapes and
bytes, as the trainer holds them: cast to `optim.frozen_dtype`), `preprocessing` (the system's:
frame count, size, sampling, ...), `sources` (annotation files with their size and the SHA-256 of
their text, media folder, record count), `features` (per-record shapes and dtypes): training
compares all four with its own and refuses a cache that differs, naming what. `layout` (chunk size
and counts) and `made_from` are not compared.

Writing is sharded and resumable: chunk k belongs to process k % process_count, each process
encodes its chunks data-parallel over its local devices and writes each chunk to a local temporary
file, put in place whole (`paths.write_bytes`) when complete; a rerun skips the chunks present.
The folder may be a URL (gs://...): grain reads the chunks from there.
"""

import dataclasses
import hashlib
import json
import math
import operator
import os
import tempfile
from collections import abc
from typing import Any, Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vllm_jax import paths
from vllm_jax.data import manifest
from vllm_jax.data.media import MediaError
from vllm_jax.train import optim

FORMAT = "vllm_jax.feature_cache/1"
META = "features.json"
COMPARED = ("encoders", "preprocessing", "sources", "features")
LABELS = {"encoders": "encoder weights", "preprocessing": "preprocessing", "sources": "dataset files",
          "features": "feature shapes"}
FEATURES = "_features"  # an encoder input's features are cached as "{input}_features"


@dataclasses.dataclass(frozen=True)
class Source:
  """One training source as a cache sees it (`System.feature_sources`)."""
  name: str                  # e.g. "captions", "instructions": names its chunk files
  records: Sequence[dict[str, Any]]  # a list, or a manifest's lazy `manifest.Records`
  decode: Any                # the system's example builder, with `media_inputs(record)`
  files: tuple[str, ...]     # the annotation files the records come from
  media_dir: str


def encoder_params(cfg, system, config) -> dict:
  """The frozen encoders' parameters (nested, numpy) as training holds them: from `init_from`'s
  folder (only these tensors are read) or the trainer's random init, cast to `optim.frozen_dtype`."""
  prefixes = system.frozen_encoders(cfg, config)
  abstract = {k: v for k, v in optim.flatten(nn.meta.unbox(system.abstract_params(config))).items()
              if k.startswith(prefixes)}
  if cfg.init_from:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    tree = optim.unflatten(abstract)
    args = ocp.args.PyTreeRestore(tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
      params = checkpointer.restore(paths.join(cfg.init_from, "params"), args=args)
  else:
    # `trainer.Trainer`'s init: the first half of key(seed); XLA computes only the leaves kept.
    init_key = jax.random.split(jax.random.key(cfg.seed))[0]
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in system.init_inputs(config).items()}
    keep = lambda p: optim.unflatten({k: v for k, v in optim.flatten(p).items() if k in abstract})
    model = system.model(config)
    params = jax.jit(lambda key: keep(nn.meta.unbox(model.init(key, **inputs)["params"])))(init_key)
  return jax.device_get(jax.jit(lambda p: optim.cast(p, cfg.optim.frozen_dtype))(params))


def fingerprint(params) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, value in sorted(optim.flatten(params).items()):
    value = np.ascontiguousarray(value)
    digest.update(f"{path}:{value.dtype}:{list(value.shape)};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def describe(cfg, system, config, sources: Sequence[Any], params) -> dict:
  """features.json's compared sections for a run of `cfg` over `sources` (`Source`s) with the
  encoder parameters `params` (`encoder_params`), plus `made_from`."""
  meta = dict(
      format=FORMAT,
      encoders=dict(fingerprint=fingerprint(params), frozen_dtype=str(cfg.optim.frozen_dtype)),
      preprocessing=system.feature_preprocessing(cfg, config),
      sources={s.name: dict(files={paths.resolve(f): file_fingerprint(f) for f in s.files},
                            media_dir=paths.resolve(s.media_dir or "."), num_records=len(s.records))
               for s in sources},
      features={k: [list(shape), np.dtype(dtype).name] for k, (shape, dtype) in
                system.feature_shapes(cfg, config).items()},
      made_from=dict(system=system.model_type, init_from=paths.resolve(cfg.init_from) if cfg.init_from else "",
                     encoder_parameters={k: [list(np.shape(v)), str(np.asarray(v).dtype)]
                                         for k, v in optim.flatten(params).items()}))
  return json.loads(json.dumps(meta))  # as read back: lists, not tuples


def file_fingerprint(path: str) -> dict:
  """An annotation file's size and the SHA-256 of its text: the same wherever the same file is read
  from (unlike a modification time, which a copy or an upload changes). A manifest folder's is its
  manifest.json's (which holds its annotation file's)."""
  if manifest.is_manifest(path):
    path = manifest.meta_path(path)
  digest = hashlib.sha256()
  with paths.open_text(path) as f:
    for text in iter(lambda: f.read(1 << 20), ""):
      digest.update(text.encode())
  return dict(size=paths.size(path), sha256=digest.hexdigest())


def differences(cache: dict, run: dict) -> list[str]:
  """'what: key: cache X, this run Y' for every compared field that differs."""
  flat = lambda m: traverse_util.flatten_dict({k: m.get(k, {}) for k in COMPARED})
  have, want = flat(cache), flat(run)
  return [f"{LABELS[key[0]]}: {'.'.join(map(str, key[1:]))}: cache {have.get(key, '(absent)')}, "
          f"this run {want.get(key, '(absent)')}" for key in sorted(set(have) | set(want), key=str)
          if have.get(key) != want.get(key)]


def load_meta(cache_dir: str) -> dict:
  path = paths.join(cache_dir, META)
  if not paths.exists(path):
    raise FileNotFoundError(f"no feature cache in {cache_dir} (no {META}); make one with `vllm-jax cache-features`")
  meta = paths.read_json(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def chunk_files(cache_dir: str, source: str, num_chunks: int) -> tuple[str, ...]:
  return tuple(paths.join(cache_dir, f"{source}.array_record-{k:05d}-of-{num_chunks:05d}") for k in range(num_chunks))


def present(cache_dir: str) -> set[str]:
  """The paths of the files in `cache_dir`, listed once (one request per thousand objects on a
  store, where asking for each of a large cache's chunks would take minutes)."""
  return {paths.join(cache_dir, name) for name in paths.listdir(cache_dir)} if paths.is_dir(cache_dir) else set()


def check_system(cfg, system, config) -> tuple[str, ...]:
  """The system's frozen encoders for `cfg`; ValueError when it has none or `optim.trainable`
  trains one of them (whose outputs a cache would hold fixed)."""
  prefixes = system.frozen_encoders(cfg, config)
  if not prefixes:
    raise ValueError(f"system {system.model_type!r} has no frozen encoders to cache")
  trained = [k for k in optim.flatten(nn.meta.unbox(system.abstract_params(config)))
             if k.startswith(prefixes) and optim.matches(k, cfg.optim.trainable)]
  if trained:
    raise ValueError(f"optim.trainable trains frozen encoder parameters ({', '.join(trained[:3])}, ...), whose "
                     "outputs a feature cache holds: train without data.feature_cache")
  return prefixes


def open_for_training(cfg, system, config, sources: Sequence[Any]) -> dict[str, tuple[str, ...]]:
  """The chunk files of each source in the cache `cfg.data.feature_cache`, once the cache is
  found complete and made for this run (same encoder weights, preprocessing, data files); else
  ValueError naming what differs."""
  cache_dir = cfg.data.feature_cache
  meta = load_meta(cache_dir)
  check_system(cfg, system, config)
  diffs = differences(meta, describe(cfg, system, config, sources, encoder_params(cfg, system, config)))
  if diffs:
    what = sorted({d.partition(":")[0] for d in diffs})
    raise ValueError(f"the feature cache {cache_dir} was made for other {' and '.join(what)} than this run's:\n  "
                     + "\n  ".join(diffs) + "\nmake a cache for this run with `vllm-jax cache-features` (same "
                     "config and overrides), or train without data.feature_cache")
  files, have = {}, present(cache_dir)
  for source in sources:
    files[source.name] = chunk_files(cache_dir, source.name, meta["layout"]["chunks"][source.name])
    missing = [f for f in files[source.name] if f not in have]
    if missing:
      raise ValueError(f"the feature cache {cache_dir} is incomplete: {len(missing)} of {len(files[source.name])} "
                       f"chunks of {source.name} are missing (e.g. {paths.name(missing[0])}); rerun "
                       "`vllm-jax cache-features` with the same flags to finish it")
  return files


class Indexed(abc.Sequence):
  """`records` each with its `cache_index`, read on demand (a manifest's stay lazy: no list of
  every record): item i is `dict(records[i], cache_index=indices[i])` (`indices` None: i), the
  number of its entry in the cache. Picklable: grain worker processes read it."""

  def __init__(self, records: Sequence[dict[str, Any]], indices: np.ndarray | None = None):
    self.records, self.indices = records, indices

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = operator.index(index)  # numpy integers too (grain's indices)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    return dict(self.records[index], cache_index=index if self.indices is None else int(self.indices[index]))

  def __repr__(self) -> str:
    return f"Indexed({self.records!r})"

  def of_kind(self, *kinds: str) -> "Indexed":
    """The records of `kinds` (`datasets.of_kinds`), each keeping its cache_index: of a manifest,
    its files of those kinds and their places in it (no scan); else those of a list."""
    if hasattr(self.records, "positions"):  # a manifest's `Records`
      chosen, positions = self.records.of_kind(*kinds), self.records.positions(*kinds)
    else:
      positions = np.array([i for i, r in enumerate(self.records) if r["kind"] in kinds], np.int64)
      chosen = [self.records[i] for i in positions]
    return Indexed(chosen, positions if self.indices is None else self.indices[positions])


def from_cache(cfg, system, config, sources: Sequence[Any]) -> list[Any]:
  """`sources` trained from the cache `cfg.data.feature_cache` (checked by `open_for_training`):
  each record with its `cache_index` (`Indexed`), each decode the system's `cached_decode` of it."""
  files = open_for_training(cfg, system, config, sources)
  return [dataclasses.replace(s, records=Indexed(s.records),
                              decode=system.cached_decode(cfg, config, s.decode, files[s.name])) for s in sources]


_READERS: dict[tuple[str, ...], Any] = {}


def read(files: tuple[str, ...], index: int) -> dict[str, Any]:
  """Entry `index` of a source whose chunks are `files` (opened once per process)."""
  if files not in _READERS:
    _READERS[files] = grain.sources.ArrayRecordDataSource(list(files))
  return serialization.msgpack_restore(_READERS[files][index])


def entry(files: tuple[str, ...], record: dict[str, Any]) -> dict[str, Any]:
  """The cache entry of `record` (by its `cache_index`); MediaError when its media could not be
  read when the cache was made (training skips it, as it skips unreadable media)."""
  found = read(files, record["cache_index"])
  if not found["ok"]:
    raise MediaError(f"{record.get('media')} (when the feature cache was made): {found['error']}")
  return found


# --- writing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadMedia:
  """(source number, record) -> dict(ok, error, inputs, **facts): the record's media as its
  source's decode loads them for training (`media_inputs`), or `ok` False and the error.
  Picklable: grain worker processes run it."""
  decodes: tuple[Any, ...]

  def __call__(self, item: tuple[int, dict]) -> dict[str, Any]:
    number, record = item
    try:
      inputs, facts = self.decodes[number].media_inputs(record)
    except paths.StorageError:
      raise  # the store, not this record: every other record would fail alike
    except Exception as e:  # pylint: disable=broad-except  (training skips any unreadable record alike)
      return dict(ok=False, error=f"{type(e).__name__}: {e}")
    return dict(ok=True, error="", inputs=inputs, **facts)


def make_encoder(system, config, params, shapes: dict[str, tuple],
                 batch_size: int) -> Callable[[str, np.ndarray], np.ndarray]:
  """-> encode(input name, units [N, ...]) -> numpy features [N, ...] (dtype as `shapes` says):
  the system's frozen encoders, data parallel over this process's devices, on fixed batches of
  `batch_size` records' units (rounded up to a multiple of the device count; a unit count that
  varies by record counts one per record), the last padded, so that each input compiles once."""
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("data",))
  rows = NamedSharding(mesh, PartitionSpec("data"))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  fns = {}

  def encode(name, units):
    shape, dtype = shapes[name + FEATURES]
    size = math.ceil(batch_size * (shape[0] or 1) / len(devices)) * len(devices)
    if name not in fns:
      fns[name] = jax.jit(lambda p, x: system.encode_features(config, p, name, x).astype(dtype), out_shardings=rows)
    out = []
    for start in range(0, len(units), size):
      part = units[start:start + size]
      padded = np.concatenate([part, np.zeros((size - len(part), *part.shape[1:]), part.dtype)])
      out.append(jax.device_get(fns[name](params, jax.device_put(padded, rows)))[:len(part)])
    return np.concatenate(out)
  return encode


class Pending(abc.Sequence):
  """(source number, record) of each record of `spans` [(source number, start, stop)], in order,
  read on demand from `records` (the sources'): a process's share of a 10M-record manifest is not
  held whole. Picklable: grain worker processes read it."""

  def __init__(self, records: tuple[Sequence[dict], ...], spans: Sequence[tuple[int, int, int]]):
    self.records, self.spans = records, list(spans)
    self.ends = np.cumsum([stop - start for _, start, stop in self.spans], dtype=np.int64)

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def __getitem__(self, index):
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f"item {index} of {len(self)}")
    k = int(np.searchsorted(self.ends, index, side="right"))
    number, _, stop = self.spans[k]
    return number, self.records[number][stop - int(self.ends[k] - index)]


def write(out_dir: str, meta: dict, sources: Sequence[Any], encode: Callable, batch_size: int, *,
          chunk_size: int = 256, worker_count: int = 0, progress: bool = True) -> int:
  """Write (or finish) the cache of `sources` in `out_dir` (a folder or a URL): this process's
  missing chunks, `batch_size` records at a time through `encode` (`make_encoder`), each chunk put
  in place when complete. `meta`: `describe`'s; a folder holding another cache is refused. -> chunks
  written."""
  paths.makedirs(out_dir)
  meta = dict(meta, layout=dict(chunk_size=chunk_size, chunks={s.name: max(1, math.ceil(len(s.records) / chunk_size))
                                                                for s in sources}))
  if paths.exists(paths.join(out_dir, META)):
    held = load_meta(out_dir)
    diffs = differences(held, meta) + ([] if held["layout"] == meta["layout"] else
                                       [f"layout: cache {held['layout']}, this run {meta['layout']}"])
    if diffs:
      raise ValueError(f"{out_dir} holds another feature cache; remove it or choose another --out:\n  "
                       + "\n  ".join(diffs))
  elif jax.process_index() == 0:
    paths.write_json(paths.join(out_dir, META), meta)

  pending, have = [], present(out_dir)  # (source number, chunk file, start, stop)
  for number, source in enumerate(sources):
    files = chunk_files(out_dir, source.name, meta["layout"]["chunks"][source.name])
    for k, file in enumerate(files):
      if k % jax.process_count() == jax.process_index() and file not in have:
        pending.append((number, file, k * chunk_size, min((k + 1) * chunk_size, len(source.records))))
  items = Pending(tuple(s.records for s in sources), [(number, a, b) for number, _, a, b in pending])
  ds = grain.MapDataset.source(items).map(LoadMedia(tuple(s.decode for s in sources))).to_iter_dataset()
  if worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  loaded = iter(ds)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(items), desc="caching features", unit="example",
             disable=not progress or jax.process_index() != 0)
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="vllm_jax-cache-") as tmp:
    local = os.path.join(tmp, "chunk")  # ArrayRecordWriter writes local files only
    for _, file, start, stop in pending:
      writer = ArrayRecordWriter(local, "group_size:1")
      for first in range(start, stop, batch_size):
        entries = [next(loaded) for _ in range(first, min(first + batch_size, stop))]
        for e in encode_entries(entries, encode):
          writer.write(serialization.msgpack_serialize(e))
        bar.update(len(entries))
      writer.close()
      paths.write_bytes(file, paths.read_bytes(local))  # whole: a chunk under its name is complete
  bar.close()
  return len(pending)


def encode_entries(entries: list[dict], encode: Callable) -> list[dict]:
  """`LoadMedia` outputs -> cache entries: each record's encoder inputs replaced by their features
  ("{input}_features"), the units of all the records of an input encoded together."""
  good = [e for e in entries if e["ok"]]
  for name in sorted({name for e in good for name in e["inputs"]}):
    holders = [e for e in good if len(e["inputs"].get(name, ()))]
    if not holders:
      continue
    features = encode(name, np.concatenate([e["inputs"][name] for e in holders]))
    ends = np.cumsum([len(e["inputs"][name]) for e in holders])
    for e, part in zip(holders, np.split(features, ends[:-1])):
      e[name + FEATURES] = part
  return [{k: v for k, v in e.items() if k != "inputs"} for e in entries]
