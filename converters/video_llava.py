"""Video-LLaVA checkpoints <-> (VideoLlavaConfig, Flax params), in two layouts.

transformers (`VideoLlavaForConditionalGeneration`, e.g. `LanguageBind/Video-LLaVA-7B-hf`): a folder
with `config.json` and safetensors shards. Its tensor names moved between transformers versions;
`load_hf` reads each of these layouts (`LAYOUTS`, told apart by their keys):
  hub:            image_tower.vision_model.*, video_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*,
                  language_model.model.*, language_model.lm_head.weight (the published -hf files;
                  `save_hf` writes this one, which transformers 4.41+ and 5 load)
  transformers4:  model.image_tower.vision_model.*, model.video_tower.vision_model.*,
                  model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  transformers5:  model.image_tower.*, model.video_tower.*, model.multi_modal_projector.*,
                  model.language_model.*, lm_head.weight (a transformers 5 model's state_dict)
  saved5:         image_tower.*, video_tower.*, multi_modal_projector.*, language_model.model.*,
                  language_model.lm_head.weight (what transformers 5's save_pretrained writes)
The towers are CLIP ViT-L/14 (`converters.clip`); the video tower has no temporal attention.

original (PKU-YuanGroup Video-LLaVA, `LanguageBind/Video-LLaVA-7B`): LLaVA's layout, with
model.image_tower.image_tower.* (LanguageBind image tower = CLIP), model.video_tower.video_tower.*
(LanguageBind video tower: CLIP plus, per layer, temporal_embedding, temporal_layer_norm1,
temporal_attn.*), model.mm_projector.{0,2}.* (Linear, GELU, Linear), and the LLaMA keys
model.embed_tokens, model.layers.*, model.norm, lm_head.

The model keeps the tower layers up to the feature layer (-2): the checkpoints' later layers,
`post_layernorm` and `position_ids` buffers are skipped on load and absent on save (transformers
then initialises them itself; they do not change the outputs).
"""

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn

from vllm_jax import paths
from vllm_jax.converters import clip as clip_format
from vllm_jax.converters import llama as llama_format
from vllm_jax.converters.core import (IDENTITY, Params, Rule, TensorReader, convert, dense, export,
                                      open_checkpoint, write_safetensors_shards)
from vllm_jax.models.video_llava import VideoLlavaConfig, abstract_params
from vllm_jax.models.vit import CLIP_VIT_L

