"""`vllm-jax web` driven in a real headless Chromium (Playwright): upload a video, see the sampled
frames with their times, a streamed two-turn chat whose answers equal the greedy ones of
`vllm-jax chat`, reset, a corrupt upload reported in the page, and no request leaving the machine."""

import functools
import os
import socket
import sys
import threading
import time
import urllib.request

import flax.linen as nn
import jax
import numpy as np
import pytest

import vllm_jax
from test_video_loading import write_video
from vllm_jax import cli, systems
from vllm_jax.configs.video_llama import model_config
from vllm_jax.data import conversation as C
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.video_llama import abstract_params
from vllm_jax.systems.video_llama import VideoLlamaSystem

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CAPTIONS = ["a red circle moves to the left", "a dog runs on the beach at sunset", "two people talk in a kitchen",
            "waves crash on rocks", "snow falls over a quiet town", "a cat sleeps on a sofa"]
NEW_TOKENS = 24  # three streamed chunks of 8


def test_web_without_gradio_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the web extra has
  monkeypatch.delitem(sys.modules, "vllm_jax.web", raising=False)
  monkeypatch.delattr(vllm_jax, "web", raising=False)
  assert cli.main(["web", "--model", "no-such-folder"]) == 2
  assert capsys.readouterr().err == "error: the web page needs gradio: pip install -e '.[web]'\n"


