"""Video-LLaMA audio-language checkpoints <-> the Flax audio branch.

The AL finetuned `.pth` (`{'model', 'optimizer', 'config', 'scaler', 'epoch'}`) holds the
trainable parts:
  audio_query_tokens [1, 8, 768]; audio_position_embedding.weight [8, 1024]
  audio_Qformer.bert.{embeddings.LayerNorm, encoder.layer.{i}.(attention|crossattention).*,
                      .intermediate_query.dense, .output_query.*}  (LAVIS BERT layout)
  audio_llama_proj.{weight [4096, 768], bias}
The frozen ImageBind encoder comes from `imagebind_huge.pth` (or from `audio_encoder.*` keys,
when a checkpoint carries them). Vision-branch and LLM keys are ignored by pattern.
"""

from typing import Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vllm_jax.converters import imagebind
from vllm_jax.converters.blip2 import LAVIS, qformer_rules
from vllm_jax.converters.core import IDENTITY, Rule, convert, dense, export, open_checkpoint
from vllm_jax.models.audio_branch import AudioBranch, AudioBranchConfig

# Everything that is not the audio branch, and the parts of the audio Q-Former that Video-LLaMA
# keeps but never runs (its text path).
IGNORED = (
    r"(?!audio_).*",
    r"audio_Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"audio_Qformer\.bert\.embeddings\.position_ids",
    r"audio_Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",
    r"audio_Qformer\.cls\..*",
)


def connector_rules(config: AudioBranchConfig) -> list[Rule]:
  """The trainable parts: position embedding, audio Q-Former and its queries, projection."""
  return [
      Rule("audio_position_embedding.weight", "position_embedding/embedding"),
      *qformer_rules(config.qformer, "audio_Qformer.", "qformer/", layout=LAVIS,
                     query_tokens="audio_query_tokens"),
      Rule("audio_llama_proj.weight", "llama_proj/kernel", dense()),
      Rule("audio_llama_proj.bias", "llama_proj/bias", IDENTITY),
  ]


def encoder_rules(config: AudioBranchConfig, prefix: str = "audio_encoder.") -> list[Rule]:
  """ImageBind's audio keys (under `prefix`) -> encoder/..."""
  return [Rule(r.source, tuple("encoder/" + t for t in r.target_paths), r.transform)
          for r in imagebind.rules(config.encoder, prefix)]


def abstract_params(config: AudioBranchConfig):
  """The branch's parameters as ShapeDtypeStructs, boxed with their logical axis names."""
  enc = config.encoder
  clips = jax.ShapeDtypeStruct((1, config.max_clips, 1, enc.num_mel_bins, enc.num_frames), jnp.float32)
  return jax.eval_shape(AudioBranch(config).init, jax.random.key(0), clips)["params"]


def convert_branch(reader, config: AudioBranchConfig, *, with_encoder: bool = False,
                   progress: bool = True) -> dict:
  """A reader over a Video-LLaMA state dict -> the branch's params (numpy); the encoder too when
  `with_encoder` (from its `audio_encoder.*` keys), else without `encoder`."""
  abstract = nn.meta.unbox(abstract_params(config))
  rules = connector_rules(config) + (encoder_rules(config) if with_encoder else [])
  if with_encoder:
    encoder_ignored = tuple(r"audio_encoder\." + p for p in imagebind.OTHER_MODALITIES)
  else:
    encoder_ignored = (r"audio_encoder\..*",)
  return convert(reader, rules, abstract, ignore=IGNORED + encoder_ignored, desc="video-llama audio",
                 progress=progress)


def load_audio_branch(al_checkpoint: str, imagebind_checkpoint: str | None,
                      config: AudioBranchConfig = AudioBranchConfig(), *, progress: bool = True) -> dict:
  """The AL finetuned `.pth` + `imagebind_huge.pth` -> the branch's params (numpy). Without
  `imagebind_checkpoint` the encoder is read from the first file's `audio_encoder.*` keys."""
  reader = open_checkpoint(al_checkpoint, subkey="model")
  params = convert_branch(reader, config, with_encoder=imagebind_checkpoint is None, progress=progress)
  if imagebind_checkpoint is not None:
    params["encoder"] = imagebind.load_audio_encoder(imagebind_checkpoint, config.encoder, progress=progress)
  return params


def export_connector(params: Mapping, config: AudioBranchConfig) -> Iterator[tuple[str, np.ndarray]]:
  """The trainable params -> (Video-LLaMA key, array in its layout), for an AL `.pth`."""
  return export(params, connector_rules(config))
