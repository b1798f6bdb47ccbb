"""The assembled model against a PyTorch composition of the reference modules (transformers'
BLIP-2 parts + ImageBind's reference code + transformers' LLaMA), on a real mp4 with audio."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from test_audio_branch import CONFIG as AUDIO, TorchAudioBranch
from test_imagebind_audio import needs_reference
from test_video_branch import TINY as VISION, TorchBranch, torch_branch_rules
from test_video_loading import write_video
from vllm_jax import generate as gen
from vllm_jax.converters import llama as llama_conv
from vllm_jax.converters import video_llama_audio as audio_conv
from vllm_jax.converters.core import DictReader, convert
from vllm_jax.data import conversation as C
from vllm_jax.data.media import load_media
from vllm_jax.data.tokenizer import left_pad, load_tokenizer, train_tokenizer
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.models.video_llama import VideoLlama, VideoLlamaConfig, abstract_params
from vllm_jax.systems import video_llama as video_llama_system
from vllm_jax.train import trainer

CORPUS = ["###Human: What is moving in the video?\n###Assistant: A red circle moves left.\n",
          "The video contains 4 frames sampled at 0.0, 1.5 seconds. Close your eyes, open your ears"] * 20
HIDDEN = AUDIO.llm_hidden_size


def tiny_config(vocab_size: int) -> VideoLlamaConfig:
  llama = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=HIDDEN // 4, rms_norm_eps=1e-6, remat_policy="none")
  return VideoLlamaConfig(llama=llama, vision=VISION.replace(llm_hidden_size=HIDDEN), audio=AUDIO,
                          video_token_id=vocab_size, audio_token_id=vocab_size + 1,
                          num_frames=VISION.max_frames)


class TorchVideoLlama:
  """Video-LLaMA's chat path in PyTorch: encode the media, split the prompt at the placeholders,
  embed each segment (BOS on the first only), concatenate segments and media in order."""

  def __init__(self, config: VideoLlamaConfig, tokenizer):
    self.tokenizer = tokenizer
    self.vision = TorchBranch(config.vision)
    self.audio = TorchAudioBranch()
    torch.manual_seed(2)
    hf = HFLlamaConfig(vocab_size=config.llama.vocab_size, hidden_size=HIDDEN, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)
    self.llm = LlamaForCausalLM(hf).eval()
    with torch.no_grad():  # larger weights than the default init, for logits far from uniform
      for p in self.llm.parameters():
        if p.ndim == 2:
          torch.nn.init.normal_(p, std=0.2)

  @torch.no_grad()
  def context(self, prompt: str, frames: np.ndarray, clips: np.ndarray | None) -> torch.Tensor:
    media = {"<ImageHere>": torch.from_numpy(self.vision(frames[None]))}
    if clips is not None:
      media["<AudioHere>"] = self.audio(torch.from_numpy(clips[None]))
    parts = re.split("(<ImageHere>|<AudioHere>)", prompt)
    embeds = []
    for i, part in enumerate(parts):
      if part in media:
        embeds.append(media[part])
      else:
        ids = self.tokenizer(part, add_special_tokens=i == 0, return_tensors="pt").input_ids
        embeds.append(self.llm.model.embed_tokens(ids))
    return torch.cat(embeds, dim=1)

  @torch.no_grad()
  def greedy(self, embeds: torch.Tensor, steps: int) -> tuple[np.ndarray, list[int]]:
    out = self.llm(inputs_embeds=embeds, use_cache=True)
    logits, past, tokens = out.logits, out.past_key_values, []
    for _ in range(steps):
      tokens.append(int(out.logits[0, -1].argmax()))
      out = self.llm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
      past = out.past_key_values
    return logits[0].numpy(), tokens

  def params(self, config: VideoLlamaConfig):
    abstract = nn.meta.unbox(abstract_params(config))
    return {
        "vision": convert(DictReader(self.vision.state_dict()), torch_branch_rules(config.vision),
                          abstract["vision"], progress=False),
        "audio": audio_conv.convert_branch(DictReader(self.audio.video_llama_state_dict()), config.audio,
                                           with_encoder=True, progress=False),
        "llm": convert(DictReader(self.llm.state_dict()), llama_conv.rules(config.llama), abstract["llm"],
                       ignore=llama_conv.IGNORED, progress=False),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Tokenizer, model, weights shared with the reference, a real mp4 with audio and its media
  tokens (encoded once for the module: the encoders are the costly part to compile)."""
  path = tmp_path_factory.mktemp("vl")
  train_tokenizer(CORPUS, str(path / "tok"), vocab_size=300)
  tokenizer = load_tokenizer(str(path / "tok"))
  vocab = len(tokenizer)
  C.add_media_tokens(tokenizer)
  config = tiny_config(vocab)
  ref = TorchVideoLlama(config, tokenizer)
  params = jax.tree.map(jnp.asarray, ref.params(config))
  video = write_video(path / "clip.mp4", num_frames=40, audio_seconds=4.0)
  media = load_media(video, num_frames=config.num_frames, size=VISION.vit.image_size, with_audio=True)
  assert media.audio_valid
  tokens = video_llama_system.encode_media(config, params, media.frames.frames[None], None, media.audio[None])
  return config, params, tokenizer, ref, media, tokens


def prompt_for(media, question: str, with_audio: bool) -> str:
  conv = C.Conversation.for_media(C.VICUNA_V0, media.frames.timestamps, with_audio=with_audio)
  conv.ask(question)
  return conv.prompt()


