"""`vllm_jax.serve.media`: data: URLs, local files only under the media root (every other local path refused
with one message that shows no path), http(s) URLs from a real local server (size and time limits,
redirects, errors), other schemes; no test leaves a temporary file behind."""

import base64
import hashlib
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from vllm_jax.serve.media import MediaPolicy, MediaRefused, fetch

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16
NOT_UNDER_ROOT = "no such media file under the server's media root"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def temp_dir(tmp_path, monkeypatch):
  """The temporary files of `fetch` go to a folder of their own, which each test must leave empty."""
  folder = tmp_path / "temp"
  folder.mkdir()
  monkeypatch.setattr("tempfile.tempdir", str(folder))
  yield folder
  assert os.listdir(folder) == []


def refused(url: str, policy: MediaPolicy, status: int = 400) -> str:
  with pytest.raises(MediaRefused) as e:
    fetch(url, policy)
  assert e.value.status == status, str(e.value)
  return str(e.value)


def check_temporary(media, data: bytes, suffix: str, temp_dir) -> None:
  """`media` is a temporary file in `temp_dir` holding `data`, which `close` removes."""
  assert media.temporary and media.path.endswith(suffix)
  assert os.path.dirname(media.path) == str(temp_dir)
  assert os.path.basename(media.path).startswith("vllm-jax-serve-")
  with open(media.path, "rb") as f:
    assert f.read() == data
  assert media.digest == sha256(data)
  media.close()
  assert not os.path.exists(media.path)


# --- data: URLs -------------------------------------------------------------------------------------------------

def data_url(mime: str, data: bytes) -> str:
  return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("mime, data, suffix", [("image/png", PNG, ".png"), ("image/jpeg", PNG, ".jpg"),
                                                ("video/mp4", VIDEO, ".mp4"), ("video/webm", VIDEO, ".mp4")])
def test_data_url(mime, data, suffix, temp_dir):
  check_temporary(fetch(data_url(mime, data), MediaPolicy()), data, suffix, temp_dir)


def test_data_url_refused():
  policy = MediaPolicy()
  assert refused("data:image/png;base64,not base64!", policy) == "the image/png data URL is not valid base64"
  assert refused(data_url("text/plain", b"hi"), policy) == \
      "a data URL must hold an image/* or video/* type, got text/plain"
  assert refused(data_url("image/svg+xml", b"<svg/>"), policy) == \
      "unsupported image type in a data URL: image/svg+xml"
  assert refused("data:image/png," + PNG.hex(), policy) == "a data URL must be data:<type>;base64,<data>"
  message = refused(data_url("video/mp4", VIDEO), MediaPolicy(max_mb=len(VIDEO) / 2**20 / 2), 413)
  assert "larger than the server's limit" in message


def test_data_url_limit_exact(temp_dir):
  media = fetch(data_url("video/mp4", VIDEO), MediaPolicy(max_mb=len(VIDEO) / 2**20))
  check_temporary(media, VIDEO, ".mp4", temp_dir)


# --- local files --------------------------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):
  """tmp/media: clip.mp4, sub/image.png, my clip.mp4, a symlink to sub/image.png, a symlink out to
  tmp/secret.txt, a FIFO."""
  root = tmp_path / "media"
  (root / "sub").mkdir(parents=True)
  (root / "clip.mp4").write_bytes(VIDEO)
  (root / "my clip.mp4").write_bytes(VIDEO)
  (root / "sub" / "image.png").write_bytes(PNG)
  (root / "link.png").symlink_to(root / "sub" / "image.png")
  (tmp_path / "secret.txt").write_text("the server's secret")
  (root / "escape.png").symlink_to(tmp_path / "secret.txt")
  os.mkfifo(root / "pipe")
  return root


def local_urls(root):
  return {"clip.mp4": VIDEO, "./sub/image.png": PNG, "sub/../clip.mp4": VIDEO, str(root / "clip.mp4"): VIDEO,
          "file://" + str(root / "sub" / "image.png"): PNG, "file://localhost" + str(root / "clip.mp4"): VIDEO,
          "file://" + quote(str(root / "my clip.mp4")): VIDEO, "link.png": PNG}


def test_local_file_under_root(root):
  for url, data in local_urls(root).items():
    media = fetch(url, MediaPolicy(media_root=str(root)))
    assert (media.path, media.digest, media.temporary) == (os.path.realpath(media.path), sha256(data), False), url
    with open(media.path, "rb") as f:
      assert f.read() == data
    media.close()
    assert os.path.exists(media.path)  # the media root's files are the server's, not the request's