# Defaults of transformers' LlamaConfig / CLIPVisionConfig for fields a config.json may omit
# (transformers 4 wrote sub-configs as differences from these).
HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2)
HF_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# VideoLlavaConfig's vision tower when config.json has no `vision_config` at all.
HF_VISION_DEFAULTS = dict(HF_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, patch_size=14)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each part's keys start: towers (CLIP keys follow), projector (then `fc1`/`fc2` names),
  the LLaMA decoder (instead of LLaMA's `model.`) and its head (instead of `lm_head.`)."""
  name: str
  image_tower: str
  video_tower: str
  projector: str
  fc1: str
  fc2: str
  llm: str
  lm_head: str


HUB = Layout("hub", "image_tower.vision_model.", "video_tower.vision_model.", "multi_modal_projector.",
             "linear_1", "linear_2", "language_model.model.", "language_model.lm_head.")
TRANSFORMERS4 = Layout("transformers4", "model.image_tower.vision_model.", "model.video_tower.vision_model.",
                       "model.multi_modal_projector.", "linear_1", "linear_2", "model.language_model.", "lm_head.")
TRANSFORMERS5 = Layout("transformers5", "model.image_tower.", "model.video_tower.", "model.multi_modal_projector.",
                       "linear_1", "linear_2", "model.language_model.", "lm_head.")
SAVED5 = Layout("saved5", "image_tower.", "video_tower.", "multi_modal_projector.", "linear_1", "linear_2",
                "language_model.model.", "language_model.lm_head.")
LAYOUTS = {layout.name: layout for layout in (HUB, TRANSFORMERS4, TRANSFORMERS5, SAVED5)}
ORIGINAL = Layout("original", "model.image_tower.image_tower.", "model.video_tower.video_tower.",
                  "model.mm_projector.", "0", "2", "model.", "lm_head.")


# ---------------------------------------------------------------------------------------------
# Rules.


def prefixed(rules: Iterable[Rule], target_prefix: str = "", sources: Mapping[str, str] | None = None) -> list[Rule]:
  """`rules` with `target_prefix` before every Flax path and each source key's leading
  `old` prefix replaced by `sources[old]` (the first that matches)."""
  out = []
  for rule in rules:
    source = rule.source
    for old, new in (sources or {}).items():
      if source.startswith(old):
        source = new + source[len(old):]
        break
    targets = tuple(target_prefix + t for t in rule.target_paths)
    out.append(dataclasses.replace(rule, source=source, targets=targets[0] if len(targets) == 1 else targets))
  return out


def rules(config: VideoLlavaConfig, layout: Layout = HUB) -> list[Rule]:
  """Every parameter of the model, with its source key in `layout`."""
  p = layout.projector
  table = prefixed(clip_format.vision_rules(config.image_tower, layout.image_tower), "image_tower/")
  table += prefixed(clip_format.vision_rules(config.video_tower, layout.video_tower), "video_tower/")
  table += [Rule(f"{p}{layout.fc1}.weight", "projector/fc1/kernel", dense()),
            Rule(f"{p}{layout.fc1}.bias", "projector/fc1/bias", IDENTITY),
            Rule(f"{p}{layout.fc2}.weight", "projector/fc2/kernel", dense()),
            Rule(f"{p}{layout.fc2}.bias", "projector/fc2/bias", IDENTITY)]
  return table + prefixed(llama_format.rules(config.llama), "llm/",
                          {"model.": layout.llm, "lm_head.": layout.lm_head})


def unused(config: VideoLlavaConfig, layout: Layout, keys: Iterable[str] = ()) -> list[str]:
  """Ignore regexes for checkpoint keys the model does not hold: tower layers past the feature
  layer (as many as `keys` have), post_layernorms, position_ids, rotary tables, a tied head."""
  keys = list(keys)
  patterns = list(llama_format.IGNORED)
  for prefix, tower in ((layout.image_tower, config.image_tower), (layout.video_tower, config.video_tower)):
    patterns += clip_format.clip_unused(prefix, max(tower.depth, _num_layers(keys, prefix)), tower)
  if config.llama.tie_word_embeddings:
    patterns.append(re.escape(layout.lm_head) + ".*")
  return patterns


def detect_layout(keys: Iterable[str]) -> Layout:
  """The transformers layout whose names the keys use (HUB when none fits: the mismatch is then
  reported key by key)."""
  keys = set(keys)
  for layout in LAYOUTS.values():
    if (layout.image_tower + "embeddings.class_embedding" in keys
        and layout.llm + "embed_tokens.weight" in keys):
      return layout
  return HUB


def _num_layers(keys: Sequence[str], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  return max((int(m.group(1)) + 1 for k in keys if (m := pattern.match(k))), default=0)


# ---------------------------------------------------------------------------------------------
# Configs.


def config_from_hf(hf: Mapping[str, Any], **overrides) -> VideoLlavaConfig:
  """VideoLlavaConfig from a transformers `config.json` dict (missing fields take transformers'
  defaults). The towers keep num_hidden_layers + 1 + vision_feature_layer layers."""
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"vision_feature_layer {layer!r}: only one feature layer is supported")
  for key, want in (("vision_feature_select_strategy", "default"), ("projector_hidden_act", "gelu"),
                    ("multimodal_projector_bias", True)):
    if hf.get(key, want) != want:
      raise ValueError(f"unsupported {key} {hf[key]!r} (Video-LLaVA uses {want!r})")
  vision = {**(HF_CLIP_DEFAULTS if "vision_config" in hf else HF_VISION_DEFAULTS), **(hf.get("vision_config") or {})}
  if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise ValueError(f"unsupported vision tower {vision['model_type']!r} (expected clip_vision_model)")
  depth = layer if layer >= 0 else vision["num_hidden_layers"] + 1 + layer
  tower = CLIP_VIT_L.replace(image_size=vision["image_size"], patch_size=vision["patch_size"],
                             width=vision["hidden_size"], depth=depth, num_heads=vision["num_attention_heads"],
                             mlp_dim=vision["intermediate_size"], layer_norm_eps=vision["layer_norm_eps"],
                             activation=vision["hidden_act"])
  text = {**HF_LLAMA_DEFAULTS, **(hf.get("text_config") or {})}
  if text.get("model_type", "llama") != "llama":
    raise ValueError(f"unsupported language model {text['model_type']!r} (expected llama)")
  text["tie_word_embeddings"] = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
  llama = llama_format.config_from_hf(text)
  fields = dict(llama=llama, image_tower=tower, video_tower=tower,
                image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
                video_token_id=hf.get("video_token_index", hf.get("video_token_id", 32001)))
  if "video_seq_length" in hf:
    fields["num_frames"] = hf["video_seq_length"] // (tower.grid ** 2 + 1)
  fields.update(overrides)
  return VideoLlavaConfig(**fields)


def config_to_hf(config: VideoLlavaConfig) -> dict[str, Any]:
  """The transformers `config.json` dict of a model with plain CLIP towers (the -hf model)."""
  tower = config.image_tower
  if config.video_tower != tower:
    raise ValueError("transformers' VideoLlava has one vision config for both towers, and no temporal "
                     f"attention: image_tower {tower} != video_tower {config.video_tower}")
  clip = CLIP_VIT_L.replace(**{f: getattr(tower, f) for f in (
      "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "layer_norm_eps", "activation",
      "dtype", "param_dtype", "remat_policy", "pos_embed_init_std")})
  if tower != clip:
    raise ValueError(f"the tower is not a CLIP tower (qkv biases, no patch bias, pre-norm, no final norm): {tower}")
  text = llama_format.config_to_hf(config.llama)
  return {
      "architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava",
      "image_token_index": config.image_token_id, "video_token_index": config.video_token_id,
      "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
      "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
      "image_seq_length": config.num_image_tokens, "video_seq_length": config.num_video_tokens,
      "tie_word_embeddings": config.llama.tie_word_embeddings, "torch_dtype": config.llama.param_dtype,
      "text_config": text,
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": tower.width, "intermediate_size": tower.mlp_dim,
          "num_hidden_layers": tower.depth + 1, "num_attention_heads": tower.num_heads,
          "image_size": tower.image_size, "patch_size": tower.patch_size, "num_channels": 3,
          "hidden_act": tower.activation, "layer_norm_eps": tower.layer_norm_eps,
      },
  }


