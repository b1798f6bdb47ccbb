"""Sampling filters, stop conditions, streaming, tokenizers and the chat/convert commands."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from vllm_jax import cli, pretrained
from vllm_jax import generate as gen
from vllm_jax.converters import llama as llama_conv
from vllm_jax.data.tokenizer import left_pad, load_tokenizer, train_tokenizer

CORPUS = ["a red circle moves left while a low tone plays",
          "the blue square slides up and a high beep sounds",
          "hello there, what does the video show?"] * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random HF LLaMA with a real sentencepiece tokenizer, converted."""
  path = tmp_path_factory.mktemp("tiny")
  tokenizer = train_tokenizer(CORPUS, str(path / "hf"), vocab_size=320)
  torch.manual_seed(0)
  hf = LlamaForCausalLM(HFLlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  hf.save_pretrained(str(path / "hf"))
  config, params = llama_conv.load_hf(str(path / "hf"), progress=False)
  return path, config, params, tokenizer


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), len(logits))
  greedy = gen.sample_logits(logits, keys, gen.SamplingConfig())
  assert np.all(np.asarray(greedy) == 0)
  top2 = np.asarray(gen.sample_logits(logits, keys, gen.SamplingConfig(temperature=1.0, top_k=2)))
  assert set(top2) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.05
  nucleus = np.asarray(gen.sample_logits(logits, keys, gen.SamplingConfig(temperature=1.0, top_p=0.9)))
  assert set(nucleus) == {0, 1, 2}
  only_best = np.asarray(gen.sample_logits(logits, keys, gen.SamplingConfig(temperature=1.0, top_p=0.4)))
  assert set(only_best) == {0}
  free = np.asarray(gen.sample_logits(logits, keys, gen.SamplingConfig(temperature=1.0)))
  assert set(free) == {0, 1, 2, 3}


def test_tokenizer_round_trip(tiny):
  path, _, _, tokenizer = tiny
  loaded = load_tokenizer(str(path / "hf"))
  ids = loaded("a red circle moves left").input_ids
  assert ids[0] == loaded.bos_token_id == 1
  assert loaded.decode(ids, skip_special_tokens=True) == "a red circle moves left"
  assert ids == tokenizer("a red circle moves left").input_ids
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    load_tokenizer(str(path))


def test_left_pad_buckets():
  ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=4)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_stop_ids_streaming_and_stop_strings(tiny):
  _, config, params, tokenizer = tiny
  ids, mask = left_pad([tokenizer(p).input_ids for p in ["hello there", "the blue square"]])
  full = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=24)
  # Stop at the 5th token of row 0: the row ends there, the other row goes on.
  stop = int(full.tokens[0, 4])
  if stop in full.tokens[0, :4] or stop in full.tokens[1]:
    pytest.fail("pick another seed: the stop token must be unique to row 0")
  streamed = []
  out = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=24,
                     stop_token_ids=[stop], on_tokens=streamed.append, chunk=3)
  assert out.lengths[0] == 5 and out.lengths[1] == 24
  np.testing.assert_array_equal(out.tokens[1], full.tokens[1])
  np.testing.assert_array_equal(out.tokens[0, 5:], stop)  # the model has no pad id: the stop id pads
  padded = gen.generate(config.replace(pad_token_id=3), params, input_ids=ids, attention_mask=mask,
                        max_new_tokens=24, stop_token_ids=[stop])
  np.testing.assert_array_equal(padded.tokens[0, 5:], 3)  # its pad id, as transformers pads
  np.testing.assert_array_equal(padded.tokens[:, :5], out.tokens[:, :5])
  assert len(streamed) > 1
  np.testing.assert_array_equal(np.concatenate(streamed, axis=1), out.tokens)
  # A stop string cuts the text before it and stops the row early.
  text = tokenizer.decode(full.tokens[1], skip_special_tokens=True)
  needle = text[len(text) // 3: len(text) // 3 + 3]
  out = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=24,
                     stop_strings=[needle], tokenizer=tokenizer, chunk=4)
  assert out.texts[1] == text[:text.find(needle)]
  assert out.tokens[1, -1] == 0  # the row stopped before the budget was spent


def test_convert_and_chat_commands(tiny, capsys):
  path, config, params, tokenizer = tiny
  out = str(path / "converted")
  assert cli.main(["convert", "llama", "--hf-dir", str(path / "hf"), "--out", out]) == 0
  assert "converted" in capsys.readouterr().out
  assert cli.main(["chat", "--model", out, "--question", "hello there", "--max-new-tokens", "12"]) == 0
  printed = capsys.readouterr().out.strip()
  ids, mask = left_pad([tokenizer("hello there").input_ids], multiple=32)
  ref = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=12,
                     stop_token_ids=[2], tokenizer=tokenizer)
  assert printed == ref.texts[0].strip()
  with pytest.raises(SystemExit):
    cli.main(["chat", "--help"])
  assert "interactively" in capsys.readouterr().out
  # A folder of weights alone loads (tokenizer None); chat says what is missing.
  for name in os.listdir(out):
    if name.startswith(("tokenizer", "special_tokens")):
      os.remove(os.path.join(out, name))
  loaded_config, _, no_tokenizer = pretrained.load_llama(out)
  assert no_tokenizer is None and loaded_config == config
  assert cli.main(["chat", "--model", out, "--question", "hello"]) == 2
  assert "holds no tokenizer" in capsys.readouterr().err


def test_budgets_in_one_power_of_two_share_the_compiled_steps(tiny):
  """max_new_tokens 20 and 30 both get room for 32: the second request compiles nothing (a server
  would otherwise compile per distinct max_tokens), and its first 20 tokens are the first's."""
  _, config, params, tokenizer = tiny
  ids, mask = left_pad([tokenizer(p).input_ids for p in ["hello there", "a red circle"]])
  short = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=20)
  compiled = gen.prefill._cache_size(), gen.decode._cache_size()
  long = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=30)
  assert (gen.prefill._cache_size(), gen.decode._cache_size()) == compiled
  assert short.tokens.shape == (2, 20) and long.tokens.shape == (2, 30)
  np.testing.assert_array_equal(long.tokens[:, :20], short.tokens)
  assert (long.lengths == 30).all() and (short.lengths == 20).all()


def test_long_prompts_prefill_in_pieces_as_one(tiny, monkeypatch):
  """A prompt run PREFILL_CHUNK tokens at a time (left padding inside the first piece) leaves
  the cache and the sampled tokens of one whole prefill."""
  _, config, params, _ = tiny
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 150))
  mask = np.ones_like(ids)
  mask[1, :11] = 0
  sampling = gen.SamplingConfig(temperature=1.0)
  whole = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=6, sampling=sampling)
  monkeypatch.setattr(gen, "PREFILL_CHUNK", 32)
  pieces = gen.generate(config, params, input_ids=ids, attention_mask=mask, max_new_tokens=6, sampling=sampling)
  np.testing.assert_array_equal(pieces.tokens, whole.tokens)
  valid = np.asarray(whole.cache.valid)  # [B, S]; padding slots hold whatever, never read
  np.testing.assert_array_equal(pieces.cache.valid, valid)
  slots_first = lambda x: np.asarray(x).swapaxes(2, 3)  # [L, B, K, S, D] -> [L, B, S, K, D]
  for got, want in ((pieces.cache.k, whole.cache.k), (pieces.cache.v, whole.cache.v)):
    np.testing.assert_allclose(slots_first(got)[:, valid], slots_first(want)[:, valid], rtol=1e-5, atol=1e-5)
