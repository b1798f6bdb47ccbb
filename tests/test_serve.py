"""`vllm-jax serve` over real HTTP: a tiny random Video-LLaMA (answers equal `System.answer`'s, alone
and among others, streamed and not), the media policy (nothing outside --media-root is read or
named), OpenAI's own client, bad requests, a full queue, a burst of clients, a client that leaves,
the media cache, and the command itself serving a plain LLaMA's text prompts until Ctrl-C."""

import base64
import io
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import openai
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
  (root / "secret.txt").write_text("not for clients")
  (media / "escape.mp4").symlink_to(root / "secret.txt")
  paths = {"root": str(media), "clip": write_video(media / "clip.mp4", num_frames=12, size=(32, 32)),
           "other": write_video(media / "other.mp4", num_frames=20, fps=5, size=(32, 32)),
           "corrupt": str(media / "corrupt.mp4"), "missing": str(media / "nope.mp4"),
           "outside": str(root / "secret.txt"), "escape": str(media / "escape.mp4")}
  return system, llama_dir, paths


@pytest.fixture
def start(files):
  """start(media_root=..., **server options) -> a Server of the Video-LLaMA on a free port."""
  system, _, paths = files
  servers = []

  def start(media_root=paths["root"], **options):
    model = serve.Model.from_system("tiny-video-llama", system, media_policy=serve.MediaPolicy(media_root))
    servers.append(serve.Server(model, port=0, **options).start())
    return servers[-1]

  yield start
  for server in servers:
    server.close()


def request(url, body=None, method=None, data=None, headers=None):
  """-> (status, parsed JSON body or the raw text, headers)."""
  if body is not None:
    data = json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json", **(headers or {})})
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
  body = {"model": "tiny-video-llama", "messages": [{"role": "user", "content": content}], **fields}
  return request(server.url + "/v1/chat/completions", body)


def reference(system, path, question, max_tokens):
  media = system.load_media(path)
  conv = system.conversation(media)
  conv.ask(question)
  return system.answer([media], [conv], max_new_tokens=max_tokens)[0]


def data_url(path):
  with open(path, "rb") as f:
    return "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


def metric(server, name):
  text = request(server.url + "/metrics")[1]
  return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_answer_equals_system_answer_for_files_under_the_root_and_data_urls(files, start):
  system, _, paths = files
  server = start()
  expected = reference(system, paths["clip"], QUESTIONS[0], 12)
  for url in ("clip.mp4", paths["clip"], "file://" + paths["clip"], data_url(paths["clip"])):
    status, out, _ = chat(server, QUESTIONS[0], url, max_tokens=12)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "tiny-video-llama"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    usage = out["usage"]
    assert usage["prompt_tokens"] > 32 and 1 <= usage["completion_tokens"] <= 12  # 32 video tokens in the prompt
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
  # One video, four requests: decoded and encoded once; later prompts reuse the first one's cache.
  assert metric(server, "vllm_jax_media_cache_misses_total") == 1
  assert metric(server, "vllm_jax_media_cache_hits_total") == 3
  assert metric(server, "vllm_jax_prefix_reused_tokens_total") >= 3 * usage["prompt_tokens"] - 3
  # A developer message, earlier turns and an assistant turn without content: the conversation
  # System.answer is given.
  media = system.load_media(paths["clip"])
  conv = system.conversation(media)
  conv.system = "Brief."
  conv.ask("Who?")
  conv.answer("")
  conv.ask("Why?")
  expected = system.answer([media], [conv], max_new_tokens=12)[0]
  messages = [{"role": "developer", "content": "Brief."},
              {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                           {"type": "text", "text": "Who?"}]},
              {"role": "assistant", "content": None}, {"role": "user", "content": "Why?"}]
  status, out, _ = request(server.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
  assert status == 200 and out["choices"][0]["message"]["content"] == expected, out
  status, models, _ = request(server.url + "/v1/models")
  assert status == 200 and models["data"][0]["id"] == "tiny-video-llama"
  assert request(server.url + "/health")[:2] == (200, {"status": "ok"})


def test_requests_sent_at_once_are_each_answered_as_alone(files, start):
  """Six requests, two slots: rows finish at their own max_tokens and free their slot for the next;
  each answer is the one the request gets alone."""
  system, _, paths = files
  server = start(slots=2)
  jobs = [(QUESTIONS[i % 3], [paths["clip"], paths["other"]][i % 2], [12, 3, 7, 12, 1, 5][i]) for i in range(6)]
  expected = [reference(system, path, q, n) for q, path, n in jobs]
  with ThreadPoolExecutor(6) as pool:
    outs = list(pool.map(lambda job: chat(server, job[0], job[1], max_tokens=job[2]), jobs))
  for (status, out, _), answer, (_, _, limit) in zip(outs, expected, jobs):
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == answer and out["usage"]["completion_tokens"] <= limit
  assert metric(server, "vllm_jax_media_cache_misses_total") == 2
  assert metric(server, 'vllm_jax_requests_total{endpoint="/v1/chat/completions",status="200"}') == 6


def stream_events(server, body):
  req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode())
  with urllib.request.urlopen(req, timeout=300) as response:
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = response.read().decode().split("\n\n")
  return [line.removeprefix("data: ") for line in lines if line]


