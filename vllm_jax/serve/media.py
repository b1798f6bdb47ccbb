"""The media URLs of chat requests (image_url and video_url parts) -> local files the decoders open,
under a `MediaPolicy` that keeps a client from reading what the server should not give away.

  data:<type>;base64,<data>   always: an image/* or video/* payload, written to a temporary file
  a path, file:// URL         only under the policy's media root (after resolving symlinks): the
                              server otherwise reads whatever its process can (keys, /proc/self/environ)
  http(s):// URL              only when the policy allows it, since the server then fetches any
                              address it can reach for whoever asks (its internal network too);
                              fetched directly (no proxy), redirects followed a few hops, the size and
                              total time limits enforced while streaming

Several images in one message are the frames of one clip (as clients that sample a video's frames
themselves send it): `frames_video` writes them, in order, as a video at one frame per second.

A refusal is a `MediaRefused`: its message never shows a server path, and every local path that is
not a readable file under the root (outside it, a symlink out of it, missing, a folder) gets the same
message, so that a client cannot probe the server's file system.
"""

import base64
import contextlib
import dataclasses
import hashlib
import http
import http.client
import mimetypes
import os
import re
import ssl
import stat
import tempfile
import time
from typing import Iterator
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from vllm_jax.data.video import IMAGE_EXTENSIONS

TEMP_PREFIX = "vllm-jax-serve-"
MAX_REDIRECTS = 3
CHUNK = 1 << 16
NOT_UNDER_ROOT = "no such media file under the server's media root"
INVALID_URL = "the media URL is not a valid http(s) URL (percent-encode characters outside ASCII)"
NO_ROOT = ("local media files are not served: start the server with --media-root DIR to serve the files under DIR, "
           "or send the media as a data: URL")


