"""LLaMA tokenizers from folders (local or stored: `vllm_jax.paths`), small ones trained on the spot,
and left-padded batches; the BERT WordPiece tokenizer that LLaMA-VID's Q-Former reads instructions with."""

import contextlib
import io
import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from vllm_jax import paths

# Files a tokenizer folder may share with weights (an HF model folder): never copied to read the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


def has_tokenizer(path: str) -> bool:
  return any(paths.exists(paths.join(path, n)) for n in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(path: str):
  """The tokenizer saved in a folder (tokenizer.model / tokenizer.json), never downloaded."""
  from transformers import AutoTokenizer
  if not has_tokenizer(path):
    raise FileNotFoundError(f"no tokenizer in {path} (expected tokenizer.json or tokenizer.model)")
  with _local_folder(path) as local:
    return AutoTokenizer.from_pretrained(local, local_files_only=True)


def save_tokenizer(tokenizer, path: str) -> None:
  """`tokenizer.save_pretrained` into a folder, local or stored."""
  with paths.local_output(path) as local:
    tokenizer.save_pretrained(local)


@contextlib.contextmanager
def _local_folder(path: str) -> Iterator[str]:
  """A local folder with the tokenizer files of folder `path`: `path` itself when local, else a temporary
  copy of its files less weights and subfolders (an HF model folder holds both beside its tokenizer)."""
  if not paths.is_url(path):
    yield paths.resolve(path)
    return
  with tempfile.TemporaryDirectory(prefix="vllm_jax-") as tmp:
    for name in paths.listdir(path):
      source = paths.join(path, name)
      if not name.endswith(_WEIGHT_SUFFIXES) and paths.is_file(source):
        paths.copy_tree(source, os.path.join(tmp, name))
    yield tmp


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
  with paths.local_output(out_dir) as local:
    paths.write_bytes(paths.join(local, "tokenizer.model"), model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(local, local_files_only=True, add_bos_token=True)
    tokenizer.save_pretrained(local)
  return tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1000):
  """Train an uncased BERT WordPiece tokenizer on `texts` (with `[DEC]` added, as LLaMA-VID adds it
  to bert-base-uncased), save it in `out_dir` and return it (see `load_instruction_tokenizer`)."""
  from tokenizers import BertWordPieceTokenizer
  from transformers import BertTokenizerFast
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False)
  with paths.local_output(out_dir) as local:
    paths.makedirs(local)
    trainer.save_model(local)
    tokenizer = BertTokenizerFast(paths.join(local, "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.save_pretrained(local)
  return load_instruction_tokenizer(out_dir)


def load_instruction_tokenizer(path: str):
  """A BERT tokenizer folder (e.g. bert-base-uncased's, with `[DEC]`), truncating from the left
  as LLaMA-VID does, so that the end of a long instruction is kept."""
  from transformers import BertTokenizerFast
  if not any(paths.exists(paths.join(path, n)) for n in ("vocab.txt", "tokenizer.json")):
    raise FileNotFoundError(f"no BERT tokenizer in {path} (expected vocab.txt or tokenizer.json)")
  with _local_folder(path) as local:
    tokenizer = BertTokenizerFast.from_pretrained(local, local_files_only=True)
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