@pytest.mark.parametrize("with_media", [True, False])
def test_streaming_deltas_add_up_to_the_answer(files, start, with_media):
  """Text-only prompts work too (the LLM alone, in the system's template)."""
  _, _, paths = files
  server = start()
  url = "clip.mp4" if with_media else None
  status, out, _ = chat(server, QUESTIONS[2], url, max_tokens=12)
  assert status == 200, out
  answer = out["choices"][0]["message"]["content"]
  content = [{"type": "text", "text": QUESTIONS[2]}]
  if url:
    content.append({"type": "video_url", "video_url": {"url": url}})
  events = stream_events(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 12,
                                  "stream": True, "stream_options": {"include_usage": True}})
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
  pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
  assert len(pieces) >= 2 and all(pieces) and "".join(pieces) == answer
  assert chunks[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
  assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI sends them: usage in a last, empty chunk
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]


def test_images_in_one_message_are_a_clips_frames(files, start):
  """As clients that sample a video themselves send it (lmms-eval's frames): one clip, encoded once."""
  from PIL import Image
  server = start()
  frames = []
  for level in (0, 80, 160, 240):
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), level, np.uint8)).save(buffer, format="PNG")
    frames.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                              + base64.b64encode(buffer.getvalue()).decode()}})
  body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What changes?"}, *frames]}],
          "max_tokens": 4}
  for _ in range(2):
    status, out, _ = request(server.url + "/v1/chat/completions", body)
    assert status == 200 and out["usage"]["prompt_tokens"] > 32, out
  assert metric(server, "vllm_jax_media_cache_misses_total") == 1
  assert metric(server, "vllm_jax_media_cache_hits_total") == 1


def test_media_outside_the_root_is_never_read_or_named(files, start):
  """A path outside the root, a symlink out of it, /etc/passwd, a missing file, a folder: one
  message, no path; without a root no local file at all; http(s) only when allowed."""
  _, _, paths = files
  server = start()
  refused = [paths["outside"], "../secret.txt", paths["escape"], "escape.mp4", "/etc/passwd",
             "file:///etc/passwd", "/proc/self/environ", paths["missing"], "nope.mp4", paths["root"]]
  messages = set()
  for url in refused:
    status, out, _ = chat(server, "What?", url)
    assert status == 400, (url, out)
    messages.add(out["error"]["message"])
    assert "/" not in out["error"]["message"].replace("data:", ""), out
  assert messages == {"no such media file under the server's media root"}
  status, out, _ = chat(server, "What?", "corrupt.mp4")
  assert status == 400 and "cannot decode" in out["error"]["message"]
  assert paths["root"] not in out["error"]["message"] and "corrupt.mp4" not in out["error"]["message"]
  status, out, _ = chat(server, "What?", "http://127.0.0.1:9/clip.mp4")
  assert status == 400 and "--allow-http" in out["error"]["message"]
  closed = start(media_root=None)
  for url in ("clip.mp4", paths["clip"], "file:///etc/passwd"):
    status, out, _ = chat(closed, "What?", url)
    assert status == 400 and "--media-root" in out["error"]["message"] and "clip" not in out["error"]["message"]
  assert chat(closed, "What?", data_url(paths["clip"]), max_tokens=2)[0] == 200