class MediaRefused(Exception):
  """A media URL the server will not read: its message (never a server path) and HTTP status (400, 413 when
  too large, 504 when an http(s) fetch runs out of time)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
  """What `fetch` may read: local files under `media_root` only (None: none), http(s) URLs only with
  `allow_http`; media up to `max_mb` MB; an http(s) fetch (redirects included) within `timeout_s` seconds."""
  media_root: str | None = None
  allow_http: bool = False
  max_mb: float = 64
  timeout_s: float = 10


@dataclasses.dataclass
class MediaFile:
  """A media URL's local file: the file under the media root, or a temporary file (`temporary`) written for a
  data: or http(s) URL, which `close` removes. `digest` (sha256 of the bytes) keys the encoded-media cache."""
  path: str
  digest: str
  temporary: bool

  def close(self) -> None:
    if self.temporary:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)


def fetch(url: str, policy: MediaPolicy) -> MediaFile:
  """A media URL -> its `MediaFile`, or `MediaRefused`. The caller closes the file once decoded."""
  if url.startswith("data:"):
    return _data_url(url, policy)
  scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
  if scheme is None:
    return _local(url, policy)
  scheme = scheme.group(1).lower()
  if scheme == "file":
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
      raise MediaRefused(f"a file:// URL must name a file on this machine, got host {parts.netloc!r}")
    return _local(url2pathname(parts.path), policy)
  if scheme in ("http", "https"):
    if not policy.allow_http:
      raise MediaRefused(f"{scheme}:// media URLs are not fetched: start the server with --allow-http to fetch "
                         "them, or send the media as a data: URL")
    return _http(url, policy)
  raise MediaRefused(f"unsupported media URL scheme {scheme}://: give a data: URL, an http(s):// URL or a file "
                     "under the server's media root")


def _limit(policy: MediaPolicy) -> int:
  return int(policy.max_mb * 2**20)


def _too_large(policy: MediaPolicy) -> MediaRefused:
  return MediaRefused(f"the media is larger than the server's limit of {policy.max_mb:g} MB", 413)


def _image_suffix(mime: str, source: str) -> str:
  """The file extension the image decoder reads for an image/* type (the decoders tell images from videos by
  the extension)."""
  suffix = mimetypes.guess_extension(mime)
  if suffix not in IMAGE_EXTENSIONS:
    raise MediaRefused(f"unsupported image type in {source}: {mime}")
  return suffix


def _data_url(url: str, policy: MediaPolicy) -> MediaFile:
  header, comma, payload = url[5:].partition(",")
  mime = header.split(";")[0].lower()
  if not comma or not header.endswith(";base64"):
    raise MediaRefused("a data URL must be data:<type>;base64,<data>")
  if mime.startswith("image/"):
    suffix = _image_suffix(mime, "a data URL")
  elif mime.startswith("video/"):
    suffix = ".mp4"  # videos are decoded by their content, whatever the name
  else:
    raise MediaRefused(f"a data URL must hold an image/* or video/* type, got {mime or 'none'}")
  try:
    data = base64.b64decode(payload, validate=True)
  except ValueError:  # binascii.Error, or characters outside ASCII
    raise MediaRefused(f"the {mime} data URL is not valid base64") from None
  if len(data) > _limit(policy):
    raise _too_large(policy)
  return _temporary([data], suffix)


def _temporary(chunks, suffix: str) -> MediaFile:
  """`chunks` (an iterable of bytes, which may raise) written to a new temporary file, removed on any error."""
  fd, path = tempfile.mkstemp(suffix=suffix, prefix=TEMP_PREFIX)
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
      for chunk in chunks:
        digest.update(chunk)
        f.write(chunk)
  except BaseException:
    os.remove(path)
    raise
  return MediaFile(path, digest.hexdigest(), temporary=True)


def frames_video(images: list[MediaFile]) -> MediaFile:
  """Images (each a frame, all resized to the first one's size) -> a temporary H.264 video of them at 1 fps
  (nearly lossless), its digest that of the images in order."""
  import av
  from PIL import Image
  fd, path = tempfile.mkstemp(suffix=".mp4", prefix=TEMP_PREFIX)
  os.close(fd)
  try:
    frames = [Image.open(image.path).convert("RGB") for image in images]
    size = (frames[0].width // 2 * 2 or 2, frames[0].height // 2 * 2 or 2)  # yuv420p takes even sizes
    with av.open(path, "w", format="mp4") as container:
      video = container.add_stream("libx264", rate=1, options={"crf": "4", "threads": "1"})
      video.width, video.height, video.pix_fmt = *size, "yuv420p"
      for frame in frames:
        container.mux(video.encode(av.VideoFrame.from_image(frame.resize(size))))
      container.mux(video.encode())
  except (OSError, ValueError) as e:  # Pillow's and PyAV's errors
    os.remove(path)
    raise MediaRefused(f"cannot make a video of the {len(images)} images: {type(e).__name__}") from None
  except BaseException:
    os.remove(path)
    raise
  digest = hashlib.sha256("".join(image.digest for image in images).encode()).hexdigest()
  return MediaFile(path, digest, temporary=True)


def _local(path: str, policy: MediaPolicy) -> MediaFile:
  """A file under the media root: relative paths are taken from the root, and the real path (symlinks
  resolved) must lie under the root's. Every failure is the one message, with no path in it."""
  if policy.media_root is None:
    raise MediaRefused(NO_ROOT)
  root = os.path.realpath(policy.media_root)
  try:
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
      raise MediaRefused(NOT_UNDER_ROOT)
    # O_NONBLOCK: opening a FIFO must not hang the request; regular files ignore it
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
  except (OSError, ValueError):  # ValueError: a NUL byte in the path
    raise MediaRefused(NOT_UNDER_ROOT) from None
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device
      raise MediaRefused(NOT_UNDER_ROOT)
    if info.st_size > _limit(policy):
      raise _too_large(policy)
    digest = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
      digest.update(chunk)
  except OSError:
    raise MediaRefused(NOT_UNDER_ROOT) from None
  finally:
    os.close(fd)
  return MediaFile(real, digest.hexdigest(), temporary=False)


def _left(deadline: float) -> float:
  """Seconds left before `deadline`; a TimeoutError once past it."""
  left = deadline - time.monotonic()
  if left <= 0:
    raise TimeoutError
  return left


@contextlib.contextmanager
def _network(policy: MediaPolicy) -> Iterator[None]:
  """Network failures -> MediaRefused, without the remote server's internals."""
  try:
    yield
  except TimeoutError:
    raise MediaRefused(f"fetching the media URL took longer than the server's limit of {policy.timeout_s:g} s",
                       504) from None
  except ssl.SSLError:
    raise MediaRefused("cannot fetch the media URL: its TLS handshake or certificate failed") from None
  except OSError:
    raise MediaRefused("cannot fetch the media URL: its host cannot be reached") from None
  except http.client.HTTPException:
    raise MediaRefused("cannot fetch the media URL: its server sent a malformed answer") from None


def _get(url: str, deadline: float):
  """GET `url`, following redirects (to http(s) only, `MAX_REDIRECTS` hops at most) -> (the final URL, its
  response, the response's socket); the caller closes the response and the socket."""
  for _ in range(MAX_REDIRECTS + 1):
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
      raise MediaRefused(f"the media URL redirects to a {parts.scheme}: URL: only http(s) is fetched")
    try:
      port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
      raise MediaRefused("the media URL has an invalid port") from None
    if not parts.hostname:
      raise MediaRefused("the media URL names no host")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
      connection = kind(parts.hostname, port, timeout=_left(deadline))
    except ValueError:  # http.client.InvalidURL: control characters in the host
      raise MediaRefused(INVALID_URL) from None
    try:
      connection.request("GET", target, headers={"Accept-Encoding": "identity", "User-Agent": "vllm-jax"})
      sock = connection.sock  # kept: the connection drops it once the answer says the connection closes
      sock.settimeout(_left(deadline))
      response = connection.getresponse()
    except BaseException as e:
      connection.close()
      if isinstance(e, ValueError):  # control or non-ASCII characters in the path (InvalidURL, UnicodeError)
        raise MediaRefused(INVALID_URL) from None
      raise
    if response.status not in (301, 302, 303, 307, 308):
      return url, response, sock
    location = response.getheader("Location")
    response.close()
    connection.close()
    if not location:
      raise MediaRefused(f"the media URL answered {response.status} (a redirect) with no location")
    url = urljoin(url, location)
  raise MediaRefused(f"the media URL redirects more than {MAX_REDIRECTS} times")


def _http_suffix(url: str, content_type: str) -> str:
  """An image extension from the URL's path or else from an image/* Content-Type; .mp4 for anything else
  (videos are decoded by their content)."""
  suffix = os.path.splitext(urlsplit(url).path)[1].lower()
  if suffix in IMAGE_EXTENSIONS:
    return suffix
  mime = content_type.split(";")[0].strip().lower()
  return _image_suffix(mime, "the media URL's answer") if mime.startswith("image/") else ".mp4"


def _http(url: str, policy: MediaPolicy) -> MediaFile:
  deadline = time.monotonic() + policy.timeout_s
  with _network(policy):
    url, response, sock = _get(url, deadline)
  try:
    if not 200 <= response.status < 300:
      try:
        phrase = f" {http.HTTPStatus(response.status).phrase}"
      except ValueError:
        phrase = ""
      raise MediaRefused(f"the media URL answered HTTP {response.status}{phrase}")
    suffix = _http_suffix(url, response.getheader("Content-Type", ""))
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > _limit(policy):
      raise _too_large(policy)
    return _temporary(_body(response, sock, deadline, policy), suffix)
  finally:
    response.close()
    sock.close()


def _body(response: http.client.HTTPResponse, sock, deadline: float, policy: MediaPolicy) -> Iterator[bytes]:
  """The answer's bytes, one socket read at a time, each within the time left; past the size limit: 413."""
  size = 0
  while True:
    with _network(policy):
      sock.settimeout(_left(deadline))
      chunk = response.read1(CHUNK)
    if not chunk:
      return
    size += len(chunk)
    if size > _limit(policy):
      raise _too_large(policy)
    yield chunk
