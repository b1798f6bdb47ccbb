"""Frozen-feature cache for Video-LLaMA training: what the frozen encoders (EVA ViT + ln_vision +
image Q-Former per frame; the ImageBind audio encoder) make of each training example's media,
computed once (`vllm-jax cache-features`) instead of every epoch.

The media of a record are sampled as training samples them (frames and crops drawn from a
generator seeded by (seed, media path)), so a record's features are the same every epoch and the
cache holds one entry per record: entry i of a source is its i-th record.

A cache folder:
  features.json                                   what the cache holds and what made it (below)
  {source}.array_record-{k:05d}-of-{n:05d}        chunk k of a source ("captions", "instructions"):
                                                  records [k * chunk_size, (k + 1) * chunk_size)
Each ArrayRecord record is a msgpack map (`flax.serialization.msgpack_serialize`) of numpy arrays:
  ok: bool, error: str ("" when ok; else why the media could not be read: training skips the
  record as it skips unreadable media); frame_features [T, Q, E] float32 (ViT + ln_vision + image
  Q-Former, before the frame positions), frame_mask [T] bool, timestamps [n] float64, is_image,
  and with audio: audio_features [N, D] float32 (ImageBind), audio_valid.
Read with `grain.sources.ArrayRecordDataSource` (no TensorFlow in the input path; float32 bytes
kept exact, so training from the cache gives the losses of training from the videos).

features.json: `encoders` (a SHA-256 over the frozen encoder parameters' paths, dtypes, shapes and
bytes, as the trainer holds them: cast to `optim.frozen_dtype`), `preprocessing` (frame count, size,
sampling, crop, seed, audio clips), `sources` (annotation files with their size and the SHA-256 of
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
import os
import tempfile
from typing import Any, Callable, Sequence

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vllm_jax import paths
from vllm_jax.models.video_llama import VideoLlama, VideoLlamaConfig, abstract_params, init_inputs
from vllm_jax.train import optim

FORMAT = "vllm_jax.feature_cache/1"
META = "features.json"
COMPARED = ("encoders", "preprocessing", "sources", "features")
LABELS = {"encoders": "encoder weights", "preprocessing": "preprocessing", "sources": "dataset files",
          "features": "feature shapes"}
VISION_ENCODERS = ("vision/visual_encoder/", "vision/ln_vision/", "vision/qformer/")
AUDIO_ENCODER = ("audio/encoder/",)


def encoder_prefixes(with_audio: bool) -> tuple[str, ...]:
  return VISION_ENCODERS + (AUDIO_ENCODER if with_audio else ())


def feature_shapes(config: VideoLlamaConfig, with_audio: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Per-example cached arrays -> (shape, dtype): frame_features [T, Q, E], frame_mask [T] and,
  with audio, audio_features [N, D]."""
  vision, t = config.vision, config.num_frames
  shapes = {"frame_features": ((t, vision.qformer.num_queries, vision.qformer.hidden_size), np.float32),
            "frame_mask": ((t,), np.bool_)}
  if with_audio:
    shapes["audio_features"] = ((config.audio.max_clips, config.audio.encoder.out_dim), np.float32)
  return shapes


def encoder_params(cfg, config: VideoLlamaConfig) -> dict:
  """The frozen encoders' parameters (nested, numpy) as training holds them: from `init_from`'s
  folder (only these tensors are read) or the trainer's random init, cast to `optim.frozen_dtype`."""
  prefixes = encoder_prefixes(cfg.data.with_audio)
  abstract = {k: v for k, v in optim.flatten(nn.meta.unbox(abstract_params(config))).items()
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
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in init_inputs(config).items()}
    keep = lambda p: optim.unflatten({k: v for k, v in optim.flatten(p).items() if k in abstract})
    params = jax.jit(lambda key: keep(nn.meta.unbox(VideoLlama(config).init(key, **inputs)["params"])))(init_key)
  return jax.device_get(jax.jit(lambda p: optim.cast(p, cfg.optim.frozen_dtype))(params))