def test_bad_requests_get_clear_errors_and_the_server_goes_on(files, start):
  server = start(max_body_mb=0.01)
  endpoint = server.url + "/v1/chat/completions"
  user = [{"role": "user", "content": "Hi"}]
  cases = [
      (chat(server, "What?", "data:video/mp4;base64,@@@"), 400, "not valid base64"),
      (chat(server, "What?", "clip.mp4", max_tokens=5000), 400, "does not fit the model's context of 1024"),
      (chat(server, "What?", "clip.mp4", temperature=-1), 400, "temperature: Input should be greater than or equal"),
      (chat(server, "What?", seed=2**70), 400, "seed: Input should be less than or equal to 9223372036854775807"),
      (chat(server, "What?", presence_penalty=0.5), 400, "presence_penalty"),
      (chat(server, "<ImageHere> What?", "clip.mp4"), 400, "media placeholder"),
      (request(endpoint, data=b"{not json"), 400, "not valid JSON"),
      (request(endpoint, {"model": "tiny-video-llama"}), 400, "messages: Field required"),
      (request(endpoint, {"messages": [{"role": "tool", "content": "x"}]}), 400, "messages.0.role"),
      (request(endpoint, {"messages": [{"role": "assistant", "content": "Hi"}]}), 400, "must alternate"),
      (request(endpoint, {"messages": [{"role": "user", "content": [
          {"type": "video_url", "video_url": {"url": "clip.mp4"}},
          {"type": "image_url", "image_url": {"url": "clip.mp4"}}]}]}), 400, "or several images"),
      (request(endpoint, data=b"x" * 20000), 413, "over 0.01 MB"),
      (request(server.url + "/v2/nothing"), 404, "no such path: /v2/nothing"),
      (request(endpoint), 405, "does not take GET"),
      (request(endpoint, method="OPTIONS"), 405, "does not take OPTIONS"),  # no CORS unless asked for
      (request(server.url + "/v1/completions", {"prompt": ["a", "b"]}), 400, "one prompt per request"),
  ]
  for (status, out, _), expected_status, message in cases:
    assert status == expected_status, out
    assert out["error"]["type"] == "invalid_request_error" and re.search(message, out["error"]["message"]), out
  status, out, _ = request(endpoint, {"model": "gpt-4o", "messages": user})
  assert status == 404 and out["error"]["code"] == "model_not_found", out
  status, out, _ = chat(server, "What is moving?", "clip.mp4", max_tokens=12)
  assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str)
  assert metric(server, 'vllm_jax_requests_total{endpoint="/v1/chat/completions",status="400"}') == 11
  assert metric(server, 'vllm_jax_requests_total{endpoint="/v1/chat/completions",status="413"}') == 1


def test_cors_is_off_unless_an_origin_is_given(files, start):
  server = start(cors_origins=("http://app.example",))
  headers = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
  status, _, answer = request(server.url + "/v1/chat/completions", method="OPTIONS", headers=headers)
  assert status == 200 and answer["Access-Control-Allow-Origin"] == "http://app.example"
  status, _, answer = request(server.url + "/v1/models", headers={"Origin": "http://app.example"})
  assert status == 200 and answer["Access-Control-Allow-Origin"] == "http://app.example"


def test_a_full_queue_refuses_with_503_and_a_burst_is_never_reset(files, start):
  """One slot, one place in the queue: of requests sent at once some are refused (503, Retry-After),
  none is dropped at the socket; then 256 clients at once on a larger queue: all answered."""
  server = start(slots=1, queue_size=1)
  with ThreadPoolExecutor(6) as pool:
    results = list(pool.map(lambda q: chat(server, q, max_tokens=37), QUESTIONS * 2))
  statuses = sorted(status for status, _, _ in results)
  assert statuses[0] == 200 and statuses[-1] == 503 and set(statuses) == {200, 503}, results
  refused = next((out, headers) for status, out, headers in results if status == 503)
  assert "the server is busy" in refused[0]["error"]["message"] and refused[1]["Retry-After"] == "1"
  assert metric(server, 'vllm_jax_requests_total{endpoint="/v1/chat/completions",status="503"}') >= 1
  server = start(slots=8, queue_size=256)
  with ThreadPoolExecutor(256) as pool:
    results = list(pool.map(lambda i: chat(server, QUESTIONS[i % 3], max_tokens=2), range(256)))
  assert [status for status, _, _ in results] == [200] * 256


def test_a_client_that_leaves_frees_its_slot(files, start):
  server = start(slots=1)
  body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 900, "stream": True}
  with socket.create_connection(server.address) as s:
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    assert b"text/event-stream" in s.recv(4096)
  deadline = time.monotonic() + 60
  while server.load()["busy_slots"] and time.monotonic() < deadline:
    time.sleep(0.05)
  assert server.load()["busy_slots"] == 0 and server.engine.stats["generated_tokens"] < 900
  assert chat(server, "Hi", max_tokens=3)[0] == 200


