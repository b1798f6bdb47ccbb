"""What a system is: the interface every command (chat, infer, train, demo, ...) is written against.

A `System` holds one loaded model (config, params, tokenizer) and turns media and text into
the LLM's inputs; generation then knows only the LLM (`vllm_jax.generate`):

  media  = system.load_media(path)              the file, preprocessed as the system's reference does
  conv   = system.conversation(media)           a chat in the system's template, opened by the media turn
  conv.ask(question)
  ids    = system.prompt_ids(conv.prompt(), media)  text ids with each placeholder expanded to its run
  tokens = system.encode_media([media, ...])    what a batch's media give (one row per item), once
  embeds = system.embed(ids [B, L], tokens, [conv, ...])  embeddings with the media tokens spliced in
  generate.generate(system.config.llama, system.params["llm"], inputs_embeds=embeds, ...)

`system.answer(media, conversations, ...)` runs those steps for a batch (what `infer`, `eval`
and `serve` call).

Training uses the class side, which needs no loaded model: `model`, `abstract_params`,
`init_inputs`, `loss_fn`, `dataset` (examples of the configured sources), `batch_spec` (the
global batch's shapes and dtypes, from the config alone: what `vllm-jax plan` compiles the step
for) and `prepare_init` (the config of a random init).
"""

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import numpy as np

from vllm_jax import pretrained
from vllm_jax.data import conversation as conv_lib
from vllm_jax.data import datasets, feature_cache
from vllm_jax.data.media import Media
from vllm_jax.data.tokenizer import load_tokenizer
from vllm_jax.models.llama import Llama, LlamaConfig
from vllm_jax.train import trainer


@functools.partial(jax.jit, static_argnames=("model", "method"))
def apply(model: nn.Module, method: str, params, *args):
  """`model.<method>(*args)` with `params`, compiled once per model, method and input shapes."""
  return model.apply({"params": params}, *args, method=method)