@pytest.fixture(scope="module")
def browser():
  """Headless Chromium; the test skips only when gradio, Playwright or Chromium is missing."""
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[web]')")
  sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
  with sync_api.sync_playwright() as playwright:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny random audio-visual Video-LLaMA folder, a video with sound and a corrupt one."""
  root = tmp_path_factory.mktemp("web")
  tokenizer = train_tokenizer(CAPTIONS * 10, str(root / "tokenizer"), vocab_size=300)
  video_id, audio_id = C.add_media_tokens(tokenizer)
  config = model_config("tiny").replace(video_token_id=video_id, audio_token_id=audio_id)
  rng = np.random.default_rng(3)  # weights whose greedy answers differ between the two turns
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.2).astype(a.dtype),
                        nn.meta.unbox(abstract_params(config)))
  VideoLlamaSystem(config, params, tokenizer).save(str(root / "model"))
  (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  video = write_video(root / "clip.mp4", num_frames=30, audio_seconds=3.0)
  return str(root / "model"), video, str(root / "corrupt.mp4")


@pytest.fixture(scope="module")
def server(files, browser):
  """`vllm-jax web` on a free port (in a thread: the test's `systems.load` gets the same loaded
  model, so the greedy references compile once) -> its address."""
  import gradio as gr
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cached = functools.lru_cache(systems.load)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(systems, "load", lambda model, mesh=None, **kw: cached(model, mesh, **kw))
    status = []
    thread = threading.Thread(target=lambda: status.append(cli.main(
        ["web", "--model", files[0], "--port", str(port), "--max-new-tokens", str(NEW_TOKENS)])), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
      assert thread.is_alive(), f"vllm-jax web ended with status {status}"
      assert time.time() < deadline, "vllm-jax web did not answer within 180 s"
      try:
        urllib.request.urlopen(url, timeout=2)
        break
      except OSError:
        time.sleep(0.5)
    yield url
    gr.close_all()
    thread.join(10)
  assert status == [0]


def norm(text: str) -> str:
  return " ".join(text.split())


def bot_texts(page) -> list[str]:
  return [norm(t) for t in page.locator('#chat [data-testid="bot"]').all_inner_texts()]


def wait_answer(page, turn: int, expected: str) -> None:
  """Until the turn-th answer reads `expected` (whitespace aside); the answer seen on failure."""
  check = """([turn, expected]) => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    return bots.length == turn && bots[turn - 1].innerText.split(/\\s+/).join(" ").trim() == expected; }"""
  try:
    page.wait_for_function(check, arg=[turn, expected], timeout=120_000)
  except Exception:  # noqa: BLE001 (Playwright's TimeoutError: say what the page shows)
    pytest.fail(f"answer {turn}: expected {expected!r}, the page shows {bot_texts(page)}")


def screenshot(page, tmp_path, name: str) -> None:
  """The whole page as a PNG in $VLLM_JAX_ARTIFACTS (else the test's folder), its path printed."""
  path = os.path.join(os.environ.get("VLLM_JAX_ARTIFACTS") or str(tmp_path), name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  page.screenshot(path=path, full_page=True)
  print(f"screenshot: {path}")


# Records each new text of the latest answer as the page renders it.
WATCH = """() => { window.seen = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.split(/\\s+/).join(" ").trim() : "";
    if (text && window.seen[window.seen.length - 1] !== text) window.seen.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def test_web_chat_in_a_browser(browser, files, server, tmp_path, monkeypatch, capsys):
  model, video, corrupt = files
  questions = ["What is moving in the video?", "And what do you hear?"]
  typed = iter([*questions, ""])  # the greedy answers of `vllm-jax chat` (same model: loaded once)
  monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
  capsys.readouterr()  # the server's start-up lines
  assert cli.main(["chat", "--model", model, "--video", video, "--max-new-tokens", str(NEW_TOKENS)]) == 0
  # gradio's own "* ..." start-up lines may reach stdout only now, from the server's thread
  expected = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("* ")]
  assert len(expected) == 2 and all(norm(a) for a in expected)
  timestamps = systems.load(model, dtype="float32").load_media(video).frames.timestamps

  page = browser.new_page(viewport={"width": 1280, "height": 1000})
  away = []  # every request must stay on the server: no CDN, fonts or analytics
  page.on("request", lambda r: away.append(r.url) if not r.url.startswith((server, "data:", "blob:")) else None)
  page.goto(server, timeout=60_000)
  page.evaluate(WATCH)

  page.set_input_files("#media input[type=file]", video)
  captions = page.locator("#frames .caption-label")
  captions.first.wait_for(timeout=120_000)
  assert captions.all_inner_texts() == [f"t = {t} s" for t in timestamps] == [
      "t = 0.0 s", "t = 0.7 s", "t = 1.5 s", "t = 2.2 s"]
  assert page.locator("#frames img").count() == 4
  assert page.inner_text("#status") == "clip.mp4: video, frames at 0.0, 0.7, 1.5, 2.2 s, with audio"

  for turn, (question, answer) in enumerate(zip(questions, expected), 1):
    page.evaluate("() => { window.seen = []; }")
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter") if turn == 1 else page.click("#send")
    wait_answer(page, turn, norm(answer))
    seen = page.evaluate("() => window.seen")
    growing = [text for text in seen if norm(answer).startswith(text) and text != norm(answer)]
    assert growing, f"answer {turn} appeared at once, not streamed: {seen}"
  users = page.locator('#chat [data-testid="user"]').all_inner_texts()
  assert [norm(u) for u in users] == questions and page.input_value("#question textarea") == ""
  screenshot(page, tmp_path, "web_chat.png")

  page.click("#reset")
  page.wait_for_function("() => !document.querySelector('#chat [data-testid=user]') && "
                         "!document.querySelector('#frames img')", timeout=30_000)
  assert page.inner_text("#status") == ""

  page.set_input_files("#media input[type=file]", corrupt)
  page.wait_for_function("() => document.querySelector('#status').innerText.includes('error')", timeout=60_000)
  assert page.inner_text("#status").startswith("error: cannot decode video corrupt.mp4")
  assert page.locator("#frames img").count() == 0
  page.fill("#question textarea", "What is moving?")  # no media: a warning, no answer
  page.click("#send")
  page.get_by_text("Upload a video or an image first.").wait_for(timeout=30_000)
  assert page.locator('#chat [data-testid="bot"]').count() == 0
  assert page.input_value("#question textarea") == "What is moving?"
  screenshot(page, tmp_path, "web_error.png")

  page.click('#media button[aria-label="Clear"]')  # the page still works: a new upload is read
  page.set_input_files("#media input[type=file]", video)
  captions.first.wait_for(timeout=60_000)
  page.fill("#question textarea", questions[0])
  page.click("#send")
  wait_answer(page, 1, norm(expected[0]))
  assert away == []
  page.close()