def test_openai_client_chat_completions_n_logprobs_and_streaming(files, start):
  """OpenAI's own client: n choices (seed + i each), logprobs, a stream with usage, completions."""
  _, _, paths = files
  server = start()
  client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
  video = [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": QUESTIONS[0]}]
  answer = client.chat.completions.create(model="tiny-video-llama", messages=[{"role": "user", "content": video}],
                                          max_tokens=6, n=3, temperature=1.0, seed=11, logprobs=True,
                                          top_logprobs=3)
  assert [c.index for c in answer.choices] == [0, 1, 2]
  alone = client.chat.completions.create(model="tiny-video-llama", messages=[{"role": "user", "content": video}],
                                         max_tokens=6, temperature=1.0, seed=12)
  assert alone.choices[0].message.content == answer.choices[1].message.content  # choice i samples with seed + i
  first = answer.choices[0].logprobs.content[0]
  assert len(first.top_logprobs) == 3 and first.logprob <= first.top_logprobs[0].logprob <= 0
  stream = client.chat.completions.create(model="tiny-video-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5
  completion = client.completions.create(model="tiny-video-llama", prompt="A red circle", max_tokens=4,
                                         logprobs=2, seed=1)
  choice = completion.choices[0]
  assert choice.finish_reason in ("stop", "length")
  assert len(choice.logprobs.tokens) == completion.usage.completion_tokens
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])


def test_serve_command_answers_text_prompts_of_a_plain_llama_until_ctrl_c(files, capsys):
  """The command as a judge's client meets it: it prints its URL once ready (with --port 0, the
  port it got; with --precompile, once every shape is compiled), answers chat requests, and Ctrl-C
  (SIGINT) stops it with status 0."""
  _, llama_dir, _ = files
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url, results = f"http://127.0.0.1:{port}", {}

  def client():
    try:
      for _ in range(600):  # 503 until the model is loaded (the command listens first)
        try:
          if request(url + "/health")[0] == 200:
            break
        except urllib.error.URLError:
          pass
        time.sleep(0.1)
      body = {"model": "llama", "messages": [{"role": "system", "content": "Judge."},
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
    assert cli.main(["serve", "--model", llama_dir, "--port", str(port), "--slots", "2", "--precompile",
                     "--max-len", "128", "--prefill-chunk", "64", "--max-new-tokens", "6"]) == 0
  finally:
    signal.signal(signal.SIGINT, previous)
  out, err = capsys.readouterr()
  assert f"serving llama at {url}/v1" in out and "stopped" in err
  status, answer, _ = results["text"]
  assert status == 200 and answer["usage"]["completion_tokens"] <= 6 and answer["model"] == "llama", answer
  status, refused, _ = results["image"]
  assert status == 400 and "text-only" in refused["error"]["message"]


def test_serve_command_reports_a_bad_model_folder_a_bad_media_root_and_a_busy_port(files, tmp_path, capsys):
  _, llama_dir, _ = files
  assert cli.main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
  assert "model folder not found" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["serve", "--model", llama_dir, "--media-root", str(tmp_path / "nope")])
  assert "no such folder on this machine" in capsys.readouterr().err
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    assert cli.main(["serve", "--model", llama_dir, "--port", str(s.getsockname()[1])]) == 2
  assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_a_plain_llama_uses_its_tokenizers_chat_template_and_stop_strings(files):
  _, llama_dir, _ = files
  config, params, tokenizer = pretrained.load_llama(llama_dir)
  tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  model = serve.Model("llama", tokenizer, config, params)
  prompt = model.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {})
  assert tokenizer.decode(prompt.ids) == "<|system|>Be brief.<|user|>Hi<|assistant|>"
  assert prompt.max_tokens == 128 and prompt.embeds is None
  assert model.finish(prompt, [5, 6, model.stop_ids[0], 7])[1:] == ("stop", 3)
  assert model.finish(prompt, [5, 6, 7])[1:] == ("length", 3)
  # A request's stop string ends the answer before it; the tokens counted end where it appeared.
  ids = tokenizer("A red circle moves left.", add_special_tokens=False).input_ids
  prompt = model.chat_prompt([{"role": "user", "content": "Hi"}], {"stop": [" moves", "zzz"]})
  text, reason, count = model.finish(prompt, ids)
  assert (text, reason, model.visible(prompt, ids)) == ("A red circle", "stop", "A red circle")
  assert " moves" in tokenizer.decode(ids[:count]) and " moves" not in tokenizer.decode(ids[:count - 1])
  assert model.stops(prompt, ids) and not model.stops(prompt, ids[:2])