def test_media_root_relative_or_a_symlink(root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert fetch("clip.mp4", MediaPolicy(media_root="media")).path == str(root / "clip.mp4")
  (tmp_path / "root-link").symlink_to(root)
  policy = MediaPolicy(media_root=str(tmp_path / "root-link"))
  assert fetch("sub/image.png", policy).path == str(root / "sub" / "image.png")
  assert fetch(str(tmp_path / "root-link" / "clip.mp4"), policy).digest == sha256(VIDEO)
  assert refused("../secret.txt", policy) == NOT_UNDER_ROOT


@pytest.mark.parametrize("url", [
    "../secret.txt", "{tmp}/secret.txt", "file://{tmp}/secret.txt", "sub/../../secret.txt",  # outside the root
    "escape.png", "file://{root}/escape.png",                                                # a symlink out of it
    "/etc/passwd", "file:///etc/passwd", "/proc/self/environ", "/",
    "missing.mp4", "{root}/missing.mp4", "file://{root}/sub/missing.png",                    # no such file
    "sub", "{root}", ".", "",                                                                # folders
    "pipe", "bad\x00name.mp4"])
def test_local_refused_alike(url, root, tmp_path):
  """Outside the root, a symlink out, missing, a folder, a FIFO: one message, no path, so nothing can be probed."""
  message = refused(url.format(tmp=tmp_path, root=root), MediaPolicy(media_root=str(root)))
  assert message == NOT_UNDER_ROOT


def test_local_unreadable_refused_alike(root):
  if os.geteuid() == 0:
    pytest.skip("root reads any file")
  os.chmod(root / "clip.mp4", 0)
  assert refused("clip.mp4", MediaPolicy(media_root=str(root))) == NOT_UNDER_ROOT


def test_local_refused_without_root(root, tmp_path):
  messages = {refused(url, MediaPolicy(allow_http=True))
              for url in [*local_urls(root), "/etc/passwd", "missing.mp4", str(tmp_path), "file:///etc/shadow"]}
  assert len(messages) == 1
  message = messages.pop()
  assert "--media-root DIR" in message and str(tmp_path) not in message and "etc" not in message


def test_local_refused_other(root):
  policy = MediaPolicy(media_root=str(root))
  assert refused("file://example.com/etc/passwd", policy) == \
      "a file:// URL must name a file on this machine, got host 'example.com'"
  message = refused("clip.mp4", MediaPolicy(media_root=str(root), max_mb=len(VIDEO) / 2**20 / 2), 413)
  assert str(root) not in message


# --- http(s) and other schemes -------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
  """Routes: a PNG under its name, a PNG and a video by Content-Type only, an SVG, a big file (with and without
  Content-Length), a slow and a trickling answer, redirects (to the PNG, to itself, to a file: URL), a 404."""

  def log_message(self, *args):
    pass

  def answer(self, data: bytes, content_type: str = "application/octet-stream", length: bool = True):
    self.send_response(200)
    self.send_header("Content-Type", content_type)
    if length:
      self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def redirect(self, location: str):
    self.send_response(302)
    self.send_header("Location", location)
    self.end_headers()

  def do_GET(self):
    path = self.path.split("?")[0]
    if path == "/image.png":
      self.answer(PNG)
    elif path == "/picture":
      self.answer(PNG, "image/jpeg")
    elif path == "/clip":
      self.answer(VIDEO, "video/mp4; codecs=avc1")
    elif path == "/vector":
      self.answer(b"<svg/>", "image/svg+xml")
    elif path in ("/big", "/big-stream"):
      self.answer(VIDEO * 64, length=path == "/big")
    elif path == "/slow":
      time.sleep(3)
      self.answer(PNG)
    elif path == "/trickle":
      self.send_response(200)
      self.send_header("Content-Length", "100")
      self.end_headers()
      for _ in range(100):
        self.wfile.write(b"x")
        self.wfile.flush()
        time.sleep(0.05)
    elif path == "/redirect":
      self.redirect("/image.png")
    elif path == "/loop":
      self.redirect("/loop")
    elif path == "/to-file":
      self.redirect("file:///etc/passwd")
    else:
      self.send_error(404)


class Server(ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # a client that gave up on a slow answer: a broken pipe


@pytest.fixture(scope="module")
def site():
  server = Server(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


HTTP = MediaPolicy(allow_http=True)


def test_http_refused_unless_allowed(site):
  for url in [f"{site}/image.png", "https://example.com/a.png"]:
    message = refused(url, MediaPolicy(media_root="/"))
    assert "--allow-http" in message


@pytest.mark.parametrize("route, data, suffix", [("/image.png", PNG, ".png"), ("/image.png?x=1", PNG, ".png"),
                                                 ("/picture", PNG, ".jpg"), ("/clip", VIDEO, ".mp4"),
                                                 ("/big-stream", VIDEO * 64, ".mp4"), ("/redirect", PNG, ".png")])
def test_http_fetched(site, route, data, suffix, temp_dir):
  check_temporary(fetch(site + route, HTTP), data, suffix, temp_dir)


def test_http_too_large(site):
  policy = MediaPolicy(allow_http=True, max_mb=len(VIDEO) * 8 / 2**20)
  for route in ["/big", "/big-stream"]:  # refused by its Content-Length, or while streaming (a temporary file)
    assert "larger than the server's limit" in refused(site + route, policy, 413)


def test_http_timeout(site):
  policy = MediaPolicy(allow_http=True, timeout_s=0.5)
  for route in ["/slow", "/trickle"]:  # no answer in time; an answer too slow in all (each byte well in time)
    start = time.monotonic()
    message = refused(site + route, policy, 504)
    assert time.monotonic() - start < 1.5
    assert message == "fetching the media URL took longer than the server's limit of 0.5 s"


def test_http_refused(site):
  assert refused(f"{site}/missing.png", HTTP) == "the media URL answered HTTP 404 Not Found"
  assert refused(f"{site}/loop", HTTP) == "the media URL redirects more than 3 times"
  assert refused(f"{site}/to-file", HTTP) == "the media URL redirects to a file: URL: only http(s) is fetched"
  assert refused(f"{site}/vector", HTTP) == "unsupported image type in the media URL's answer: image/svg+xml"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  assert refused(f"http://127.0.0.1:{port}/a.png", HTTP) == "cannot fetch the media URL: its host cannot be reached"
  assert refused("http:///a.png", HTTP) == "the media URL names no host"
  assert refused(f"{site}/caf\u00e9.png", HTTP).startswith("the media URL is not a valid http(s) URL")


@pytest.mark.parametrize("scheme", ["ftp", "gs", "s3", "HDFS"])
def test_other_schemes_refused(scheme):
  message = refused(f"{scheme}://bucket/clip.mp4", MediaPolicy(media_root="/", allow_http=True))
  assert message.startswith(f"unsupported media URL scheme {scheme.lower()}://")