def ids_for(config, tokenizer, prompt):
  return C.encode_prompt(tokenizer, prompt, config.num_video_tokens, config.num_audio_tokens)


def llm_logits(config, params, embeds, mask=None):
  return jax.jit(Llama(config.llama).apply)({"params": params["llm"]}, inputs_embeds=embeds,
                                            attention_mask=mask)[0]


@needs_reference
@pytest.mark.parametrize("with_audio", [True, False], ids=["audio-visual", "visual"])
def test_logits_and_greedy_match_torch_composition(setup, with_audio):
  config, params, tokenizer, ref, media, (video, audio) = setup
  prompt = prompt_for(media, "What is moving?", with_audio)
  embeds = ref.context(prompt, media.frames.frames, media.audio if with_audio else None)
  expected, expected_tokens = ref.greedy(embeds, 32)

  ids = np.asarray([ids_for(config, tokenizer, prompt)])
  assert ids.shape[1] == embeds.shape[1]
  inputs = video_llama_system.embed_with_media(config, params, ids, video, audio if with_audio else None)
  logits = llm_logits(config, params, inputs)
  err = np.abs(np.asarray(logits[0]) - expected).max() / np.abs(expected).max()
  print(f"video-llama logits ({'with' if with_audio else 'without'} audio): max rel err {err:.2e}")
  assert err <= 1e-4
  out = gen.generate(config.llama, params["llm"], inputs_embeds=inputs, max_new_tokens=32)
  assert out.tokens[0].tolist() == expected_tokens


def test_batch_rows_with_different_prompts_and_padding(setup):
  """The whole model on a left-padded batch (an audio-visual row and a visual row of other
  lengths) equals each row alone."""
  config, params, tokenizer, _, media, (video, audio) = setup
  rows = [ids_for(config, tokenizer, prompt_for(media, "What is moving?", True)),
          ids_for(config, tokenizer, prompt_for(media, "Where does the circle go after that?", False))]
  ids, mask = left_pad(rows, multiple=8)
  frames = np.stack([media.frames.frames] * 2)
  clips = np.stack([media.audio, np.zeros_like(media.audio)])
  batch, _ = jax.jit(VideoLlama(config).apply)({"params": params}, ids, frames, None, clips, mask)
  for row, row_ids in enumerate(rows):
    alone = llm_logits(config, params, video_llama_system.embed_with_media(config, params, np.asarray([row_ids]), video, audio))
    np.testing.assert_allclose(batch[row, -len(row_ids):], alone[0], rtol=1e-5, atol=1e-5)


def test_session_reuses_the_cache_across_turns(setup):
  """Media encoded once; turn 2 prefills only its new tokens and answers as a fresh run does."""
  config, params, tokenizer, _, media, (video, audio) = setup
  conv = C.Conversation.for_media(C.VICUNA_V0, media.frames.timestamps, with_audio=True)
  session = gen.Session(config.llama, params["llm"], max_len=512)

  def turn(question):
    conv.ask(question)
    ids = ids_for(config, tokenizer, conv.prompt())
    embeds = video_llama_system.embed_with_media(config, params, np.asarray([ids]), video, audio)
    out = session.generate(ids, embeds, max_new_tokens=32)
    fresh = gen.generate(config.llama, params["llm"], inputs_embeds=embeds, max_new_tokens=32)
    np.testing.assert_array_equal(out.tokens, fresh.tokens)
    conv.answer(tokenizer.decode(out.tokens[0], skip_special_tokens=True))
    return len(ids)

  first = turn("What is moving?")
  assert len(session.tokens) == first + 31
  assert session.reused == 0
  turn("And then?")
  assert session.reused >= first  # turn 1's prompt (at least) came from the cache
  # Another question about the same media: the cache rolls back to the shared prefix (the media turn).
  conv = C.Conversation.for_media(C.VICUNA_V0, media.frames.timestamps, with_audio=True)
  turn("Where is the circle?")
  assert 0 < session.reused < first


def test_loss_matches_torch_with_masked_labels(setup):
  config, params, tokenizer, ref, media, (video, _) = setup
  turns = [(C.video_turn(media.frames.timestamps) + "What is moving?", "A red circle.")]
  ids, labels = C.encode_training(tokenizer, C.VICUNA_V0, turns, num_video_tokens=config.num_video_tokens)
  batch = C.collate([(ids, labels)], multiple=16)  # right padding: masked, labels -100

  def loss_fn(video_tokens):
    embeds = VideoLlama(config).apply({"params": params}, batch["input_ids"], video_tokens, method="embed")
    logits = Llama(config.llama).apply({"params": params["llm"]}, inputs_embeds=embeds,
                                       attention_mask=batch["attention_mask"])[0]
    loss_sum, count = trainer.cross_entropy(logits, batch["labels"])
    return loss_sum / count, count

  (loss, count), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(video)
  assert int(count) == (np.asarray(labels[1:]) != -100).sum()
  # Reference: HF's shifted cross-entropy on the reference's spliced embeddings.
  prompt = "\n\n###Human: " + turns[0][0] + "\n###Assistant: A red circle.\n###"
  embeds = ref.context(prompt, media.frames.frames, None)
  assert embeds.shape[1] == len(ids)
  with torch.no_grad():
    expected = ref.llm(inputs_embeds=embeds, labels=torch.tensor([labels])).loss.item()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(jnp.abs(grad).max()) > 0  # the loss reaches the spliced media tokens
