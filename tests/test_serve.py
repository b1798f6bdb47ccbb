"""`vllm-jax serve` over real HTTP: a tiny random Video-LLaMA (answers equal `System.answer`'s, alone
and batched, streamed and not), bad requests, a full queue, and the command itself serving a plain
LLaMA's text prompts until Ctrl-C."""

import base64
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_video_loading import write_video
from vllm_jax import cli, pretrained, serve
from vllm_jax.configs.video_llama import model_config
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.llama import Llama
from vllm_jax.systems.video_llama import VideoLlamaSystem

CORPUS = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left and a blue square up.\n",
          "The video contains 4 frames sampled at 0.0, 1.5 seconds. USER: Hello ASSISTANT: Hi there."] * 20
QUESTIONS = ["What is moving?", "What colour is the shape?", "Describe the video."]


def random_params(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.1).astype(a.dtype), nn.meta.unbox(abstract))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny random Video-LLaMA (vision only) and a plain LLaMA, both with a trained tokenizer; videos."""
  root = tmp_path_factory.mktemp("serve")
  tokenizer = train_tokenizer(CORPUS, str(root / "tokenizer"), vocab_size=300)
  llama_dir = str(root / "llama")
  config = model_config("tiny")
  pretrained.save_llama(llama_dir, config.llama, random_params(
      jax.eval_shape(Llama(config.llama).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"], 3))
  tokenizer.save_pretrained(llama_dir)
  video_id, audio_id = VideoLlamaSystem.add_media_tokens(tokenizer)
  config = config.replace(audio=None, video_token_id=video_id, audio_token_id=audio_id)
  system = VideoLlamaSystem(config, random_params(VideoLlamaSystem.abstract_params(config), 1), tokenizer)
  media = root / "media"
  media.mkdir()
  (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
  paths = {"clip": write_video(media / "clip.mp4", num_frames=12, size=(32, 32)),
           "corrupt": str(media / "corrupt.mp4"), "missing": str(media / "nope.mp4")}
  return system, llama_dir, paths


@pytest.fixture
def start(files):
  """start(**server options) -> a Server of the Video-LLaMA, serving from a thread on a free port."""
  system = files[0]
  servers = []

  def start(**options):
    model = serve.Model.from_system("tiny-video-llama", system)
    servers.append(serve.Server(model, port=0, **options).start())
    return servers[-1]

  yield start
  for server in servers:
    server.close()


def request(url, body=None, method=None, data=None):
  """-> (status, parsed JSON body or the raw text, headers)."""
  if body is not None:
    data = json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=300) as response:
      status, text, headers = response.status, response.read().decode(), response.headers
  except urllib.error.HTTPError as e:
    status, text, headers = e.code, e.read().decode(), e.headers
  try:
    return status, json.loads(text), headers
  except ValueError:
    return status, text, headers


def chat(server, question, url=None, **fields):
  content = [{"type": "text", "text": question}]
  if url is not None:
    content.append({"type": "video_url", "video_url": {"url": url}})
  body = {"model": "judge", "messages": [{"role": "user", "content": content}], **fields}
  return request(server.url + "/v1/chat/completions", body)


def reference(system, path, question, max_tokens, rows):
  media = system.load_media(path)
  conv = system.conversation(media)
  conv.ask(question)
  return system.answer([media], [conv], max_new_tokens=max_tokens, rows=rows)[0]


def test_answer_equals_system_answer_for_paths_file_and_data_urls(files, start):
  system, _, paths = files
  server = start(max_batch=3, batch_wait_ms=0)
  expected = reference(system, paths["clip"], QUESTIONS[0], 12, rows=3)
  with open(paths["clip"], "rb") as f:
    data_url = "data:video/mp4;base64," + base64.b64encode(f.read()).decode()
  for url in (paths["clip"], "file://" + paths["clip"], data_url):
    status, out, _ = chat(server, QUESTIONS[0], url, max_tokens=12)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "judge" and out["batch_size"] == 1
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] > 32 and 1 <= usage["completion_tokens"] <= 12  # 32 video tokens in the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
  # A system message and earlier turns: the conversation System.answer is given.
  media = system.load_media(paths["clip"])
  conv = system.conversation(media)
  conv.system = "Brief."
  conv.ask("Who?")
  conv.answer("A.")
  conv.ask("Why?")
  expected = system.answer([media], [conv], max_new_tokens=12, rows=3)[0]
  messages = [{"role": "system", "content": "Brief."},
              {"role": "user", "content": [{"type": "video_url", "video_url": {"url": paths["clip"]}},
                                           {"type": "text", "text": "Who?"}]},
              {"role": "assistant", "content": "A."}, {"role": "user", "content": "Why?"}]
  status, out, _ = request(server.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
  assert status == 200 and out["choices"][0]["message"]["content"] == expected, out
  status, models, _ = request(server.url + "/v1/models")
  assert status == 200 and models["data"][0]["id"] == "tiny-video-llama"
  assert request(server.url + "/health")[:2] == (200, {"status": "ok"})


def test_concurrent_requests_are_answered_in_one_batch(files, start):
  """Three requests sent at once (with different max_tokens) share one batch; each answer is the
  one the request gets alone."""
  system, _, paths = files
  server = start(max_batch=3, batch_wait_ms=5000)  # the batch fills before the wait ends
  limits = [12, 5, 12]
  expected = [reference(system, paths["clip"], q, n, rows=3) for q, n in zip(QUESTIONS, limits)]
  outs = [None] * 3
  barrier = threading.Barrier(3)

  def send(i):
    barrier.wait()
    outs[i] = chat(server, QUESTIONS[i], paths["clip"], max_tokens=limits[i])

  threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for (status, out, _), answer, limit in zip(outs, expected, limits):
    assert status == 200, out
    assert out["batch_size"] == 3 and out["choices"][0]["message"]["content"] == answer
    assert out["usage"]["completion_tokens"] <= limit
  metrics = request(server.url + "/metrics")[1]
  assert metrics["batches"] == 1 and metrics["batch_sizes"] == {"3": 1} and metrics["requests"] == 3


def stream_events(server, body):
  req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode())
  with urllib.request.urlopen(req, timeout=300) as response:
    assert response.headers["Content-Type"] == "text/event-stream"
    lines = response.read().decode().split("\n\n")
  return [line.removeprefix("data: ") for line in lines if line]


@pytest.mark.parametrize("with_media", [True, False])
def test_streaming_deltas_add_up_to_the_answer(files, start, with_media):
  """Text-only prompts work too (the LLM alone, in the system's template)."""
  _, _, paths = files
  server = start(max_batch=3, batch_wait_ms=0)
  url = paths["clip"] if with_media else None
  status, out, _ = chat(server, QUESTIONS[2], url, max_tokens=12)
  assert status == 200, out
  answer = out["choices"][0]["message"]["content"]
  content = [{"type": "text", "text": QUESTIONS[2]}]
  if url:
    content.append({"type": "video_url", "video_url": {"url": url}})
  events = stream_events(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 12,
                                  "stream": True})
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
  pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
  assert len(pieces) >= 2 and all(pieces) and "".join(pieces) == answer
  assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
  assert chunks[-1]["usage"] == out["usage"]


