"""Every path a user gives, read and written one way: local ones (relative to the current folder,
`~`, symlinks, spaces) and URLs (gs:// or any other fsspec protocol), through `etils.epath`, as
orbax itself reads and writes checkpoints. Nothing else in the package calls open/os.path on a
user's path.

Paths are plain strings. `resolve` makes a local one absolute (against the current folder, once)
and leaves a URL as it is; every function here resolves its argument, so `model`, `./model/`,
`~/model` and `gs://bucket/model` all work wherever a path is taken.

Object stores cannot rename or append: `write_text` writes a local file to a temporary sibling
and renames it into place (an object is replaced whole by one write, which is atomic there too);
`Appender` appends locally and rewrites the object on a store; `staged_folder` writes a folder
beside its place and moves it there once complete (a rename locally, a copy on a store).

Failures of the storage itself (no such bucket, no network, no credentials) raise `StorageError`,
one line naming the path and the cause.
"""

import contextlib
import errno
import io
import json
import logging
import os
import re
import secrets
import tempfile
from typing import Any, Iterator

import fsspec
from etils import epath

log = logging.getLogger(__name__)

# The store clients log each failed request with its traceback before raising: `_storage` reports
# the failure in one line. google.auth warns wherever no Compute Engine metadata server answers;
# fsspec logs each file it opens with read-ahead (at INFO: a line per video in a training log).
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
logging.getLogger("google.auth").setLevel(logging.ERROR)
logging.getLogger("fsspec").setLevel(logging.WARNING)


class StorageError(OSError):
  """A path's storage could not be reached or refused the operation."""


def is_url(path: str) -> bool:
  return "://" in os.fspath(path)


def resolve(path: str) -> str:
  """`path` as the package keeps it: local paths absolute (`~` expanded, symlinks kept), URLs as
  given less a trailing slash."""
  path = os.fspath(path)
  if not path:
    raise ValueError("an empty path")
  if is_url(path):
    scheme, _, rest = path.partition("://")
    if not rest.strip("/"):
      raise ValueError(f"{path}: no bucket or host in the URL")
    return f"{scheme}://{rest.rstrip('/')}"
  return os.path.abspath(os.path.expanduser(path))


def shown(path: str) -> str:
  """`path` as a message shows it: relative to the current folder when inside it."""
  path = resolve(path)
  if is_url(path):
    return path
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def _epath(path: str) -> epath.Path:
  """The `etils.epath.Path` of a user path."""
  return epath.Path(resolve(path))


def covers(path: str, other: str) -> str | None:
  """Whether replacing `path` replaces `other`: "is" (the same file or folder), "holds" (`other`
  lies inside it), or None. Local symlinks are followed."""
  path, other = (p if is_url(p) else os.path.realpath(p) for p in (resolve(path), resolve(other)))
  if path == other:
    return "is"
  if other.startswith(path.rstrip("/") + "/"):
    return "holds"
  return None


def join(path: str, *names: str) -> str:
  return str(_epath(path).joinpath(*names))


def name(path: str) -> str:
  """The last part of a path (a file's or folder's name)."""
  return _epath(path).name


def parent(path: str) -> str:
  return str(_epath(path).parent)


@contextlib.contextmanager
def _storage(path: str) -> Iterator[None]:
  """Errors of a store's client as one line naming `path`; local errors pass as they are."""
  try:
    yield
  except (StorageError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError):
    raise
  except FileNotFoundError as e:
    if not is_url(path):
      raise
    raise _not_found(path) from e
  except Exception as e:  # pylint: disable=broad-except  (the clients' own exception types vary)
    if not is_url(path):
      raise
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise StorageError(f"cannot reach {path}: {cause}") from e


def _not_found(path: str) -> OSError:
  scheme, _, rest = resolve(path).partition("://")
  bucket = f"{scheme}://{rest.split('/')[0]}"
  try:
    has_bucket = epath.Path(bucket).exists()
  except Exception:  # pylint: disable=broad-except
    has_bucket = True  # no better cause to give than the path
  if not has_bucket:
    return StorageError(f"{path}: the bucket {bucket} does not exist")
  return FileNotFoundError(f"not found: {path}")