def original_config_dict(config: VideoLlavaConfig) -> dict[str, Any]:
  """A `config.json` in the original Video-LLaVA (LlavaLlamaForCausalLM) style."""
  return {
      **llama_format.config_to_hf(config.llama),
      "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
      "mm_image_tower": "LanguageBind/LanguageBind_Image", "mm_video_tower": "LanguageBind/LanguageBind_Video_merge",
      "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": config.image_tower.width,
      "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
      "mm_use_im_patch_token": False, "use_mm_proj": True, "image_aspect_ratio": "pad",
      "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
  }


def with_param_dtype(config: VideoLlavaConfig, param_dtype: str) -> VideoLlavaConfig:
  return config.replace(llama=config.llama.replace(param_dtype=param_dtype),
                        image_tower=config.image_tower.replace(param_dtype=param_dtype),
                        video_tower=config.video_tower.replace(param_dtype=param_dtype))


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def convert_checkpoint(reader: TensorReader, config: VideoLlavaConfig, layout: Layout | None = None, *,
                       progress: bool = True) -> Params:
  """Tensors of `reader` (a transformers layout, detected when None, or ORIGINAL) -> params (numpy).
  Every key is checked first: missing, unexpected and mis-shaped ones are named together."""
  keys = reader.keys()
  layout = detect_layout(keys) if layout is None else layout
  abstract = nn.meta.unbox(abstract_params(config))
  return convert(reader, rules(config, layout), abstract, ignore=unused(config, layout, keys),
                 desc=f"video-llava ({layout.name})", progress=progress)


def load_hf(hf_dir: str, *, param_dtype: str | None = None, progress: bool = True,
            **overrides) -> tuple[VideoLlavaConfig, Params]:
  """A transformers Video-LLaVA folder -> (config, params as numpy arrays), one tensor at a time."""
  config = config_from_hf(paths.read_json(paths.join(hf_dir, "config.json")), **overrides)
  if param_dtype is not None:
    config = with_param_dtype(config, param_dtype)
  return config, convert_checkpoint(open_checkpoint(hf_dir, subkey=None), config, progress=progress)


def save_hf(config: VideoLlavaConfig, params: Mapping, out_dir: str, *, dtype=None, layout: Layout = HUB,
            tokenizer_dir: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Write a folder (`config.json`, safetensors shards, tokenizer files) that
  `VideoLlavaForConditionalGeneration.from_pretrained` loads."""
  with paths.local_output(out_dir) as local:  # shards are renamed into place once all are written
    paths.write_json(paths.join(local, "config.json"), config_to_hf(config))
    write_safetensors_shards(export(params, rules(config, layout), dtype=dtype), local, max_shard_bytes)
  if tokenizer_dir is not None:
    llama_format.copy_tokenizer(tokenizer_dir, out_dir)


def load_original(path: str, config: VideoLlavaConfig, *, progress: bool = True) -> Params:
  """An original Video-LLaVA checkpoint (folder of .bin/.safetensors shards, or one file) -> params."""
  return convert_checkpoint(open_checkpoint(path, subkey=None), config, ORIGINAL, progress=progress)


def save_original(config: VideoLlavaConfig, params: Mapping, out_dir: str, *, dtype=None,
                  max_shard_bytes: int = 4 << 30) -> None:
  """Write the original Video-LLaVA layout: `config.json` and safetensors shards."""
  with paths.local_output(out_dir) as local:
    paths.write_json(paths.join(local, "config.json"), original_config_dict(config))
    write_safetensors_shards(export(params, rules(config, ORIGINAL), dtype=dtype), local, max_shard_bytes)