def test_bad_requests_get_clear_errors_and_the_server_goes_on(files, start):
  _, _, paths = files
  server = start(max_batch=3, batch_wait_ms=0, max_body_mb=0.01)
  endpoint = server.url + "/v1/chat/completions"
  cases = [
      (chat(server, "What?", paths["missing"]), 400, "media file not found: .*nope.mp4"),
      (chat(server, "What?", paths["corrupt"]), 400, "cannot decode video .*corrupt.mp4"),
      (chat(server, "What?", "http://example.com/clip.mp4"), 400, "unsupported media URL scheme http://"),
      (chat(server, "What?", "data:video/mp4;base64,@@@"), 400, "not valid base64"),
      (chat(server, "What?", paths["clip"], max_tokens=5000), 400, "does not fit the model's context of 1024"),
      (chat(server, "What?", paths["clip"], temperature=-1), 400, '"temperature" must be at least 0'),
      (chat(server, "<ImageHere> What?", paths["clip"]), 400, "media placeholder"),
      (request(endpoint, data=b"{not json"), 400, "not valid JSON"),
      (request(endpoint, {"model": "x"}), 400, '"messages" must be a non-empty list'),
      (request(endpoint, {"messages": [{"role": "assistant", "content": "Hi"}]}), 400, "must alternate"),
      (request(endpoint, {"messages": [{"role": "user", "content": [
          {"type": "video_url", "video_url": {"url": paths["clip"]}},
          {"type": "image_url", "image_url": {"url": paths["clip"]}}]}]}), 400, "one image or video"),
      (request(endpoint, data=b"x" * 20000), 413, "over 0.01 MB"),
      (request(server.url + "/v2/nothing"), 404, "no such path: /v2/nothing"),
      (request(endpoint), 405, "takes POST"),
  ]
  for (status, out, _), expected_status, message in cases:
    assert status == expected_status, out
    assert out["error"]["type"] == "invalid_request_error" and re.search(message, out["error"]["message"]), out
  status, out, _ = chat(server, "What is moving?", paths["clip"], max_tokens=12)
  assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str)


