"""ImageBind checkpoints (`imagebind_huge.pth`) <-> the Flax audio encoder.

The audio encoder is spread over four module dicts of the checkpoint, each keyed by modality:
  modality_preprocessors.audio.{rgbt_stem.proj.weight, rgbt_stem.norm_layer.*, cls_token,
                                pos_embedding_helper.pos_embed}
  modality_trunks.audio.blocks.{i}.{norm_1, attn.{in_proj_weight [3W, W], in_proj_bias, bias_k,
                                    bias_v, out_proj}, norm_2, mlp.{fc1, fc2}}
  modality_heads.audio.{0 (LayerNorm), 2 (Linear, no bias)}
  modality_postprocessors.audio.1.log_logit_scale
The other modalities' keys are ignored by pattern. Video-LLaMA stores the same keys under
`audio_encoder.` (pass `prefix`).
"""

from typing import Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.converters.core import (CONV, IDENTITY, Rule, bias_as, convert, dense, export,
                                      open_checkpoint, split)
from vllm_jax.converters.blip2 import norm_rules
from vllm_jax.models.imagebind_audio import ImageBindAudio, ImageBindAudioConfig

OTHER_MODALITIES = (
    r"modality_(preprocessors|trunks|heads|postprocessors)\.(vision|text|depth|thermal|imu)\..*",)


def rules(config: ImageBindAudioConfig, prefix: str = "") -> list[Rule]:
  pre, block = prefix + "modality_preprocessors.audio.", prefix + "modality_trunks.audio.blocks.{i}."
  token = (1, 1, config.width)
  table = [
      Rule(pre + "rgbt_stem.proj.weight", "stem/kernel", CONV),
      *norm_rules(pre + "rgbt_stem.norm_layer", "stem_norm"),
      Rule(pre + "cls_token", "cls_token", bias_as(token)),
      Rule(pre + "pos_embedding_helper.pos_embed", "pos_embed", bias_as((1, 1 + config.num_patches, config.width))),
      *norm_rules(block + "norm_1", "blocks/norm_1"),
      Rule(block + "attn.in_proj_weight", tuple(f"blocks/attn/{n}/kernel" for n in ("query", "key", "value")),
           split(3, dense())),
      Rule(block + "attn.in_proj_bias", tuple(f"blocks/attn/{n}/bias" for n in ("query", "key", "value")),
           split(3, bias_as())),
      Rule(block + "attn.bias_k", "blocks/attn/bias_k", bias_as(token)),
      Rule(block + "attn.bias_v", "blocks/attn/bias_v", bias_as(token)),
      Rule(block + "attn.out_proj.weight", "blocks/attn/out/kernel", dense(in_dims=2)),
      Rule(block + "attn.out_proj.bias", "blocks/attn/out/bias", IDENTITY),
      *norm_rules(block + "norm_2", "blocks/norm_2"),
      *[Rule(block + f"mlp.{fc}.{kind}", f"blocks/mlp/{fc}/{name}", transform)
        for fc in ("fc1", "fc2")
        for kind, name, transform in (("weight", "kernel", dense()), ("bias", "bias", IDENTITY))],
      *norm_rules(prefix + "modality_heads.audio.0", "head_norm"),
      Rule(prefix + "modality_heads.audio.2.weight", "head/kernel", dense()),
      Rule(prefix + "modality_postprocessors.audio.1.log_logit_scale", "log_logit_scale"),
  ]
  return table


def abstract_params(config: ImageBindAudioConfig):
  """The encoder's parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  clips = jax.ShapeDtypeStruct((1, 1, config.num_mel_bins, config.num_frames), jnp.float32)
  return jax.eval_shape(ImageBindAudio(config).init, jax.random.key(0), clips)["params"]


def convert_audio_encoder(reader, config: ImageBindAudioConfig = ImageBindAudioConfig(), *,
                          prefix: str = "", ignore=(), progress: bool = True) -> dict:
  """A tensor reader over an ImageBind state dict -> the encoder's params (numpy)."""
  others = tuple(prefix.replace(".", r"\.") + p for p in OTHER_MODALITIES)
  return convert(reader, rules(config, prefix), nn.meta.unbox(abstract_params(config)),
                 ignore=others + tuple(ignore), desc="imagebind audio", progress=progress)


def load_audio_encoder(path: str, config: ImageBindAudioConfig = ImageBindAudioConfig(), *,
                       progress: bool = True) -> dict:
  """`imagebind_huge.pth` (a plain state dict) -> the audio encoder's params."""
  return convert_audio_encoder(open_checkpoint(path, subkey=None), config, progress=progress)


def export_audio_encoder(params: Mapping, config: ImageBindAudioConfig = ImageBindAudioConfig(),
                         prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
  """Flax params -> (ImageBind key, array in its layout), one at a time."""
  return export(params, rules(config, prefix))
