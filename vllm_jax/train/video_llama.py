"""Video-LLaMA training: examples from video captions (stage 1) or instruction conversations
(stage 2), the loss, and the run behind `vllm-jax train`.

An example (fixed shapes, so that batches stack and the step compiles once):
  frames [T, S, S, 3] float32, frame_mask [T] bool (False on padding frames);
  input_ids, labels, attention_mask [L] int32, right-padded, labels -100 where nothing is learned;
  audio [N, 1, mel, frames] float32, with `data.with_audio` (zeros for media without sound).
Token layouts (see `vllm_jax.data.conversation`):
  caption:      [BOS, <AudioHere> x Qa (videos with sound), <ImageHere> x Qv, caption + end_sym],
                the caption cut at `max_text_len` tokens; only the caption is learned.
  conversation: the template's training text, the media turn opening the first question,
                cut at `max_text_len` tokens (placeholders included, as Video-LLaMA counts them).
L is the longest layout the configured sources can produce (`seq_len`).
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax import pretrained
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets
from vllm_jax.data.audio import AudioClipConfig
from vllm_jax.data.media import load_media
from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.models.video_llama import VideoLlama, VideoLlamaConfig, abstract_params, init_inputs
from vllm_jax.train import checkpoint, sharding, trainer

log = logging.getLogger(__name__)

INSTRUCTION_READERS = {"llava": datasets.llava_records, "videochat": datasets.videochat_records}
_MEDIA_MARKER = re.compile(r"\s*<(image|video)>\s*")  # LLaVA/Video-ChatGPT's media slot in a question


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
  tokenizer = load_tokenizer(path)
  conv_lib.add_media_tokens(tokenizer)
  return tokenizer


@dataclasses.dataclass(frozen=True)
class Decode:
  """record -> example (see the module doc). Picklable: grain worker processes run it, each
  loading the tokenizer once. Frame sampling and cropping draw from a generator seeded by
  (seed, media path), so a run is reproducible and resumes exactly."""
  tokenizer_dir: str
  stage: int                       # 1: record["caption"]; 2: record["conversation"]
  seq_len: int
  max_text_len: int
  num_frames: int
  image_size: int
  num_video_tokens: int
  num_audio_tokens: int
  audio: AudioClipConfig | None    # None: no audio input
  template: str = "vicuna_v0"
  end_sym: str = "\n"
  sampling: str = "headtail"       # "headtail" (training) or "uniform"
  train_crop: bool = True          # RandomResizedCrop(scale 0.5-1) on the frames
  seed: int = 0

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    digest = hashlib.sha256(f"{self.seed}:{record['media']}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    media = load_media(record["media"], self.num_frames, self.image_size, with_audio=self.audio is not None,
                       audio_config=self.audio or AudioClipConfig(), sampling=self.sampling, rng=rng,
                       train_crop=self.train_crop)
    with_audio = self.audio is not None and media.audio_valid
    tokenizer = _tokenizer(self.tokenizer_dir)
    if self.stage == 1:
      media_text = (conv_lib.AUDIO_TOKEN if with_audio else "") + conv_lib.IMAGE_TOKEN
      ids, labels = conv_lib.encode_pieces(tokenizer, [(media_text, False)], self.num_video_tokens,
                                           self.num_audio_tokens)
      # The caption alone (its own segment, as in the full text), without its BOS.
      text = conv_lib.encode_pieces(tokenizer, [(record["caption"] + self.end_sym, True)])[0][1:]
      ids, labels = ids + text[:self.max_text_len], labels + text[:self.max_text_len]
    else:
      turns = conversation_turns(record["conversation"])
      first = conv_lib.media_turn(media.frames.timestamps, media.is_image, with_audio)
      turns[0] = (first + turns[0][0], turns[0][1])
      ids, labels = conv_lib.encode_training(tokenizer, conv_lib.get_template(self.template), turns,
                                             num_video_tokens=self.num_video_tokens,
                                             num_audio_tokens=self.num_audio_tokens)
      ids, labels = ids[:self.max_text_len], labels[:self.max_text_len]
    example = {k: v[0] for k, v in conv_lib.collate([(ids, labels)], multiple=self.seq_len).items()}
    example.update(frames=media.frames.frames, frame_mask=media.frames.frame_mask)
    if self.audio is not None:
      shape = (self.audio.num_clips, 1, self.audio.num_mel_bins, self.audio.num_frames)
      example["audio"] = media.audio if with_audio else np.zeros(shape, np.float32)
    return example


@dataclasses.dataclass(frozen=True)
class Cached:
  """A decode whose examples are kept in this process's memory, keyed by media path: a `Decode`
  gives the same example for a record every epoch, so a small dataset is decoded once."""
  decode: Decode
  memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    if record["media"] not in self.memo:
      self.memo[record["media"]] = self.decode(record)
    return self.memo[record["media"]]


def conversation_turns(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
  """[{"from": "human" | "gpt", "value"}] -> [(question, answer)], media markers removed."""
  if len(messages) < 2 or len(messages) % 2:
    raise ValueError(f"expected alternating human/gpt messages, got {len(messages)}")
  turns = []
  for question, answer in zip(messages[::2], messages[1::2]):
    if (question["from"], answer["from"]) != ("human", "gpt"):
      raise ValueError(f"expected a human then a gpt message, got {question['from']}, {answer['from']}")
    turns.append((_MEDIA_MARKER.sub(" ", question["value"]).strip(), answer["value"]))
  return turns


def loss_fn(model: VideoLlama) -> trainer.LossFn:
  """(params, batch, rng) -> (summed next-token loss, learned-token count) over the batch."""
  def loss(params, batch, rng):
    del rng  # no dropout: frozen encoders, deterministic connectors
    logits, _ = model.apply({"params": params}, batch["input_ids"], frames=batch["frames"],
                            frame_mask=batch["frame_mask"], audio=batch.get("audio"),
                            attention_mask=batch["attention_mask"])
    return trainer.cross_entropy(logits, batch["labels"])
  return loss


def seq_len(cfg, config: VideoLlamaConfig) -> int:
  media = 1 + config.num_video_tokens + (config.num_audio_tokens if cfg.data.with_audio else 0)
  return max(media + cfg.data.max_text_len if cfg.data.webvid_csv else 0,
             cfg.data.max_text_len if cfg.data.instruct_json else 0)


def make_dataset(cfg, config: VideoLlamaConfig, tokenizer_dir: str):
  """The examples of every configured source (`data.webvid_*` captions, `data.instruct_*`
  conversations), mixed by `data.weights`; with `data.cache_examples` (optional) each is decoded
  once and kept in memory."""
  data = cfg.data
  if not data.webvid_csv and not data.instruct_json:
    raise ValueError("no training data: set data.webvid_csv (+ data.webvid_dir) and/or data.instruct_json "
                     "(+ data.instruct_dir)")
  if data.with_audio and config.audio is None:
    raise ValueError("data.with_audio needs a model with an audio branch")
  enc = config.audio.encoder if data.with_audio else None
  common = dict(
      tokenizer_dir=tokenizer_dir, seq_len=seq_len(cfg, config), max_text_len=data.max_text_len,
      num_frames=config.num_frames, image_size=config.vision.vit.image_size,
      num_video_tokens=config.num_video_tokens, num_audio_tokens=config.num_audio_tokens,
      audio=AudioClipConfig(num_clips=config.audio.max_clips, num_mel_bins=enc.num_mel_bins,
                            num_frames=enc.num_frames) if enc else None,
      template=config.template, end_sym=data.end_sym, sampling=data.sampling, train_crop=data.train_crop,
      seed=cfg.seed)
  wrap = Cached if data.get("cache_examples", False) else lambda decode: decode
  sources, weights = [], []
  num_epochs = None if data.num_epochs < 0 else data.num_epochs
  if data.webvid_csv:
    records = datasets.webvid_records(data.webvid_csv, data.webvid_dir)
    sources.append(datasets.examples(records, wrap(Decode(stage=1, **common)), seed=cfg.seed, shuffle=data.shuffle,
                                     num_epochs=num_epochs))
    weights.append(data.weights[0])
  if data.instruct_json:
    records = INSTRUCTION_READERS[data.instruct_format](data.instruct_json, data.instruct_dir)
    sources.append(datasets.examples(records, wrap(Decode(stage=2, **common)), seed=cfg.seed + 1,
                                     shuffle=data.shuffle, num_epochs=num_epochs))
    weights.append(data.weights[-1])
  return sources[0] if len(sources) == 1 else datasets.mixture(sources, weights)


def make_trainer(cfg, mesh, config: VideoLlamaConfig, params=None) -> trainer.Trainer:
  """A Trainer for `config`, starting from `params` (sharded like the model's parameters) or,
  without them, from a random init."""
  model = VideoLlama(config)
  boxed = abstract_params(config)
  if params is None:
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in init_inputs(config).items()}
    params_fn = lambda rng: model.init(rng, **inputs)["params"]
  else:
    params_fn = lambda rng: params
  return trainer.Trainer(cfg, mesh, loss_fn(model), params_fn, sharding.param_shardings(boxed, mesh))


def load_model(cfg, mesh) -> tuple[VideoLlamaConfig, Any, str]:
  """-> (model config, params or None, tokenizer folder). `init_from`: a folder written by
  `vllm-jax convert video-llama`; else `model` with a random init and `data.tokenizer`, whose
  placeholder ids become the model's."""
  if cfg.init_from:
    config, params, _ = pretrained.load_video_llama(cfg.init_from, mesh=mesh)
    return config, params, os.path.join(cfg.init_from, "tokenizer")
  if not cfg.data.tokenizer:
    raise ValueError("set init_from (a converted model folder) or data.tokenizer (for a random init)")
  config = VideoLlamaConfig.from_dict(cfg.model.to_dict())
  tokenizer = _tokenizer(cfg.data.tokenizer)
  video_id, audio_id = conv_lib.media_token_ids(tokenizer)
  if len(tokenizer) - 2 > config.llama.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer) - 2} text tokens, model.llama.vocab_size is "
                     f"{config.llama.vocab_size}")
  return config.replace(video_token_id=video_id, audio_token_id=audio_id), None, cfg.data.tokenizer