def test_a_full_queue_refuses_with_503(files, start):
  """One request in the worker (compiling shapes no other test uses: max_tokens 37, one row), one
  waiting: the others are refused."""
  server = start(max_batch=1, queue_size=1, batch_wait_ms=0)
  results = []

  def send(question):
    results.append(chat(server, question, max_tokens=37))

  first = threading.Thread(target=send, args=(QUESTIONS[0],))
  first.start()
  while request(server.url + "/metrics")[1]["running"] == 0:
    time.sleep(0.02)
  others = [threading.Thread(target=send, args=(q,)) for q in QUESTIONS]
  for t in others:
    t.start()
  for t in [first, *others]:
    t.join()
  statuses = sorted(status for status, _, _ in results)
  assert statuses[0] == 200 and statuses[-1] == 503 and statuses.count(200) >= 2, results
  refused = next((out, headers) for status, out, headers in results if status == 503)
  assert "the server is busy" in refused[0]["error"]["message"] and refused[1]["Retry-After"] == "1"


def test_serve_command_answers_text_prompts_of_a_plain_llama_until_ctrl_c(files, capsys):
  """The command as a judge's client meets it: it prints its URL once ready (with --port 0, the
  port it got), answers chat requests, and Ctrl-C (SIGINT) stops it with status 0."""
  _, llama_dir, _ = files
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url, results = f"http://127.0.0.1:{port}", {}

  def client():
    try:
      for _ in range(600):  # refused until the command listens (it listens, then loads the model)
        try:
          request(url + "/health")
          break
        except urllib.error.URLError:
          time.sleep(0.1)
      body = {"model": "judge", "messages": [{"role": "system", "content": "Judge."},
                                             {"role": "user", "content": "Correct? yes/no"}]}
      results["text"] = request(url + "/v1/chat/completions", body)
      results["image"] = request(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
          {"type": "image_url", "image_url": {"url": "/tmp/x.png"}}, {"type": "text", "text": "What?"}]}]})
    finally:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

  # A shell's background job inherits SIGINT ignored: give this process Python's Ctrl-C handler.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    threading.Thread(target=client, daemon=True).start()
    assert cli.main(["serve", "--model", llama_dir, "--port", str(port), "--max-batch", "1",
                     "--max-new-tokens", "6"]) == 0
  finally:
    signal.signal(signal.SIGINT, previous)
  out, err = capsys.readouterr()
  assert f"serving llama at {url}/v1" in out and "stopped" in err
  status, answer, _ = results["text"]
  assert status == 200 and answer["usage"]["completion_tokens"] <= 6 and answer["model"] == "judge", answer
  status, refused, _ = results["image"]
  assert status == 400 and "text-only" in refused["error"]["message"]


def test_serve_command_reports_a_bad_model_folder_and_a_busy_port(files, tmp_path, capsys):
  _, llama_dir, _ = files
  assert cli.main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
  assert "model folder not found" in capsys.readouterr().err
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    assert cli.main(["serve", "--model", llama_dir, "--port", str(s.getsockname()[1])]) == 2
  assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_a_plain_llama_uses_its_tokenizers_chat_template_and_batch_keys(files):
  _, llama_dir, _ = files
  config, params, tokenizer = pretrained.load_llama(llama_dir)
  tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  model = serve.Model("llama", tokenizer, config, params)
  job = model.prepare({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
  assert tokenizer.decode(job.ids) == "<|system|>Be brief.<|user|>Hi<|assistant|>"
  assert job.max_tokens == 128 and job.media is None
  assert model.finish(job, [5, 6, model.stop_ids[0], 7])[1:] == ("stop", 3)
  assert model.finish(job, [5, 6, 7])[1:] == ("length", 3)
  # A request's stop string ends the answer before it; the tokens counted end where it appeared.
  ids = tokenizer("A red circle moves left.", add_special_tokens=False).input_ids
  job = model.prepare({"messages": [{"role": "user", "content": "Hi"}], "stop": [" moves", "zzz"]})
  text, reason, count = model.finish(job, ids)
  assert (text, reason, model.visible(job, ids)) == ("A red circle", "stop", "A red circle")
  assert " moves" in tokenizer.decode(ids[:count]) and " moves" not in tokenizer.decode(ids[:count - 1])

  def key(**fields):
    return model.prepare({"messages": [{"role": "user", "content": "Hi"}], **fields}).key

  # Greedy requests share batches whatever their seed or top-p; sampled ones by settings and seed.
  assert key(seed=1, top_p=0.5) == key(seed=2) != key(temperature=0.7, seed=1)
  assert key(temperature=0.7, seed=1) == key(temperature=0.7, seed=1) != key(temperature=0.7, seed=2)