def llm_loss(config: LlamaConfig, params, embeds: jax.Array, batch: dict[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The system's LLM (`params["llm"]`) on input embeddings [B, T, E] -> the next-token loss of
  batch["labels"] (`trainer.next_token_loss`: summed, count), the vocabulary projected
  `config.loss_chunk` positions at a time."""
  llm, variables = Llama(config), {"params": params["llm"]}
  hidden, _ = llm.apply(variables, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                        method="hidden_states", rngs=trainer.dropout_rngs(rng))
  logits = lambda x: llm.apply(variables, x, method="logits")
  return trainer.next_token_loss(hidden, batch["labels"], logits, config.loss_chunk)


class System:
  """One loaded model of a system. Subclasses set the class attributes and the methods marked
  'per system'."""
  model_type: ClassVar[str]             # config.json's model_type
  config_class: ClassVar[type]          # the model config (a ConfigBase dataclass)
  module: ClassVar[type[nn.Module]]     # the Flax model, built from the config
  abstract_params: ClassVar[Callable]   # config -> the parameters as boxed ShapeDtypeStructs
  init_inputs: ClassVar[Callable]       # config -> model inputs (ShapeDtypeStructs) that create them all
  placeholder_tokens: ClassVar[tuple[str, ...]]  # the tokenizer's media placeholders...
  placeholder_fields: ClassVar[tuple[str, ...]]  # ...and the config fields holding their ids

  def __init__(self, config, params, tokenizer):
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.template = conv_lib.get_template(config.template)

  # --- model folders ------------------------------------------------------------------------

  @classmethod
  def load(cls, model_dir: str, mesh: jax.sharding.Mesh | None = None, **llama_overrides) -> "System":
    """The model saved in `model_dir` (restored into its shards with a mesh); `llama_overrides`
    change LLaMA config fields such as `dtype`."""
    config, params, tokenizer = pretrained.load(model_dir, cls.model_type, cls.config_class, cls.abstract_params,
                                                mesh, **llama_overrides)
    cls.check_tokenizer(config, tokenizer, model_dir)
    return cls(config, params, tokenizer)

  @classmethod
  def read_config(cls, model_dir: str):
    """The model config saved in `model_dir`, without its parameters."""
    return pretrained.read_config(model_dir, cls.model_type, cls.config_class)

  def save(self, out_dir: str) -> None:
    pretrained.save(out_dir, self.model_type, self.config, self.params, self.tokenizer)

  @classmethod
  def placeholder_ids(cls, config) -> tuple[int, ...]:
    return tuple(getattr(config, field) for field in cls.placeholder_fields)

  @classmethod
  def add_media_tokens(cls, tokenizer) -> tuple[int, ...]:
    """Add the placeholders as special tokens (no-op if present) -> their ids."""
    tokenizer.add_tokens(list(cls.placeholder_tokens), special_tokens=True)
    return tuple(tokenizer.convert_tokens_to_ids(list(cls.placeholder_tokens)))

  @classmethod
  def check_tokenizer(cls, config, tokenizer, where: str) -> None:
    ids = tuple(tokenizer.convert_tokens_to_ids(list(cls.placeholder_tokens)))
    if ids != cls.placeholder_ids(config):
      raise ValueError(f"the tokenizer in {where} maps {'/'.join(cls.placeholder_tokens)} to {list(ids)}, the "
                       f"model expects {list(cls.placeholder_ids(config))}")

  # --- inference (per system) ---------------------------------------------------------------

  @property
  def has_audio(self) -> bool:
    return False

  def load_media(self, path: str, use_audio: bool = False, num_frames: int | None = None,
                 bounds: tuple[float, float] | None = None, folder_fps: float | None = None) -> Media:
    """A video or image file (or, with `folder_fps`, a folder of frame images at that rate) -> Media,
    its frames only within `bounds` = (start, end) seconds when given. Raises FileNotFoundError or
    MediaError."""
    raise NotImplementedError

  def conversation(self, media: Media, use_audio: bool = False) -> conv_lib.Conversation:
    raise NotImplementedError

  def placeholders(self, media: Media) -> dict[str, tuple[int, int]]:
    """Placeholder text -> (token id, number of media tokens it stands for, for `media`)."""
    raise NotImplementedError

  def encode_media(self, media: Sequence[Media], use_audio: bool = False) -> Any:
    """The media of a batch (row b: media[b]) -> what `embed` splices in (tokens, or features
    that the question turns into tokens)."""
    raise NotImplementedError

  def embed(self, input_ids: np.ndarray, tokens: Any, conversations: Sequence[conv_lib.Conversation]) -> jax.Array:
    """ids [B, L] with placeholder runs -> embeddings [B, L, E] with the media tokens spliced in;
    `conversations` (one per row) give the questions, for a system whose tokens depend on them."""
    raise NotImplementedError

  # --- inference (shared) -------------------------------------------------------------------

  def prompt_ids(self, prompt: str, media: Media) -> list[int]:
    """An inference prompt about `media` -> ids: BOS, each text segment tokenized alone, placeholder runs."""
    return conv_lib.encode_text(self.tokenizer, [(prompt, False)], self.placeholders(media))[0]

  def answer(self, media: Sequence[Media], conversations: Sequence[conv_lib.Conversation], *,
             use_audio: bool = False, max_new_tokens: int = 64, sampling=None, seed: int | Sequence[int] = 0,
             rows: int | None = None, on_tokens: Callable[[np.ndarray], None] | None = None) -> list[str]:
    """The answers to a batch of conversations (each ending in a question about its media).

    `rows` pads the batch with copies of its first item to that many rows, so that every batch of
    a run compiles once; `on_tokens` receives each new chunk of token ids [rows, n] (streaming).
    `seed`: one for the batch, or one per conversation (a sampled answer then depends on its own).
    """
    from vllm_jax import generate
    from vllm_jax.data.tokenizer import left_pad
    media, conversations = list(media), list(conversations)
    fill = max(0, (rows or len(media)) - len(media))
    media, conversations = media + media[:1] * fill, conversations + conversations[:1] * fill
    if np.ndim(seed):
      seed = list(seed) + list(seed[:1]) * fill
    ids, mask = left_pad([self.prompt_ids(c.prompt(), m) for c, m in zip(conversations, media)], multiple=32)
    embeds = self.embed(ids, self.encode_media(media, use_audio=use_audio), conversations)
    result = generate.generate(
        self.config.llama, self.params["llm"], inputs_embeds=embeds, attention_mask=mask,
        max_new_tokens=max_new_tokens, sampling=sampling or generate.SamplingConfig(),
        stop_token_ids=self.stop_ids, stop_strings=self.template.stop_strings, tokenizer=self.tokenizer,
        seed=seed, on_tokens=on_tokens)
    return [self.clean_answer(text) for text in result.texts[:len(media) - fill]]

  @property
  def stop_ids(self) -> list[int]:
    eos = self.config.llama.eos_token_id
    eos = eos if isinstance(eos, tuple) else (eos,)
    return sorted({i for i in (self.tokenizer.eos_token_id, *eos) if isinstance(i, int)})

  def clean_answer(self, text: str) -> str:
    return conv_lib.clean_answer(self.template, text)

  # --- training (per system) ----------------------------------------------------------------

  @classmethod
  def model(cls, config) -> nn.Module:
    return cls.module(config)

  @classmethod
  def stage_config(cls, cfg, config):
    """The model a training stage of `cfg` builds from `config`: without what the stage neither
    feeds nor trains (its parameters are then not loaded, stored or sharded)."""
    return config

  @classmethod
  def loss_fn(cls, config) -> trainer.LossFn:
    """(params, batch, rng) -> (summed next-token loss, learned-token count) of a batch of examples."""
    raise NotImplementedError

  @classmethod
  def dataset(cls, cfg, config, tokenizer_dir: str):
    """The training examples (fixed shapes) of the sources in `cfg.data`: a grain MapDataset, or
    groups [(MapDataset, weight)] whose batches are each drawn from one group (`datasets.batches`)."""
    raise NotImplementedError

  @classmethod
  def batch_spec(cls, cfg, config) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `cfg.train.batch_size` examples as `dataset` builds them: every
    entry's [B, ...] shape and dtype, from the config alone (no data, no tokenizer)."""
    raise NotImplementedError

  @classmethod
  def prepare_init(cls, cfg, tokenizer) -> Any:
    """The model config of a random init from `cfg.model`, its placeholder ids taken from the
    tokenizer (whose placeholders this adds)."""
    config = cls.config_class.from_dict(cfg.model.to_dict())
    ids = cls.add_media_tokens(tokenizer)
    if len(tokenizer) - len(ids) > config.llama.vocab_size:
      raise ValueError(f"the tokenizer has {len(tokenizer) - len(ids)} text tokens, model.llama.vocab_size is "
                       f"{config.llama.vocab_size}: set --config.model.llama.vocab_size={len(tokenizer) - len(ids)} "
                       "(or more)")
    return config.replace(**dict(zip(cls.placeholder_fields, ids)))

  @classmethod
  @functools.lru_cache(maxsize=4)
  def training_tokenizer(cls, path: str):
    """The tokenizer in `path` with the placeholders, loaded once per process (example builders
    run in grain worker processes)."""
    tokenizer = load_tokenizer(path)
    cls.add_media_tokens(tokenizer)
    return tokenizer

  # --- feature cache (per system; see `vllm_jax.data.feature_cache`) ------------------------
  #
  # A system whose training keeps encoders frozen may have their outputs computed once. Its
  # example builders (`feature_sources`' decodes; picklable, grain workers run them) then also have
  #   decode.media_inputs(record) -> (inputs, facts): the record's media loaded exactly as
  #     training loads them: encoder inputs {unit name ("frame", "image", ...): units [n, ...]}
  #     (n per record) that `encode_features` maps one by one, and facts {name: array or scalar}
  #     the cache keeps as they are (timestamps, ...); raises when the media cannot be read, as
  #     the decode does.

  @classmethod
  def frozen_encoders(cls, cfg, config) -> tuple[str, ...]:
    """The '/'-joined parameter path prefixes of the frozen encoders whose outputs a feature cache
    holds for a run of `cfg` (empty: the system has no feature cache; ValueError saying why when
    this run has nothing to cache)."""
    del cfg, config
    return ()

  @classmethod
  def feature_sources(cls, cfg, config, tokenizer_dir: str) -> list[Any]:
    """The training sources a cache covers, as `dataset` reads them: objects with `name`, `records`
    (entry i of the cache is record i), `decode` (with `media_inputs`, above), `files` (the
    annotation files) and `media_dir` (`feature_cache.Source`)."""
    raise NotImplementedError

  @classmethod
  def feature_preprocessing(cls, cfg, config) -> dict[str, Any]:
    """What the media inputs depend on besides the files (frames, size, sampling, ...): JSON
    values a cache records and training compares."""
    raise NotImplementedError

  @classmethod
  def feature_shapes(cls, cfg, config) -> dict[str, tuple[tuple[int | None, ...], Any]]:
    """A cache entry's arrays -> (shape, dtype): "{input}_features" [n, ...] for each encoder
    input (n None: it varies by record) and the facts of fixed shape."""
    raise NotImplementedError

  @classmethod
  def encode_features(cls, config, params, name: str, units: jax.Array) -> jax.Array:
    """The frozen encoder of input `name` on units [N, ...] -> features [N, ...] (traced under
    jit; `params` holds only the `frozen_encoders`)."""
    raise NotImplementedError

  @classmethod
  def cached_decode(cls, cfg, config, decode, files: tuple[str, ...]) -> Callable[[dict], dict]:
    """record (with its `cache_index`) -> the example `decode` gives, its media replaced by the
    entry's features (read with `feature_cache.entry(files, record)`): what `batch_spec` gives
    with `data.feature_cache`."""
    raise NotImplementedError


def instruction_sources(system, cfg, config, tokenizer_dir: str) -> list[feature_cache.Source]:
  """The one training source of the LLaVA family (Video-LLaVA, LLaMA-VID): `data.instruct_json`
  (LLaVA JSON: captions, conversations, text-only chats; media under `data.instruct_dir`)."""
  data = cfg.data
  if not data.instruct_json:
    raise ValueError("no training data: set data.instruct_json (+ data.instruct_dir)")
  return [feature_cache.Source("instructions", datasets.llava_records(data.instruct_json, data.instruct_dir),
                               system.decoder(cfg, config, tokenizer_dir), (data.instruct_json,), data.instruct_dir)]


def instruction_groups(system, cfg, config, tokenizer_dir: str):
  """`instruction_sources` as up to three groups, images, videos and text-only records, each batch
  drawn from one (`datasets.by_media_kind`); from the feature cache when `data.feature_cache` is set."""
  sources = system.feature_sources(cfg, config, tokenizer_dir)
  if cfg.data.get("feature_cache"):
    sources = feature_cache.from_cache(cfg, system, config, sources)
  [source] = sources
  return datasets.by_media_kind(cfg.data, source.records, source.decode, cfg.seed)