# What to do about an operating-system error, by errno.
OS_ERROR_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: write elsewhere, or change the folder's permissions",
    errno.EPERM: "no permission: write elsewhere, or change the folder's permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder: give a file",
    errno.EEXIST: "it already exists",
}
STAGING = re.compile(r"\.([^/]+)\.partial-[0-9a-f]{8}(\.old)?")


def os_error_message(e: OSError) -> str:
  """An operating-system error as one line: the path (a staged folder as the folder it becomes),
  what went wrong and what to do."""
  if e.errno is None:  # raised with a message of its own
    return str(e)
  where = STAGING.sub(r"\1", str(e.filename)) if e.filename else None
  advice = OS_ERROR_ADVICE.get(e.errno, "")
  return f"{f'{where}: ' if where else ''}{e.strerror or e}{f' ({advice})' if advice else ''}"


def check_writable(path: str) -> None:
  """Before a command loads anything: its output `path` (a file or folder, new or not) can be made
  beside its place, i.e. the nearest existing folder above it is a folder this process may write in
  (outputs are written beside their place and moved in). OSError otherwise: a read-only file
  system, no permission, a file where a folder should be. Stores are not probed: a bucket's
  permissions show at its first write."""
  if is_url(path):
    return
  folder = os.path.dirname(os.path.abspath(resolve(path)))
  while not os.path.lexists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
  if not os.access(folder, os.W_OK):
    code = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
    raise OSError(code, os.strerror(code), folder)