def fingerprint(params) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes."""
  digest = hashlib.sha256()
  for path, value in sorted(optim.flatten(params).items()):
    value = np.ascontiguousarray(value)
    digest.update(f"{path}:{value.dtype}:{list(value.shape)};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def describe(cfg, config: VideoLlamaConfig, sources: Sequence[Any], params) -> dict:
  """features.json's compared sections for a run of `cfg` over `sources` (`systems.video_llama.Source`)
  with the encoder parameters `params` (`encoder_params`), plus `made_from`."""
  decode = sources[0].decode  # the media settings are common to all sources
  meta = dict(
      format=FORMAT,
      encoders=dict(fingerprint=fingerprint(params), frozen_dtype=str(cfg.optim.frozen_dtype)),
      preprocessing=dict(num_frames=decode.num_frames, image_size=decode.image_size, sampling=decode.sampling,
                         train_crop=decode.train_crop, seed=decode.seed,
                         audio=None if decode.audio is None else dataclasses.asdict(decode.audio)),
      sources={s.name: dict(files={paths.resolve(f): file_fingerprint(f) for f in s.files},
                            media_dir=paths.resolve(s.media_dir or "."), num_records=len(s.records))
               for s in sources},
      features={k: [list(shape), np.dtype(dtype).name] for k, (shape, dtype) in
                feature_shapes(config, cfg.data.with_audio).items()},
      made_from=dict(init_from=paths.resolve(cfg.init_from) if cfg.init_from else "",
                     encoder_parameters={k: [list(np.shape(v)), str(np.asarray(v).dtype)]
                                         for k, v in optim.flatten(params).items()}))
  return json.loads(json.dumps(meta))  # as read back: lists, not tuples


def file_fingerprint(path: str) -> dict:
  """An annotation file's size and the SHA-256 of its text: the same wherever the same file is read
  from (unlike a modification time, which a copy or an upload changes)."""
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


def open_for_training(cfg, config: VideoLlamaConfig, sources: Sequence[Any]) -> dict[str, tuple[str, ...]]:
  """The chunk files of each source in the cache `cfg.data.feature_cache`, once the cache is
  found complete and made for this run (same encoder weights, preprocessing, data files); else
  ValueError naming what differs."""
  cache_dir = cfg.data.feature_cache
  meta = load_meta(cache_dir)
  prefixes = encoder_prefixes(cfg.data.with_audio)
  trained = [k for k in optim.flatten(nn.meta.unbox(abstract_params(config)))
             if k.startswith(prefixes) and optim.matches(k, cfg.optim.trainable)]
  if trained:
    raise ValueError(f"optim.trainable trains frozen encoder parameters ({', '.join(trained[:3])}, ...), whose "
                     f"outputs the feature cache {cache_dir} holds: train without data.feature_cache")
  diffs = differences(meta, describe(cfg, config, sources, encoder_params(cfg, config)))
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


_READERS: dict[tuple[str, ...], Any] = {}


def read(files: tuple[str, ...], index: int) -> dict[str, Any]:
  """Entry `index` of a source whose chunks are `files` (opened once per process)."""
  if files not in _READERS:
    _READERS[files] = grain.sources.ArrayRecordDataSource(list(files))
  return serialization.msgpack_restore(_READERS[files][index])


# --- writing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadMedia:
  """(source number, record) -> the record's media as its source's training decode loads them
  (frames, frame_mask, audio, timestamps, ...), or `ok` False and the error. Picklable: grain
  worker processes run it."""
  decodes: tuple[Any, ...]

  def __call__(self, item: tuple[int, dict]) -> dict[str, Any]:
    number, record = item
    decode = self.decodes[number]
    try:
      media = decode.load(record)
    except paths.StorageError:
      raise  # the store, not this record: every other record would fail alike
    except Exception as e:  # pylint: disable=broad-except  (training skips any unreadable record alike)
      return dict(ok=False, error=f"{type(e).__name__}: {e}")
    return dict(ok=True, error="", timestamps=np.asarray(media.frames.timestamps, np.float64),
                is_image=bool(media.is_image), audio_valid=bool(media.audio_valid), **decode.media_arrays(media))


def make_encoder(config: VideoLlamaConfig, params, batch_size: int) -> tuple[Callable, int]:
  """-> (encode(frames [B, T, S, S, 3], clips [B, N, 1, mel, frames] | None) -> numpy (frame
  features [B, T, Q, E], audio features [B, N, D] | None), B): the frozen encoders, data parallel
  over this process's devices (B: `batch_size` rounded up to a multiple of their count)."""
  devices = jax.local_devices()
  batch_size = math.ceil(batch_size / len(devices)) * len(devices)
  mesh = Mesh(np.array(devices), ("data",))
  rows = NamedSharding(mesh, PartitionSpec("data"))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  model = VideoLlama(config)
  fn = jax.jit(lambda p, frames, clips: model.apply({"params": p}, frames, clips, method="frozen_features"),
               out_shardings=rows)

  def encode(frames, clips):
    put = lambda x: None if x is None else jax.device_put(x, rows)
    return jax.device_get(fn(params, put(frames), put(clips)))
  return encode, batch_size


def write(out_dir: str, meta: dict, sources: Sequence[Any], encode: Callable, batch_size: int, *,
          chunk_size: int = 256, worker_count: int = 0, progress: bool = True) -> int:
  """Write (or finish) the cache of `sources` in `out_dir` (a folder or a URL): this process's
  missing chunks, each encoded `batch_size` records at a time by `encode` (`make_encoder`) and put
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

  pending, have = [], present(out_dir)  # (source number, chunk file, records)
  for number, source in enumerate(sources):
    files = chunk_files(out_dir, source.name, meta["layout"]["chunks"][source.name])
    for k, file in enumerate(files):
      if k % jax.process_count() == jax.process_index() and file not in have:
        pending.append((number, file, source.records[k * chunk_size:(k + 1) * chunk_size]))
  items = [(number, record) for number, _, records in pending for record in records]
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
    for _, file, records in pending:
      writer = ArrayRecordWriter(local, "group_size:1")
      for start in range(0, len(records), batch_size):
        entries = [next(loaded) for _ in records[start:start + batch_size]]
        for entry in encode_entries(entries, encode, batch_size):
          writer.write(serialization.msgpack_serialize(entry))
        bar.update(len(entries))
      writer.close()
      paths.write_bytes(file, paths.read_bytes(local))  # whole: a chunk under its name is complete
  bar.close()
  return len(pending)


def encode_entries(entries: list[dict], encode: Callable, batch_size: int) -> list[dict]:
  """`LoadMedia` outputs -> cache entries: media replaced by their features (one padded batch
  of `batch_size` through `encode`, so every batch compiles once)."""
  good = [e for e in entries if e["ok"]]
  if good:
    pad = lambda xs: np.concatenate([np.stack(xs), np.zeros((batch_size - len(xs), *xs[0].shape), xs[0].dtype)])
    with_audio = "audio" in good[0]
    frames, clips = encode(pad([e["frames"] for e in good]), pad([e["audio"] for e in good]) if with_audio else None)
    for i, e in enumerate(good):
      e["frame_features"] = frames[i]
      if with_audio:
        e["audio_features"] = clips[i]
  return [{k: v for k, v in e.items() if k not in ("frames", "audio")} for e in entries]
