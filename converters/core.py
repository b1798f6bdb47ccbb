"""Checkpoint conversion: a table of rules, streamed tensor readers, and named-key checks.

A converter is a list of `Rule`s (source key -> Flax parameter path(s), plus a `Transform`).
`convert` checks every key and shape of the source against the model's abstract parameters
before it reads a single tensor, then streams the tensors one at a time into the output
tree; `export` runs the rules backwards (Flax -> PyTorch names and layouts). `convert_lazily` and
`save_lazily` write an orbax checkpoint without building the tree: each tensor is read as it is written.
"""

import asyncio
import ctypes
import dataclasses
import itertools
import json
import mmap
import os
import pickle
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from tqdm.auto import tqdm

from vllm_jax import paths, quiet
from vllm_jax.train import checkpoint

Params = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Transforms: how one source tensor becomes one or more Flax tensors, and back.


@dataclasses.dataclass(frozen=True)
class Transform:
  """to_flax(source, *target_shapes) -> tuple of Flax arrays; to_torch(*flax_arrays) -> source.

  `to_torch` must also work on abstract arrays (it is traced by `jax.eval_shape` to compute
  the source shape a target shape implies), so it uses array methods and `jnp` functions only.
  """
  name: str
  to_flax: Callable[..., tuple[np.ndarray, ...]]
  to_torch: Callable[..., Any]


IDENTITY = Transform("identity", lambda x, shape: (x.reshape(shape),), lambda y: y)


def dense(in_dims: int = 1) -> Transform:
  """torch Linear weight [out, in] <-> kernel [*in_shape, *out_shape] (first `in_dims` axes in)."""
  def to_torch(y):
    n_in = int(np.prod(y.shape[:in_dims]))
    return y.reshape(n_in, -1).T
  return Transform(f"dense{in_dims}", lambda x, shape: (x.T.reshape(shape),), to_torch)


def bias_as(source_shape: Sequence[int] | None = None) -> Transform:
  """A bias [out] <-> [*out_shape]; with `source_shape` the source keeps that shape (e.g. [1,1,E])."""
  def to_torch(y):
    return y.reshape(source_shape) if source_shape is not None else y.reshape(-1)
  return Transform("bias", lambda x, shape: (x.reshape(shape),), to_torch)


CONV = Transform(
    "conv", lambda x, shape: (x.transpose(2, 3, 1, 0).reshape(shape),), lambda y: y.transpose(3, 2, 0, 1))


