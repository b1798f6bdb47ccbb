"""Checkpoint files in every source layout (real key names, tiny sizes) -> the same outputs as
the PyTorch reference loaded from those files; export; named errors; full-size key shapes."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from test_video_branch import APPLY, TINY, TorchBranch, frames, rel_err
from transformers import Blip2QFormerModel, Blip2VisionModel

from vllm_jax.converters.core import CheckpointMismatchError, expected_source_shapes
from vllm_jax.converters.video_llama import (abstract_params, blip2_rules, eva_vit_rules, finetuned_rules,
                                             hf_blip2_rules, load_params, save_finetuned)
from vllm_jax.models.video_branch import VideoBranchConfig

EVA, BLIP2, FINETUNED = "eva_vit_g.pth", "blip2.pth", "finetuned.pth"


def bert_name(key: str) -> str:
  """transformers Q-Former key -> LAVIS BertModel key."""
  key = re.sub(r"^layernorm\.", "bert.embeddings.LayerNorm.", key)
  key = re.sub(r"^encoder\.", "bert.encoder.", key)
  return key.replace(".attention.attention.", ".attention.self.").replace(".crossattention.attention.",
                                                                           ".crossattention.self.")


def lavis_name(key: str) -> tuple[str, str]:
  """TorchBranch key -> (file, key) in the LAVIS / Video-LLaMA layout."""
  vit = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
         "embeddings.patch_embedding.": "patch_embed.proj.", "encoder.layers.": "blocks.",
         "self_attn.projection.": "attn.proj.", "self_attn.qkv.": "attn.qkv.", "layer_norm1.": "norm1.",
         "layer_norm2.": "norm2."}
  if key.startswith("vision_model.post_layernorm."):
    return BLIP2, key.replace("vision_model.post_layernorm.", "ln_vision.")
  if key.startswith("vision_model."):
    key = key[len("vision_model."):]
    for old, new in vit.items():
      key = key.replace(old, new)
    return EVA, key
  if key.startswith("qformer."):
    return BLIP2, "Qformer." + bert_name(key[len("qformer."):])
  if key == "query_tokens":
    return BLIP2, key
  if key.startswith("video_qformer."):
    return FINETUNED, "video_Qformer." + bert_name(key[len("video_qformer."):])
  return FINETUNED, key


def split_qkv_bias(key: str, bias: torch.Tensor) -> dict[str, torch.Tensor]:
  q, k, v = bias.chunk(3)
  assert not k.any()
  return {key.replace("qkv.bias", "q_bias"): q, key.replace("qkv.bias", "v_bias"): v}


def write_lavis(ref: TorchBranch, folder) -> None:
  files = {EVA: {}, BLIP2: {}, FINETUNED: {}}
  for key, value in ref.state_dict().items():
    file, name = lavis_name(key)
    files[file].update(split_qkv_bias(name, value) if name.endswith("qkv.bias") else {name: value.clone()})
  depth, e, hidden = TINY.vit.depth, TINY.qformer.hidden_size, TINY.qformer.intermediate_size
  # EVA-g's last block, which BLIP-2 drops.
  files[EVA].update({k.replace("blocks.0.", f"blocks.{depth}."): v.clone()
                     for k, v in files[EVA].items() if k.startswith("blocks.0.")})
  # The BLIP-2 text path and pre-training heads, unused by the query-only model.
  files[BLIP2].update({
      "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(30, e),
      "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(16, e),
      "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
      "Qformer.cls.predictions.bias": torch.randn(30), "vision_proj.weight": torch.randn(8, e),
      "text_proj.weight": torch.randn(8, e), "itm_head.weight": torch.randn(2, e), "temp": torch.tensor(0.07)})
  for i in range(TINY.qformer.num_layers):
    layer = f"Qformer.bert.encoder.layer.{i}."
    files[BLIP2].update({layer + "intermediate.dense.weight": torch.randn(hidden, e),
                         layer + "output.dense.weight": torch.randn(e, hidden),
                         layer + "output.LayerNorm.weight": torch.randn(e)})
  # Buffers and the audio branch, as an audio-visual Video-LLaMA checkpoint carries them.
  files[FINETUNED].update({
      "video_Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
      "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
      "audio_query_tokens": torch.randn(1, 8, e), "audio_position_embedding.weight": torch.randn(8, e),
      "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(4)})
  torch.save(files[EVA], folder / EVA)
  torch.save({"model": files[BLIP2]}, folder / BLIP2)
  torch.save({"model": files[FINETUNED], "optimizer": {}, "config": {}, "scaler": None, "epoch": 2},
             folder / FINETUNED)


def reference_from_lavis(folder) -> TorchBranch:
  """A TorchBranch whose weights are read back from the LAVIS / Video-LLaMA files."""
  files = {EVA: torch.load(folder / EVA), BLIP2: torch.load(folder / BLIP2)["model"],
           FINETUNED: torch.load(folder / FINETUNED)["model"]}
  ref = TorchBranch(TINY, seed=5)
  state = {}
  for key, value in ref.state_dict().items():
    file, name = lavis_name(key)
    if name.endswith("qkv.bias"):
      q, v = files[file][name.replace("qkv.bias", "q_bias")], files[file][name.replace("qkv.bias", "v_bias")]
      state[key] = torch.cat([q, torch.zeros_like(q), v])
    else:
      state[key] = files[file][name]
  ref.load_state_dict(state, strict=True)
  return ref


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("checkpoints")
  ref = TorchBranch(TINY, seed=1)
  write_lavis(ref, folder)
  (folder / "hf").mkdir()
  hf = {k: v.contiguous() for k, v in ref.state_dict().items()
        if k.split(".")[0] in ("vision_model", "qformer", "query_tokens")}
  hf.update({"language_projection.weight": torch.randn(16, 32),  # the language side is not ours
             "language_model.lm_head.weight": torch.randn(50, 16)})
  safetensors.torch.save_file(hf, folder / "hf" / "model.safetensors")
  return folder


def test_lavis_and_video_llama_files(folder):
  params = load_params(TINY, eva_vit=str(folder / EVA), blip2=str(folder / BLIP2),
                       finetuned=str(folder / FINETUNED), progress=False)
  x = frames(2, 3, seed=4)
  assert rel_err(APPLY({"params": params}, x), reference_from_lavis(folder)(x)) <= 1e-4


def test_transformers_blip2_folder(folder):
  params = load_params(TINY, hf_blip2=str(folder / "hf"), finetuned=str(folder / FINETUNED), progress=False)
  ref = TorchBranch(TINY, seed=6)
  state = safetensors.torch.load_file(folder / "hf" / "model.safetensors")
  finetuned = torch.load(folder / FINETUNED)["model"]
  ref.load_state_dict({k: state[k] if k in state else finetuned[lavis_name(k)[1]] for k in ref.state_dict()})
  x = frames(2, 3, seed=4)
  assert rel_err(APPLY({"params": params}, x), ref(x)) <= 1e-4


def test_blip2_file_carrying_the_vit(folder, tmp_path):
  """A LAVIS BLIP-2 file with `visual_encoder.*` gives the ViT itself; a second source is an error."""
  state = torch.load(folder / BLIP2)["model"]
  state.update({"visual_encoder." + k: v for k, v in torch.load(folder / EVA).items()})
  torch.save({"model": state}, tmp_path / "blip2_full.pth")
  params = load_params(TINY, blip2=str(tmp_path / "blip2_full.pth"), finetuned=str(folder / FINETUNED),
                       progress=False)
  separate = load_params(TINY, eva_vit=str(folder / EVA), blip2=str(folder / BLIP2),
                         finetuned=str(folder / FINETUNED), progress=False)
  jax.tree.map(np.testing.assert_array_equal, params, separate)
  with pytest.raises(ValueError, match="parameter visual_encoder/cls_token is given by both eva_vit and blip2"):
    load_params(TINY, eva_vit=str(folder / EVA), blip2=str(tmp_path / "blip2_full.pth"),
                finetuned=str(folder / FINETUNED), progress=False)


def test_export_trainable_parts_round_trips(folder, tmp_path):
  params = load_params(TINY, eva_vit=str(folder / EVA), blip2=str(folder / BLIP2),
                       finetuned=str(folder / FINETUNED), progress=False)
  save_finetuned(TINY, params, tmp_path / "out.pth")
  exported = torch.load(tmp_path / "out.pth")["model"]
  original = torch.load(folder / FINETUNED)["model"]
  trained = {k for k in original if not k.startswith("audio_") and "position_ids" not in k and "inv_freq" not in k}
  assert set(exported) == trained
  for key in trained:
    torch.testing.assert_close(exported[key], original[key], rtol=0, atol=0)


def test_mismatches_are_named(folder, tmp_path):
  state = torch.load(folder / FINETUNED)["model"]
  del state["llama_proj.bias"]
  state["video_query_tokens"] = torch.zeros(1, 5, 32)
  state["video_Qformer.bert.encoder.layer.0.crossattention.self.extra"] = torch.zeros(1)
  torch.save({"model": state}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointMismatchError) as err:
    load_params(TINY, eva_vit=str(folder / EVA), blip2=str(folder / BLIP2), finetuned=str(tmp_path / "bad.pth"),
                progress=False)
  message = str(err.value)
  assert "missing keys (1): llama_proj.bias" in message
  assert "unexpected keys (1): video_Qformer.bert.encoder.layer.0.crossattention.self.extra" in message
  assert "shape mismatch for video_query_tokens: checkpoint has [1, 5, 32], model expects [1, 4, 32]" in message
  with pytest.raises(ValueError, match=r"no checkpoint provides \d+ parameters: .*video_qformer/"):
    load_params(TINY, eva_vit=str(folder / EVA), blip2=str(folder / BLIP2), progress=False)


def full_size_lavis_shapes() -> dict[str, tuple[int, ...]]:
  """Every key (and shape) of Video-LLaMA's VL branch as the LAVIS / Video-LLaMA files hold it."""
  d, m, e, f = 1408, 6144, 768, 3072
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 257, d), "patch_embed.proj.weight": (d, 3, 14, 14),
            "patch_embed.proj.bias": (d,)}
  for i in range(39):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "norm2.weight": (d,),
                   b + "norm2.bias": (d,), b + "attn.qkv.weight": (3 * d, d), b + "attn.q_bias": (d,),
                   b + "attn.v_bias": (d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,), b + "mlp.fc2.weight": (d, m),
                   b + "mlp.fc2.bias": (d,)})

  def bert(prefix, layers, cross_every, memory):
    out = {prefix + "bert.embeddings.LayerNorm.weight": (e,), prefix + "bert.embeddings.LayerNorm.bias": (e,)}
    for i in range(layers):
      layer = f"{prefix}bert.encoder.layer.{i}."
      parts = {"attention": e, **({"crossattention": memory} if i % cross_every == 0 else {})}
      for part, width in parts.items():
        for n in ("query", "key", "value"):
          out[f"{layer}{part}.self.{n}.weight"] = (e, e if n == "query" else width)
          out[f"{layer}{part}.self.{n}.bias"] = (e,)
        out.update({f"{layer}{part}.output.dense.weight": (e, e), f"{layer}{part}.output.dense.bias": (e,),
                    f"{layer}{part}.output.LayerNorm.weight": (e,), f"{layer}{part}.output.LayerNorm.bias": (e,)})
      out.update({layer + "intermediate_query.dense.weight": (f, e), layer + "intermediate_query.dense.bias": (f,),
                  layer + "output_query.dense.weight": (e, f), layer + "output_query.dense.bias": (e,),
                  layer + "output_query.LayerNorm.weight": (e,), layer + "output_query.LayerNorm.bias": (e,)})
    return out

  blip2 = {"query_tokens": (1, 32, e), "ln_vision.weight": (d,), "ln_vision.bias": (d,),
           **bert("Qformer.", 12, 2, d)}
  finetuned = {"video_query_tokens": (1, 32, e), "video_frame_position_embedding.weight": (32, e),
               "llama_proj.weight": (4096, e), "llama_proj.bias": (4096,), **bert("video_Qformer.", 2, 1, e)}
  return {EVA: shapes, BLIP2: blip2, FINETUNED: finetuned}


def test_full_size_keys_and_shapes_without_allocating():
  config = VideoBranchConfig()
  abstract = nn.meta.unbox(abstract_params(config))  # jax.eval_shape: no weights are allocated
  reference = full_size_lavis_shapes()
  tables = {EVA: eva_vit_rules(config), BLIP2: blip2_rules(config), FINETUNED: finetuned_rules(config)}
  for file, rules in tables.items():
    assert expected_source_shapes(rules, abstract) == reference[file], file
  covered = {p for rules in tables.values() for r in rules for p in r.target_paths}
  paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract)}
  assert covered == paths
  # The transformers layout, against full-size Blip2 modules built on the meta device.
  with torch.device("meta"):
    vision = Blip2VisionModel(TorchBranch.vision_config(config.vit))
    qformer = Blip2QFormerModel(TorchBranch.qformer_config(config.qformer))
  hf = {f"vision_model.{k}": tuple(v.shape) for k, v in vision.state_dict().items()}
  hf.update({f"qformer.{k}": tuple(v.shape) for k, v in qformer.state_dict().items()})
  hf["query_tokens"] = (1, 32, 768)
  assert expected_source_shapes(hf_blip2_rules(config), abstract) == hf