def _store(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """A URL's filesystem and its name there, with no listing cached: another process or host may
  have written since this one last looked."""
  fs, name_in_fs = fsspec.core.url_to_fs(resolve(path))
  fs.invalidate_cache(name_in_fs)
  return fs, name_in_fs


def _kind(path: str) -> str | None:
  """'file', 'directory' or None (nothing there). Asked of a store's filesystem directly: its
  `exists`/`isdir` answer False when the store cannot be reached."""
  if not is_url(path):
    path = resolve(path)
    return "directory" if os.path.isdir(path) else "file" if os.path.exists(path) else None
  with _storage(path):
    fs, name_in_fs = _store(path)
    try:
      return fs.info(name_in_fs)["type"]
    except FileNotFoundError:
      return None


def exists(path: str) -> bool:
  return _kind(path) is not None


def is_file(path: str) -> bool:
  return _kind(path) == "file"


def is_dir(path: str) -> bool:
  return _kind(path) == "directory"


def listdir(path: str) -> list[str]:
  """The names in a folder, sorted."""
  if not is_url(path):
    return sorted(os.listdir(resolve(path)))
  with _storage(path):
    fs, name_in_fs = _store(path)
    return sorted(child.rstrip("/").rsplit("/", 1)[-1] for child in fs.ls(name_in_fs, detail=False))


def size(path: str) -> int:
  with _storage(path):
    return _epath(path).stat().length


def read_bytes(path: str) -> bytes:
  with _storage(path):
    return _epath(path).read_bytes()


def read_range(path: str, start: int, length: int) -> bytes:
  """`length` bytes of a file from byte `start`: a piece of a large object, without reading it all."""
  with _storage(path), _epath(path).open("rb") as f:
    f.seek(start)
    return f.read(length)


def read_text(path: str) -> str:
  with _storage(path):
    return _epath(path).read_text()


def read_json(path: str) -> Any:
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def open_text(path: str):
  """A file object reading `path` as text, lines as they come (a large CSV is not read whole)."""
  with _storage(path):
    return _epath(path).open("r")


def makedirs(path: str) -> None:
  """Create a folder and its parents (nothing to do on an object store, whose folders are names)."""
  if not is_url(path):
    os.makedirs(resolve(path), exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
  """Write `path` whole: a failure leaves what was there before. Local files go to a temporary
  sibling, reach the disk and are renamed into place; an object store replaces an object
  atomically."""
  path = resolve(path)
  with _storage(path):
    if is_url(path):
      epath.Path(path).write_bytes(data)
      return
    makedirs(os.path.dirname(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2))


def remove(path: str) -> None:
  """Delete a file, or a folder with everything in it; nothing to do when absent."""
  with _storage(path):
    p = _epath(path)
    if p.is_dir():
      p.rmtree()
    elif p.exists():
      p.unlink()


def copy_tree(source: str, dest: str) -> None:
  """Copy a file, or a folder with everything in it, between any two places."""
  src, dst = _epath(source), _epath(dest)
  with _storage(source if is_url(source) else dest):
    if not src.is_dir():
      if not is_url(dest):
        makedirs(os.path.dirname(resolve(dest)))
      dst.write_bytes(src.read_bytes())
      return
    makedirs(dest)
    for child in src.iterdir():
      copy_tree(str(child), str(dst / child.name))


@contextlib.contextmanager
def staged_folder(path: str, replace: bool = False) -> Iterator[str]:
  """A temporary sibling of folder `path` (`.NAME.partial-XXXXXXXX`, in the same parent) to write
  the folder in, moved to `path` once the block ends without an error: `path` never holds a
  half-written folder, and an error (or Ctrl-C) removes the sibling and leaves `path` as it was.
  `path` must be missing or an empty folder, unless `replace`: then what it holds is removed once
  the new folder is complete.

  Locally the move is a rename (with `replace`, the old folder is renamed aside first and deleted
  after). An object store has no rename: the complete folder is copied into place within the
  store, after the old one is deleted (with `replace`), so a failure during that last step can
  leave part of the folder under `path` (the temporary prefix is removed all the same)."""
  path = resolve(path) if is_url(path) else os.path.realpath(resolve(path))
  if not is_url(path) and os.path.isdir(os.path.dirname(path)):  # a run killed outright (SIGKILL) leaves its own
    stale = sorted(n for n in os.listdir(os.path.dirname(path)) if n.startswith(f".{name(path)}.partial-"))
    if stale:
      log.warning("%s holds %s, left by a run that was killed while writing %s: remove it to free its space",
                  parent(path), ", ".join(stale), name(path))
  staging = join(parent(path), f".{name(path)}.partial-{secrets.token_hex(4)}")
  makedirs(staging)
  try:
    yield staging
    if is_url(path):
      with _storage(path):
        if replace:
          remove(path)
        fs, source = _store(staging)
        fs.copy(f"{source}/", f"{_store(path)[1]}/", recursive=True)  # the contents; no download
    elif replace and os.path.exists(path):
      old = f"{staging}.old"
      os.rename(path, old)
      os.rename(staging, path)
      remove(old)
    else:
      os.rename(staging, path)  # onto nothing or an empty folder; a folder written meanwhile is kept (an error)
  finally:
    remove(staging)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding what `path` holds (a file or a folder), for readers that take only
  local ones (tokenizers, safetensors): `path` itself when local, else a temporary copy."""
  if not is_url(path):
    yield resolve(path)
    return
  with tempfile.TemporaryDirectory(prefix="vllm_jax-") as tmp:
    local = os.path.join(tmp, name(path))
    copy_tree(path, local)
    yield local


@contextlib.contextmanager
def local_output(path: str) -> Iterator[str]:
  """A local path to write `path`'s file or folder at, for writers that take only local ones:
  `path` itself when local, else a temporary one copied to the store once the block ends
  without an error."""
  if not is_url(path):
    yield resolve(path)
    return
  with tempfile.TemporaryDirectory(prefix="vllm_jax-") as tmp:
    local = os.path.join(tmp, name(path))
    yield local
    if os.path.exists(local):
      copy_tree(local, path)


def media_source(path: str):
  """What the decoders (decord, PyAV, Pillow) open: a local file's path, or the bytes of a
  stored object in memory. FileNotFoundError when there is none."""
  if not is_url(path):
    path = resolve(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"media file not found: {path}")
    return path
  return io.BytesIO(read_bytes(path))


class Appender:
  """Lines added to a text file as they come, each `write` durable when it returns: appended
  (and synced) locally; on an object store the object is rewritten whole, so keep such files
  small (`trainer.MetricsFile` rolls over to new parts)."""

  def __init__(self, path: str):
    self.path = resolve(path)
    if is_url(self.path):
      self._text = read_text(self.path) if exists(self.path) else ""
      self._file = None
    else:
      makedirs(os.path.dirname(self.path))
      self._file = open(self.path, "a")

  def write(self, text: str) -> None:
    if self._file is None:
      self._text += text
      write_text(self.path, self._text)
      return
    self._file.write(text)
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> "Appender":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