def train(cfg, progress: bool = False) -> trainer.LoopResult:
  """Train to `train.steps`, resuming from the latest checkpoint in `train.workdir`; per-step
  metrics are appended to `train.workdir`/metrics.jsonl. `progress`: a progress bar of the steps."""
  mesh = sharding.mesh_from_config(cfg.mesh)
  config, params, tokenizer_dir = load_model(cfg, mesh)
  t = make_trainer(cfg, mesh, config, params)
  state = t.init()
  it = iter(datasets.batches(make_dataset(cfg, config, tokenizer_dir), cfg.train.batch_size,
                             worker_count=cfg.data.worker_count))
  ckpt = None
  if cfg.train.workdir:
    ckpt = checkpoint.TrainCheckpointer(os.path.join(cfg.train.workdir, "checkpoints"),
                                        max_to_keep=cfg.train.keep_checkpoints,
                                        async_save=cfg.train.async_checkpoints, save_frozen=cfg.train.save_frozen)
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state, it)
      log.info("resumed from step %d", int(state.step))
  start = int(state.step)
  batches = it
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    batches = iter(tqdm(it, desc="training", unit="step", total=cfg.train.steps, initial=start))
  preemption = checkpoint.Preemption()
  try:
    result = trainer.train_loop(t, state, batches, steps=cfg.train.steps, checkpointer=ckpt, data_iterator=it,
                                preemption=preemption)
  finally:
    preemption.close()
    if ckpt is not None:
      ckpt.close()
  if cfg.train.workdir and jax.process_index() == 0:
    with open(os.path.join(cfg.train.workdir, "metrics.jsonl"), "a") as f:
      for i, m in enumerate(result.history):
        f.write(json.dumps(dict(step=start + i + 1, **m)) + "\n")
  return result