def split(parts: int, part_transform: Transform, keep: Sequence[int] | None = None) -> Transform:
  """A packed tensor (e.g. qkv [3E, ...]) split along axis 0 into `parts`; `keep` drops the
  others, which must be zero (they are written back as zeros)."""
  keep = tuple(range(parts)) if keep is None else tuple(keep)

  def to_flax(x, *shapes):
    chunks = np.split(x, parts, axis=0)
    dropped = [i for i in range(parts) if i not in keep]
    for i in dropped:
      if np.any(chunks[i]):
        raise ValueError(f"part {i} of a packed tensor is non-zero, but this model has no slot for it")
    return tuple(part_transform.to_flax(chunks[i], shape)[0] for i, shape in zip(keep, shapes))

  def to_torch(*ys):
    chunks = [part_transform.to_torch(y) for y in ys]
    full = [None] * parts
    for i, c in zip(keep, chunks):
      full[i] = c
    return jnp.concatenate([jnp.zeros_like(chunks[0]) if c is None else c for c in full], axis=0)

  return Transform(f"split{parts}({part_transform.name})", to_flax, to_torch)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One source key -> Flax path(s). `{i}` in `source` marks a per-layer key; its targets are
  stacked along their leading (layers) axis. Paths are '/'-joined."""
  source: str
  targets: str | tuple[str, ...]
  transform: Transform = IDENTITY

  @property
  def target_paths(self) -> tuple[str, ...]:
    return (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

  @property
  def stacked(self) -> bool:
    return "{i}" in self.source


# ---------------------------------------------------------------------------------------------
# Readers: tensors by name, shapes without reading, one tensor at a time.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class TensorReader(Protocol):
  """Read-only mapping of tensor names to numpy arrays, loaded on demand."""

  def keys(self) -> list[str]: ...

  def shape(self, key: str) -> tuple[int, ...]: ...

  def read(self, key: str) -> np.ndarray: ...


class SafetensorsReader:
  """One or more .safetensors files, local or stored; each tensor is read from its file when asked for
  (bf16 kept exact via ml_dtypes). Plain reads rather than a memory map: the pages of a map stay counted
  in the process's memory once read, so converting a whole checkpoint would grow it to the checkpoint's
  size. A stored file is read a tensor at a time too (a range of the object), never copied whole."""

  def __init__(self, files: Sequence[str]):
    self._entries: dict[str, tuple[str, int, dict]] = {}
    for path in files:
      size = paths.size(path)
      try:
        header_len = int.from_bytes(paths.read_range(path, 0, 8), "little")
        header = json.loads(paths.read_range(path, 8, header_len)) if 8 + header_len <= size else None
      except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
      if header is None:
        raise ValueError(f"{path} is not a safetensors file (its header cannot be read)")
      end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
      if 8 + header_len + end > size:
        raise ValueError(f"{path} is truncated: its tensors need {8 + header_len + end} bytes, the file has {size}")
      for name, info in header.items():
        if name != "__metadata__":
          self._entries[name] = (paths.resolve(path), 8 + header_len, info)

  def keys(self):
    return list(self._entries)

  def shape(self, key):
    return tuple(self._entries[key][2]["shape"])

  def read(self, key):
    path, data_start, info = self._entries[key]
    start, end = info["data_offsets"]
    if paths.is_url(path):
      data = np.frombuffer(paths.read_range(path, data_start + start, end - start), np.uint8)
    else:
      data = np.fromfile(path, dtype=np.uint8, count=end - start, offset=data_start + start)
    return data.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def check_torch_checkpoint(path: str) -> None:
  """FileNotFoundError or ValueError unless `path` is a file in torch.save's zip format (the format
  `TorchReader` maps; older pickles cannot be mapped), judged by its first bytes."""
  if not paths.is_file(path):
    raise FileNotFoundError(f"no such file: {path}")
  if paths.read_range(path, 0, 4) != b"PK\x03\x04":
    raise ValueError(f"{path} is not a PyTorch checkpoint (torch.save's zip file)")


class TorchReader:
  """A torch `.bin`/`.pth` state dict, memory-mapped; `subkey` picks a nested dict ('model'). A stored
  file is mapped from a local temporary copy, deleted at once: the mapping keeps its data while in use."""

  def __init__(self, files: Sequence[str], subkey: str | None = None):
    import torch  # converters of PyTorch pickles need torch; safetensors ones do not
    self._tensors = {}
    for path in files:
      check_torch_checkpoint(path)
      with paths.local_copy(path) as local:
        try:
          state = torch.load(local, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # a cut or foreign zip
          raise ValueError(f"{path}: torch cannot read it ({str(e).splitlines()[0]})") from None
      if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
      if subkey is not None and subkey in state:
        state = state[subkey]
      self._tensors.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def read(self, key):
    """A copy of the tensor, made a slice at a time: each slice's pages of the mapped file are dropped
    once copied, as they would otherwise stay counted in the process's memory until it closes."""
    tensor = self._tensors[key]
    mapped = torch_to_numpy(tensor)
    if not mapped.flags.c_contiguous:  # not written by save_pretrained: copied at once
      value = np.ascontiguousarray(mapped)
      _drop_pages(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
      return value
    flat, value = mapped.reshape(-1), np.empty(mapped.size, mapped.dtype)
    step = max(1, (16 << 20) // mapped.itemsize)
    for i in range(0, flat.size, step):
      value[i:i + step] = flat[i:i + step]
      _drop_pages(flat[i:i + step].ctypes.data, flat[i:i + step].nbytes)
    return value.reshape(mapped.shape)


def _drop_pages(address: int, nbytes: int) -> None:
  """Unmap the pages of a read-only file mapping that hold [address, address + nbytes): they stay in the
  page cache, and a later read faults them back in from the file."""
  madvise = getattr(ctypes.CDLL(None), "madvise", None)
  if madvise is None or not nbytes:
    return
  start = address // mmap.PAGESIZE * mmap.PAGESIZE
  end = -(-(address + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
  madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), getattr(mmap, "MADV_DONTNEED", 4))


class DictReader:
  """An in-memory state dict of numpy arrays or torch tensors."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._tensors = dict(tensors)

  def keys(self):
    return list(self._tensors)

  def shape(self, key):
    return tuple(self._tensors[key].shape)

  def read(self, key):
    t = self._tensors[key]
    return t if isinstance(t, np.ndarray) else torch_to_numpy(t)


def torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def open_checkpoint(path: str, subkey: str | None = "model") -> TensorReader:
  """A reader for a file (.safetensors, .bin, .pth, .pt) or an HF folder of weight shards, local or stored."""
  if paths.is_dir(path):
    names = paths.listdir(path)
    files = [paths.join(path, n) for n in names if n.endswith(".safetensors")]
    if files:
      return SafetensorsReader(files)
    files = [paths.join(path, n) for n in names if n.endswith(".bin") and "training_args" not in n]
    if files:
      return TorchReader(files, subkey)
    raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {path}")
  if not paths.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    return SafetensorsReader([path])
  return TorchReader([path], subkey)


# ---------------------------------------------------------------------------------------------
# Conversion and its checks.


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model: every offending key is named."""

  def __init__(self, missing=(), unexpected=(), misshaped=()):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = ["checkpoint does not match the model:"]
    if self.missing:
      lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    for key, got, want in self.misshaped:
      lines.append(f"  shape mismatch for {key}: checkpoint has {list(got)}, model expects {list(want)}")
    super().__init__("\n".join(lines))


def get_path(tree: Mapping, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def set_path(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def _source_key(rule: Rule, layer: int | None) -> str:
  return rule.source.replace("{i}", str(layer)) if rule.stacked else rule.source


def _jobs(rules: Sequence[Rule], abstract: Mapping) -> Iterator[tuple[Rule, int | None, str, tuple]]:
  """(rule, layer, source key, per-layer target structs) for every tensor the rules expect."""
  for rule in rules:
    structs = [get_path(abstract, p) for p in rule.target_paths]
    if rule.stacked:
      for layer in range(structs[0].shape[0]):
        yield rule, layer, _source_key(rule, layer), tuple(
            jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for s in structs)
    else:
      yield rule, None, rule.source, tuple(structs)


def expected_source_shapes(rules: Sequence[Rule], abstract: Mapping) -> dict[str, tuple[int, ...]]:
  """Source key -> shape that the model's abstract parameters imply, computed without memory."""
  shapes, cache = {}, {}
  for rule, _, key, structs in _jobs(rules, abstract):
    sig = (rule.transform.name, tuple(s.shape for s in structs))
    if sig not in cache:
      cache[sig] = tuple(jax.eval_shape(rule.transform.to_torch, *structs).shape)
    shapes[key] = cache[sig]
  return shapes


def check(reader: TensorReader, rules: Sequence[Rule], abstract: Mapping,
          ignore: Sequence[str] = ()) -> None:
  """Raise `CheckpointMismatchError` naming every missing, unexpected or mis-shaped key."""
  expected = expected_source_shapes(rules, abstract)
  present = set(reader.keys())
  ignored = [re.compile(p) for p in ignore]
  missing = sorted(k for k in expected if k not in present)
  unexpected = sorted(k for k in present if k not in expected and not any(p.fullmatch(k) for p in ignored))
  misshaped = [(k, reader.shape(k), want) for k, want in expected.items()
               if k in present and tuple(reader.shape(k)) != tuple(want)]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(missing, unexpected, misshaped)


def convert(reader: TensorReader, rules: Sequence[Rule], abstract: Mapping, *,
            ignore: Sequence[str] = (), desc: str = "converting", progress: bool = True) -> Params:
  """Source tensors -> nested dict of numpy arrays at the paths the rules name.

  `abstract`: the model's parameters as `jax.ShapeDtypeStruct`s (from `jax.eval_shape`); the
  output takes their shapes and dtypes. Extra checkpoint keys matching a regex in `ignore`
  are skipped. Tensors are read and converted one at a time.
  """
  check(reader, rules, abstract, ignore)
  out: Params = {}
  for rule in rules:
    for path in rule.target_paths:
      struct = get_path(abstract, path)
      set_path(out, path, np.empty(struct.shape, struct.dtype) if rule.stacked else None)
  jobs = list(_jobs(rules, abstract))
  for rule, layer, key, structs in tqdm(jobs, desc=desc, unit="tensor", disable=not progress or quiet()):
    values = rule.transform.to_flax(reader.read(key), *[s.shape for s in structs])
    for path, struct, value in zip(rule.target_paths, structs, values):
      value = np.asarray(value).astype(struct.dtype, copy=False)
      if layer is None:
        set_path(out, path, np.ascontiguousarray(value).reshape(struct.shape))  # 0-d stays 0-d
      else:
        get_path(out, path)[layer] = value
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
  """A parameter `convert_lazily` has checked but not read: `read` reads and converts it (one layer
  of a stacked one) from the checkpoint when it is written."""
  reader: TensorReader
  rule: Rule
  output: int  # which of the rule's targets this is
  shapes: tuple[tuple[int, ...], ...]  # the rule's target shapes (per layer when stacked)
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def layers(self) -> int | None:
    return self.shape[0] if self.rule.stacked else None

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def read(self, layer: int | None = None) -> np.ndarray:
    """The parameter, or layer `layer` of a stacked one, in the checkpoint's dtype (a rule with several
    targets reads its source once for each)."""
    value = self.rule.transform.to_flax(self.reader.read(_source_key(self.rule, layer)), *self.shapes)[self.output]
    return np.asarray(value).reshape(self.shapes[self.output])


def convert_lazily(reader: TensorReader, rules: Sequence[Rule], abstract: Mapping, *,
                   ignore: Sequence[str] = ()) -> Params:
  """As `convert`, but the tree holds `LazyTensor`s, read only while `save_lazily` writes them: the
  checkpoint is checked now, and no more than one tensor is ever in memory."""
  check(reader, rules, abstract, ignore)
  out: Params = {}
  for rule in rules:
    structs = [get_path(abstract, p) for p in rule.target_paths]
    shapes = tuple(s.shape[1:] if rule.stacked else s.shape for s in structs)
    for i, (path, struct) in enumerate(zip(rule.target_paths, structs)):
      set_path(out, path, LazyTensor(reader, rule, i, shapes, tuple(struct.shape), np.dtype(struct.dtype)))
  return out


def export(params: Mapping, rules: Sequence[Rule], *, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
  """Flax parameters -> (source key, numpy array in the source layout), one at a time."""
  for rule in rules:
    values = [np.asarray(get_path(params, p)) for p in rule.target_paths]
    layers = range(values[0].shape[0]) if rule.stacked else [None]
    for layer in layers:
      parts = values if layer is None else [v[layer] for v in values]
      tensor = np.asarray(rule.transform.to_torch(*parts))
      yield _source_key(rule, layer), tensor if dtype is None else tensor.astype(dtype)


def write_safetensors(tensors: Sequence[tuple[str, np.ndarray]], path: str) -> None:
  """Write (name, array) pairs as one local .safetensors file (loadable by torch and HF)."""
  header, offset = {}, 0
  for name, arr in tensors:
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).tobytes())


def write_safetensors_shards(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str,
                             max_shard_bytes: int = 4 << 30, prefix: str = "model") -> list[str]:
  """Stream tensors into HF-style shards (`model-00001-of-0000N.safetensors` plus an index
  when there is more than one) in a local folder; at most one shard is held in memory."""
  shards: list[list[str]] = []
  pending: list[tuple[str, np.ndarray]] = []
  size = 0

  def flush():
    nonlocal pending, size
    if pending:
      write_safetensors(pending, os.path.join(out_dir, f"{prefix}-part{len(shards)}.tmp"))
      shards.append([k for k, _ in pending])
      pending, size = [], 0

  for name, arr in tensors:
    if size and size + arr.nbytes > max_shard_bytes:
      flush()
    pending.append((name, arr))
    size += arr.nbytes
  flush()
  if len(shards) == 1:
    names = [f"{prefix}.safetensors"]
  else:
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for i, name in enumerate(names):
    os.replace(os.path.join(out_dir, f"{prefix}-part{i}.tmp"), os.path.join(out_dir, name))
  if len(names) > 1:
    weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
    with open(os.path.join(out_dir, f"{prefix}.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
  return names


# ---------------------------------------------------------------------------------------------
# Writing a tree of LazyTensors as the orbax checkpoint `save_params` writes, a piece at a time.

CHUNK_BYTES = 8 << 20  # what is held besides the tensor is a few chunks


class _LazyTensorHandler(ocp.type_handlers.NumpyHandler):
  """Writes each LazyTensor as orbax writes a numpy array (so it restores as one), one storage chunk at
  a time, and one tensor after the other: the memory held is one source tensor and a few chunks."""

  def __init__(self, progress: tqdm):
    super().__init__(deepcopy_host_arrays=False)
    self._lock = asyncio.Lock()  # orbax starts every write at once
    self._progress = progress
    self.error = None  # the first write's failure; `save_lazily` raises it once orbax is done

  async def _open_and_write(self, value: LazyTensor, tspec, ts_context):
    # A failure is kept, not raised, and the writes still waiting are skipped: raised, it would end
    # orbax's event loop while they wait on the lock (each then fails again, noisily, when collected).
    async with self._lock:
      if self.error is None:
        try:
          await self._write(value, tspec, ts_context)
        except Exception as e:  # pylint: disable=broad-except
          self.error = e

  async def _write(self, value: LazyTensor, tspec, ts_context):
    # orbax's context keeps up to 100 MB of the OCDBT B-tree cached, and each chunk written adds to it
    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": CHUNK_BYTES}}, parent=ts_context)
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=context)
    chunk = store.chunk_layout.write_chunk.shape
    for layer in [None] if value.layers is None else range(value.layers):
      x = value.read(layer)
      dest, dest_chunk = (store, chunk) if layer is None else (store[layer], chunk[1:])
      starts = [range(0, n, c) for n, c in zip(x.shape, dest_chunk)]
      for origin in itertools.product(*starts):
        region = tuple(slice(o, o + c) for o, c in zip(origin, dest_chunk))
        await dest[region].write(np.asarray(x[region], value.dtype))  # a copy only to change the dtype
      del x
      self._progress.update()


def _unmap_freed_buffers() -> None:
  """Have glibc return every buffer of 1 MiB or more to the system when it is freed (for the rest of the
  process). By default it raises that threshold to the largest buffer freed so far and keeps smaller
  ones for reuse, so tensorstore's chunk buffers, allocated on many threads, pile up."""
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is not None:
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def save_lazily(path: str, params: Params, *, progress: bool = True, desc: str = "writing") -> None:
  """Write a tree of `LazyTensor`s as an orbax checkpoint at `path` (any `paths` path: orbax builds the
  TensorStore spec each tensor is opened with, a gcs one for gs://) that `restore_params` reads like one
  `save_params` wrote. Stacked tensors are stored one chunk per layer (or smaller), so each layer is
  read, converted and written on its own."""
  _unmap_freed_buffers()
  leaves = jax.tree.leaves(params)
  bar = tqdm(total=sum(x.layers or 1 for x in leaves), desc=desc, unit="tensor", disable=not progress or quiet())
  handler = _LazyTensorHandler(bar)
  registry = ocp.type_handlers.create_type_handler_registry((LazyTensor, handler))
  save_args = jax.tree.map(lambda x: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if x.layers else ()),
                           params)
  with checkpoint.writing(path, "the parameters"), bar, ocp.Checkpointer(
      ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
    try:
      checkpointer.save(paths.resolve(path), args=ocp.args.PyTreeSave(params, save_args=save_args), force=True)
    except Exception:  # pylint: disable=broad-except  (orbax's own, once a tensor is missing: not the cause)
      if handler.error is None:
        raise
    if handler.error is not None:
      raise handler.error
