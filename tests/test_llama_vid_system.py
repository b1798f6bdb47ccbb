"""LLaMA-VID through the commands every system shares: a tiny random model folder (a real LLaMA
tokenizer and a real WordPiece instruction tokenizer), videos read at 1 fps and encoded in
chunks equal to one whole forward, the media moving to the newest question with context tokens
read from it, a chat session that never reuses a cache computed with another question's
tokens, and `chat` / `infer` on real files."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from test_video_loading import write_video
from vllm_jax import cli, generate, systems
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data.tokenizer import train_tokenizer, train_wordpiece_tokenizer
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.llama_vid import LlamaVid, LlamaVidConfig
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.vit import EVA_VIT_G
from vllm_jax.systems.llama_vid import LlamaVidSystem

CORPUS = ["USER: What is moving in the video? ASSISTANT: A red circle moves left.",
          "A chat between a curious user and an artificial intelligence assistant.",
          "Describe the video. What colour is the square? Where does it go, and when?"] * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A random tiny LLaMA-VID saved as a model folder (chunks of 4 frames), a 12 s video at
  5 fps, a 3 s one and an image."""
  root = tmp_path_factory.mktemp("llama_vid_system")
  tokenizer = train_tokenizer(CORPUS, str(root / "tok"), vocab_size=300)
  instruction_tokenizer = train_wordpiece_tokenizer(CORPUS, str(root / "bert"), vocab_size=120)
  llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=10, max_position_embeddings=512)
  config = LlamaVidConfig(
      llama=llama, vit=EVA_VIT_G.replace(image_size=28, width=32, depth=2, num_heads=4, mlp_dim=64),
      qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=32,
                            num_queries=4, vocab_size=len(instruction_tokenizer), max_position_embeddings=256),
      image_token_id=LlamaVidSystem.add_media_tokens(tokenizer)[0], chunk_frames=4)
  inputs = {k: np.zeros(v.shape, v.dtype) for k, v in LlamaVidSystem.init_inputs(config).items()}
  params = nn.meta.unbox(LlamaVid(config).init(jax.random.key(0), **inputs)["params"])
  model = str(root / "model")
  LlamaVidSystem(config, params, tokenizer, instruction_tokenizer).save(model)
  media = root / "media"
  media.mkdir()
  write_video(media / "long.mp4", num_frames=60, fps=5, size=(40, 56))
  write_video(media / "short.mp4", num_frames=15, fps=5, size=(40, 56))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8)).save(media / "img.png")
  return model, media


def test_loads_with_both_tokenizers_and_samples_one_frame_a_second(files):
  model, media = files
  system = systems.load(model)
  assert isinstance(system, LlamaVidSystem) and len(system.instruction_tokenizer) == system.config.qformer.vocab_size
  video = system.load_media(str(media / "long.mp4"))
  assert video.frames.frames is None and video.frames.timestamps == [float(t) for t in range(12)]
  assert system.placeholders(video)["<image>"] == (system.config.image_token_id, 12 * 2)
  assert system.load_media(str(media / "long.mp4"), num_frames=4).frames.timestamps == [0.0, 3.0, 7.0, 11.0]
  assert system.placeholders(system.load_media(str(media / "img.png")))["<image>"][1] == 2


def test_chunked_encoding_equals_one_forward(files):
  """Features written and read back in chunks of 4 frames, and the tokens computed chunk by
  chunk, equal the model run on all 12 frames at once."""
  model, media = files
  system = systems.load(model)
  video = system.load_media(str(media / "long.mp4"))
  [features] = system.encode_media([video])
  frames = np.concatenate(list(__import__("vllm_jax.data.video", fromlist=["x"]).FrameStream(
      str(media / "long.mp4")).chunks(64, 28)))
  assert frames.shape == (12, 28, 28, 3)
  model_ = LlamaVid(system.config)
  whole = model_.apply({"params": system.params}, frames, method="encode_frames")
  np.testing.assert_allclose(features.read(0, 12), whole, rtol=1e-5, atol=1e-6)
  question = "What colour is the square?"
  ids = system.instruction_tokenizer(question).input_ids
  tokens = model_.apply({"params": system.params}, whole, np.asarray([ids] * 12), np.ones((12, len(ids)), np.int32),
                        method="frame_tokens")
  np.testing.assert_allclose(system.media_tokens(features, question), np.asarray(tokens).reshape(24, -1),
                             rtol=1e-5, atol=1e-6)
  other = system.media_tokens(features, "Describe the video.")
  assert not np.allclose(other[0], tokens[0, 0]) and np.allclose(other[1], tokens[0, 1], atol=1e-6)  # context only


def test_media_follow_the_newest_question():
  conv = conv_lib.Conversation(conv_lib.get_template("vicuna_v1")).open_with("<image>\n", follow=True)
  conv.ask("What moves?")
  conv.answer("A circle.")
  conv.ask("Where to?")
  assert conv.prompt().endswith("USER: What moves? ASSISTANT: A circle.</s>USER: <image>\nWhere to? ASSISTANT:")
  assert conv.media_questions() == ["Where to?"]
  assert conv.prompt().startswith("A chat between a curious user and an artificial intelligence assistant.")
  assert conv.drop_oldest_turn() and conv.messages == [["USER", "<image>\nWhere to?"]]
  assert conv.drop_oldest_turn() is False  # the open question stays


def test_session_answers_as_a_fresh_run_and_never_reuses_other_context_tokens(files):
  model, media = files
  system = systems.load(model)
  video = system.load_media(str(media / "short.mp4"))
  features = system.encode_media([video])
  session = generate.Session(system.config.llama, system.params["llm"], max_len=256)

  def turn(conv, question):
    conv.ask(question)
    ids = system.prompt_ids(conv.prompt(), video)
    embeds = system.embed([ids], features, [conv])
    out = session.generate(ids, embeds, max_new_tokens=6, tokenizer=system.tokenizer)
    fresh = generate.generate(system.config.llama, system.params["llm"], inputs_embeds=embeds, max_new_tokens=6)
    np.testing.assert_array_equal(out.tokens, fresh.tokens)
    conv.answer(system.clean_answer(out.texts[0]))
    return ids

  conv = system.conversation(video)
  first = turn(conv, "What colour is the square?")
  turn(conv, "Where does it go?")
  # The same first question's ids, then another one: the placeholder ids match the cache, their
  # context tokens do not, so nothing from the first placeholder on is reused.
  ids = turn(system.conversation(video), "Describe the video.")
  start = ids.index(system.config.image_token_id)
  assert first[:start + 6] == ids[:start + 6] and session.reused == start


def test_chat_and_infer_commands(files, tmp_path, capsys):
  model, media = files
  assert cli.main(["chat", "--model", model, "--video", str(media / "long.mp4"), "--question", "What moves?",
                   "--max-new-tokens", "4"]) == 0
  assert "[video, frames at 0.0, 1.0," in capsys.readouterr().err
  items = [{"video": "long.mp4", "question": "What moves?", "id": "a"},
           {"image": "img.png", "question": "What is this?", "id": "b"},
           {"video": "short.mp4", "question": "Where?", "id": "c"}]
  src, dst = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
  src.write_text("\n".join(map(json.dumps, items)) + "\n")
  assert cli.main(["infer", "--model", model, "--input", str(src), "--output", str(dst), "--media-root",
                   str(media), "--batch-size", "2", "--max-new-tokens", "4"]) == 0
  answers = [json.loads(line) for line in dst.read_text().splitlines()]
  assert sorted(a["id"] for a in answers) == ["a", "b", "c"] and all("answer" in a for a in answers)
