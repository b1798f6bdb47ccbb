"""LLaMA tokenizers from local folders, small ones trained on the spot, and left-padded batches;
the BERT WordPiece tokenizer that LLaMA-VID's Q-Former reads instructions with."""

import io
import os
from typing import Iterable, Sequence

import numpy as np


def has_tokenizer(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(path: str):
  """The tokenizer saved in a local folder (tokenizer.model / tokenizer.json), never downloaded."""
  from transformers import AutoTokenizer
  if not has_tokenizer(path):
    raise FileNotFoundError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512):
  """Train a LLaMA-style sentencepiece BPE tokenizer (byte fallback, <unk>=0, <s>=1, </s>=2)
  on `texts`, save it as a transformers LlamaTokenizer folder in `out_dir`, and return it.

  `vocab_size` must leave room for the 256 byte pieces; it is a ceiling for small corpora.
  """
  import sentencepiece as spm
  from transformers import LlamaTokenizer
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
      split_digits=True, minloglevel=2)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  tokenizer = LlamaTokenizer.from_pretrained(out_dir, local_files_only=True, add_bos_token=True)
  tokenizer.save_pretrained(out_dir)
  return tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1000):
  """Train an uncased BERT WordPiece tokenizer on `texts` (with `[DEC]` added, as LLaMA-VID adds it
  to bert-base-uncased), save it in `out_dir` and return it (see `load_instruction_tokenizer`)."""
  from tokenizers import BertWordPieceTokenizer
  from transformers import BertTokenizerFast
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False)
  os.makedirs(out_dir, exist_ok=True)
  trainer.save_model(out_dir)
  tokenizer = BertTokenizerFast(os.path.join(out_dir, "vocab.txt"), do_lower_case=True)
  tokenizer.add_special_tokens({"bos_token": "[DEC]"})
  tokenizer.save_pretrained(out_dir)
  return load_instruction_tokenizer(out_dir)


def load_instruction_tokenizer(path: str):
  """A BERT tokenizer folder (e.g. bert-base-uncased's, with `[DEC]`), truncating from the left
  as LLaMA-VID does, so that the end of a long instruction is kept."""
  from transformers import BertTokenizerFast
  if not any(os.path.exists(os.path.join(path, n)) for n in ("vocab.txt", "tokenizer.json")):
    raise FileNotFoundError(f"no BERT tokenizer in {path} (expected vocab.txt or tokenizer.json)")
  tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
  tokenizer.truncation_side = "left"
  return tokenizer


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (ids [B, T], mask [B, T]) padded on the left, T rounded up to `multiple`
  (bucketed lengths let compiled functions be reused across batches): prompts to generate from."""
  return _pad(sequences, pad_id, multiple, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0,
              multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """As `left_pad`, the padding on the right: rows scored whole, as training lays them out."""
  return _pad(sequences, pad_id, multiple, left=False)


def _pad(sequences, pad_id, multiple, left):
  length = max(len(s) for s in sequences)
  length = -(-length // multiple) * multiple
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for row, seq in enumerate(sequences):
    if len(seq):
      span = slice(length - len(seq), length) if left else slice(0, len(seq))
      ids[row, span] = seq
      mask[row, span] = 1
  return ids, mask
