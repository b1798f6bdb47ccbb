"""The LLaMA-VID converter (`converters.llama_vid`) and `vllm-jax convert llama-vid`.

Proven here:
  1. a tiny random model written in the reference's layout (torch .bin shards + index, or
     safetensors) reads back bit-identical, with the same config;
  2. the CLI turns such a folder into a model folder that `systems.load` loads, with the LLaMA
     tokenizer (<image> added, its id in the config) and the BERT tokenizer ([DEC] added);
  3. missing, unexpected and mis-shaped keys are named; a folder without the vision tower needs
     eva_vit_g.pth (raw keys, one extra block), which then gives the tower; a stage-1 folder
     (mm_projector.bin) needs the base LLaMA folder;
  4. a position table stored for a smaller grid (eva_vit_g.pth's 224 px for a 336 px model) is
     resized as the reference's `interpolate_pos_embed` does (torch's bicubic);
  5. config.json fields of the released models map to the right config, and back;
  6. at full size (7B; 224 and 336 px), the keys and shapes the rules expect equal an independent
     listing: transformers' LlamaForCausalLM, InstructBlipQFormerModel (BERT with cross-attention,
     text and query FFNs) and Blip2VisionModel (EVA) built on the meta device, renamed to the
     reference's names, and torch Linears / LayerNorm for the rest.
"""

import json
import os
import re

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as T

from vllm_jax import cli, systems
from vllm_jax.converters import llama as llama_format
from vllm_jax.converters import llama_vid as conv
from vllm_jax.converters.core import (CheckpointMismatchError, DictReader, expected_source_shapes, export,
                                      write_safetensors)
from vllm_jax.data.tokenizer import train_tokenizer
from vllm_jax.models.llama import LlamaConfig
from vllm_jax.models.llama_vid import INSTRUCT_QFORMER, LlamaVidConfig, abstract_params
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.vit import EVA_VIT_G
from vllm_jax.systems.llama_vid import LlamaVidSystem

CORPUS = ["USER: What is moving in the video? ASSISTANT: A red circle moves left.",
          "A chat between a curious user and an artificial intelligence assistant."] * 20
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(" ".join(CORPUS).lower().replace(
    "?", " ").replace(".", " ").replace(":", " ").split())) + ["?", ".", ":"]


def tiny_config(llm_vocab: int) -> LlamaVidConfig:
  """28 px (a 2 x 2 grid), 2 EVA blocks, 3 Q-Former layers (cross-attention in 0 and 2)."""
  llama = LlamaConfig(vocab_size=llm_vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=256)
  return LlamaVidConfig(
      llama=llama, vit=EVA_VIT_G.replace(image_size=28, width=24, depth=2, num_heads=4, mlp_dim=48),
      qformer=QFormerConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, encoder_width=24,
                            num_queries=4, vocab_size=len(BERT_WORDS) + 1, max_position_embeddings=32),
      image_token_id=llm_vocab)


def random_params(config: LlamaVidConfig, seed: int = 0):
  """Every parameter drawn from N(0, 1) (norms and biases too: nothing hides a transposition)."""
  rng = np.random.default_rng(seed)
  abstract = nn.meta.unbox(abstract_params(config))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), abstract)


def assert_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(root, LLaMA tokenizer folder, config, params)."""
  root = tmp_path_factory.mktemp("llama_vid_converter")
  tokenizer = train_tokenizer(CORPUS, str(root / "llama_tokenizer"), vocab_size=300)
  config = tiny_config(len(tokenizer))
  return root, str(root / "llama_tokenizer"), config, random_params(config)


def write_folder(path, config, tensors: dict, tokenizer_dir: str | None = None) -> str:
  """A reference-style folder: config.json and one safetensors file of `tensors`."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(conv.config_to_hf(config), f)
  write_safetensors(list(tensors.items()), os.path.join(path, "model.safetensors"))
  if tokenizer_dir is not None:
    llama_format.copy_tokenizer(tokenizer_dir, str(path))
  return str(path)


def write_eva_vit(path, config, tensors: dict) -> str:
  """LAVIS' eva_vit_g.pth: the tower's raw keys, plus one more block than the model uses."""
  raw = {k[len(conv.VISION):]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith(conv.VISION)}
  extra = f"blocks.{config.vit.depth}."
  raw.update({k.replace("blocks.0.", extra): v.clone() for k, v in raw.items() if k.startswith("blocks.0.")})
  torch.save(raw, path)
  return str(path)


def write_bert_vocab(path, words) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(words) + "\n")
  return str(path)


# --- 1. round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("safetensors", [False, True])
def test_round_trip_is_bit_identical(tiny, tmp_path, safetensors):
  _, tokenizer_dir, config, params = tiny
  out = tmp_path / "llama_vid"
  conv.save_hf(config, params, str(out), safetensors=safetensors, tokenizer_dir=tokenizer_dir, max_shard_bytes=64 << 10)
  files = os.listdir(out)
  if safetensors:
    assert "model.safetensors.index.json" in files
  else:  # the reference's loader reads this index for the vlm_att weights
    with open(out / "pytorch_model.bin.index.json") as f:
      weight_map = json.load(f)["weight_map"]
    shards = sorted(n for n in files if n.endswith(".bin"))
    assert len(shards) > 1 and set(weight_map.values()) == set(shards)
    assert set(weight_map) == set(expected_source_shapes(conv.rules(config), nn.meta.unbox(abstract_params(config))))
    assert torch.load(out / shards[0], weights_only=True)  # plain torch state dicts
  assert "tokenizer.model" in files
  hf = json.loads((out / "config.json").read_text())
  assert (hf["bert_type"], hf["mm_projector_type"], hf["compress_type"], hf["num_query"]) == (
      "qformer_pretrain", "mlp2x_gelu", "mean", 4)
  assert hf["image_processor"].endswith("clip-patch14-28") and hf["mm_hidden_size"] == 24
  back_config, back = conv.load_hf(str(out), base=config, progress=False)
  assert back_config == config
  assert_identical(back, params)


def test_bfloat16_round_trip(tiny, tmp_path):
  _, _, config, params = tiny
  config = conv.with_param_dtype(config, "bfloat16")
  params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  conv.save_hf(config, params, str(tmp_path / "bf16"))
  back_config, back = conv.load_hf(str(tmp_path / "bf16"), base=config, param_dtype="bfloat16", progress=False)
  assert back_config == config
  assert_identical(back, params)


# --- 2. the CLI -----------------------------------------------------------------------------


def test_cli_writes_a_loadable_model_folder(tiny, tmp_path, monkeypatch):
  _, tokenizer_dir, config, params = tiny
  monkeypatch.setattr(conv, "BASE", config)  # the tiny sizes of the towers, which config.json does not name
  folder = str(tmp_path / "llama_vid")
  conv.save_hf(config, params, folder, tokenizer_dir=tokenizer_dir)
  bert = write_bert_vocab(tmp_path / "bert", BERT_WORDS)  # no [DEC], as bert-base-uncased
  out = str(tmp_path / "model")
  assert cli.main(["convert", "llama-vid", "--model-dir", folder, "--bert-tokenizer", bert, "--out", out]) == 0
  system = systems.load(out)
  assert isinstance(system, LlamaVidSystem)
  assert system.config.image_token_id == system.tokenizer.convert_tokens_to_ids("<image>") == config.llama.vocab_size
  assert system.config == config
  instruction = system.instruction_tokenizer
  assert len(instruction) == config.qformer.vocab_size and instruction.convert_tokens_to_ids("[DEC]") == len(BERT_WORDS)
  assert instruction("what is moving?").input_ids[1:-1] == [BERT_WORDS.index(w) for w in ("what", "is", "moving", "?")]
  assert_identical(jax.tree.map(np.asarray, system.params), params)


def test_cli_errors_are_one_line(tiny, tmp_path, monkeypatch, capsys):
  _, tokenizer_dir, config, params = tiny
  monkeypatch.setattr(conv, "BASE", config)
  tensors = dict(export(params, conv.rules(config)))
  folder = write_folder(tmp_path / "no_tower", config, {k: v for k, v in tensors.items()
                                                        if not k.startswith(conv.VISION)}, tokenizer_dir)
  bert = write_bert_vocab(tmp_path / "bert", BERT_WORDS)
  big_bert = write_bert_vocab(tmp_path / "big_bert", BERT_WORDS + ["extra", "words"])
  base = ["convert", "llama-vid", "--model-dir", folder, "--out", str(tmp_path / "out")]
  cases = [
      (["--bert-tokenizer", bert], f"error: {folder} holds no vision tower (model.vision_tower.vision_tower.*): the "
                                   "reference reads it from LAVIS' eva_vit_g.pth; give that file (--eva-vit)"),
      (["--bert-tokenizer", big_bert], f"the instruction tokenizer in {big_bert} has {len(BERT_WORDS) + 3} tokens, "
                                       f"the Q-Former's vocabulary {config.qformer.vocab_size}"),
      (["--bert-tokenizer", str(tmp_path)], f"error: no BERT tokenizer in {tmp_path} (expected vocab.txt"),
  ]
  for flags, message in cases:
    assert cli.main(base + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
  with pytest.raises(SystemExit):
    cli.main(base + ["--bert-tokenizer", bert, "--eva-vit", str(tmp_path / "missing.pth")])
  assert "argument --eva-vit: no such file" in capsys.readouterr().err
  eva = write_eva_vit(tmp_path / "eva_vit_g.pth", config, tensors)
  assert cli.main(base + ["--bert-tokenizer", bert, "--eva-vit", eva]) == 0
  assert_identical(jax.tree.map(np.asarray, systems.load(str(tmp_path / "out")).params), params)


# --- 3. named keys, separate sources ----------------------------------------------------------


def test_mismatches_are_named(tiny):
  _, _, config, params = tiny
  state = dict(export(params, conv.rules(config)))
  del state["model.vlm_att_key_projector.bias"]
  state["model.vlm_att_bert_proj.weight"] = np.zeros((24, 24), np.float32)
  layer = "model.vlm_att_encoder.bert.encoder.layer.1."
  state[layer + "output.dense.weight"] = np.zeros((16, 33), np.float32)
  del state[layer + "intermediate.dense.bias"]  # the text FFN is part of the model
  with pytest.raises(CheckpointMismatchError) as err:
    conv.convert_checkpoint(DictReader(state), config, progress=False)
  message = str(err.value)
  assert f"missing keys (2): {layer}intermediate.dense.bias, model.vlm_att_key_projector.bias" in message
  assert "unexpected keys (1): model.vlm_att_bert_proj.weight" in message
  assert f"shape mismatch for {layer}output.dense.weight: checkpoint has [16, 33], model expects [16, 32]" in message


def test_buffers_and_an_extra_eva_block_are_skipped(tiny):
  _, _, config, params = tiny
  state = dict(export(params, conv.rules(config)))
  state["model.vlm_att_encoder.bert.embeddings.position_ids"] = np.arange(32)[None]
  state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  state[conv.VISION + "blocks.2.norm1.weight"] = np.ones(24, np.float32)
  assert_identical(conv.convert_checkpoint(DictReader(state), config, progress=False), params)


def test_vision_tower_from_eva_vit(tiny, tmp_path):
  """Without tower keys the folder needs eva_vit_g.pth; given, the file is the tower even where
  the folder has one (the reference always reads the file)."""
  _, _, config, params = tiny
  tensors = dict(export(params, conv.rules(config)))
  no_tower = write_folder(tmp_path / "no_tower", config, {k: v for k, v in tensors.items()
                                                          if not k.startswith(conv.VISION)})
  with pytest.raises(ValueError, match=r"holds no vision tower .* give that file \(--eva-vit\)"):
    conv.load_hf(no_tower, base=config, progress=False)
  eva = write_eva_vit(tmp_path / "eva_vit_g.pth", config, tensors)
  assert_identical(conv.load_hf(no_tower, eva_vit=eva, base=config, progress=False)[1], params)
  other = random_params(config, seed=1)
  full = write_folder(tmp_path / "full", config, dict(export(other, conv.rules(config))))
  _, got = conv.load_hf(full, eva_vit=eva, base=config, progress=False)
  assert_identical(got["vision"], params["vision"])
  assert_identical({k: v for k, v in got.items() if k != "vision"}, {k: v for k, v in other.items() if k != "vision"})


def test_stage1_folder_on_a_base_llm(tiny, tmp_path, monkeypatch):
  """config.json + mm_projector.bin (the projectors and every vlm_att_* tensor), the LLaMA (and,
  through the CLI, the tokenizer) from its folder."""
  _, tokenizer_dir, config, params = tiny
  tensors = dict(export(params, conv.rules(config)))
  stage1 = tmp_path / "stage1"
  stage1.mkdir()
  (stage1 / "config.json").write_text(json.dumps(conv.config_to_hf(config)))
  torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()
              if k.startswith(("model.mm_projector.", "model.vlm_att_"))}, stage1 / "mm_projector.bin")
  base_llm = str(tmp_path / "vicuna")
  llama_format.save_hf(config.llama, params["llm"], base_llm, tokenizer_dir=tokenizer_dir)
  eva = write_eva_vit(tmp_path / "eva_vit_g.pth", config, tensors)
  with pytest.raises(ValueError, match=r"holds no LLaMA weights .* \(--base-llm\)"):
    conv.load_hf(str(stage1), eva_vit=eva, base=config, progress=False)
  _, got = conv.load_hf(str(stage1), eva_vit=eva, base_llm=base_llm, base=config, progress=False)
  assert_identical(got, params)
  monkeypatch.setattr(conv, "BASE", config)
  out = str(tmp_path / "model")
  assert cli.main(["convert", "llama-vid", "--model-dir", str(stage1), "--base-llm", base_llm, "--eva-vit", eva,
                   "--bert-tokenizer", write_bert_vocab(tmp_path / "bert", BERT_WORDS), "--out", out]) == 0
  system = systems.load(out)
  assert system.config == config and len(system.tokenizer) == config.llama.vocab_size + 1
  assert_identical(jax.tree.map(np.asarray, system.params), params)
  full = write_folder(tmp_path / "full", config, tensors)
  with pytest.raises(ValueError, match=f"model.embed_tokens.weight is given by both {full} and {base_llm}"):
    conv.load_hf(full, base_llm=base_llm, base=config, progress=False)


# --- 4. the position table of a larger input --------------------------------------------------


def test_position_table_is_resized_as_the_reference_does(tiny, tmp_path):
  """A 42 px model (3 x 3 grid, as 336 px is to EVA's 224) from a table stored for 28 px (2 x 2):
  torch's bicubic interpolation of the patch positions, CLS kept; saved at 3 x 3 and read back as is."""
  _, _, config, params = tiny
  tensors = dict(export(params, conv.rules(config)))
  hf = {**conv.config_to_hf(config), "image_processor": "./llamavid/processor/clip-patch14-42"}
  big = conv.config_from_hf(hf, base=config)
  assert (big.vit.image_size, big.vit.grid) == (42, 3)
  folder = write_folder(tmp_path / "no_tower", big, {k: v for k, v in tensors.items() if not k.startswith(conv.VISION)})
  eva = write_eva_vit(tmp_path / "eva_vit_g.pth", config, tensors)
  _, got = conv.load_hf(folder, eva_vit=eva, base=config, progress=False)
  stored = torch.from_numpy(tensors[conv.VISION + "pos_embed"])                      # [1, 1 + 2*2, D]
  grid = stored[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
  want = torch.cat([stored[:, :1], resized.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)[0].numpy()
  assert got["vision"]["pos_embed"].shape == (10, 24)
  np.testing.assert_allclose(got["vision"]["pos_embed"], want, rtol=1e-5, atol=1e-6)
  rest = lambda p: {**p, "vision": {k: v for k, v in p["vision"].items() if k != "pos_embed"}}
  assert_identical(rest(got), rest(params))
  conv.save_hf(big, got, str(tmp_path / "saved"))
  back_config, back = conv.load_hf(str(tmp_path / "saved"), base=config, progress=False)
  assert back_config == big
  assert_identical(back, got)


# --- 5. configs -------------------------------------------------------------------------------

VICUNA_7B_V15 = {"architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava", "hidden_act": "silu",
                 "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
                 "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 32000, "max_position_embeddings": 4096,
                 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "rope_scaling": None,
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
VIDEO_7B = {**VICUNA_7B_V15, "mm_vision_tower": "./model_zoo/LAVIS/eva_vit_g.pth",
            "image_processor": "./llamavid/processor/clip-patch14-224", "mm_hidden_size": 1408,
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
            "bert_type": "qformer_pretrain", "num_query": 32, "compress_type": "mean", "max_token": 2048}


@pytest.mark.parametrize("changes, size, content_grid, tokens_per_frame, context", [
    ({}, 224, 0, 2, 2048),                                                    # video, 1 fps
    ({"compress_type": "grid:2"}, 224, 2, 5, 2048),                           # 2 x 2 content tokens
    ({"image_processor": "./llamavid/processor/clip-patch14-336/", "compress_type": None, "max_token": 4096},
     336, 24, 577, 4096),                                                     # image only, 336 px: every patch
    ({"bert_type": "qformer_pretrain_freeze_all", "max_token": 65536,
      "rope_scaling": {"type": "linear", "factor": 16.0}}, 224, 0, 2, 65536),  # long video
])
def test_released_configs(changes, size, content_grid, tokens_per_frame, context):
  config = conv.config_from_hf({**VIDEO_7B, **changes})
  assert config.vit == EVA_VIT_G.replace(image_size=size) and config.qformer == INSTRUCT_QFORMER
  assert (config.content_grid, config.tokens_per_frame) == (content_grid, tokens_per_frame)
  assert config.llama == llama_format.config_from_hf(VIDEO_7B).replace(
      max_position_embeddings=context, rope=config.llama.rope)
  assert config.llama.rope.factor == (16.0 if changes.get("rope_scaling") else 1.0)
  assert config.llama.rope.type == ("linear" if changes.get("rope_scaling") else "default")
  assert conv.config_from_hf(conv.config_to_hf(config)) == config


@pytest.mark.parametrize("changes, message", [
    ({"mm_projector_type": "linear"}, "unsupported mm_projector_type 'linear'"),
    ({"bert_type": "raw_bert_layer:2"}, "unsupported bert_type 'raw_bert_layer:2'"),
    ({"bert_type": None}, "unsupported bert_type None"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size 1024: only the EVA ViT-g tower (width 1408)"),
    ({"mm_vision_select_feature": "cls_patch"}, "unsupported mm_vision_select_feature 'cls_patch'"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end is not supported"),
    ({"compress_type": "grid:1"}, "unsupported compress_type 'grid:1'"),
    ({"compress_type": "pool"}, "unsupported compress_type 'pool'"),
    ({"compress_type": "grid:20"}, "content_grid 20 must lie in 0..16"),
    ({"image_processor": "./model_zoo/OpenAI/clip-vit-large"}, "cannot tell the input size"),
])
def test_unsupported_configs_are_named(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    conv.config_from_hf({**VIDEO_7B, **changes})


# --- 6. full-size keys and shapes ------------------------------------------------------------


def reference_shapes(image_size: int) -> dict[str, tuple[int, ...]]:
  """Every key of a 7B LLaMA-VID folder with its tower, from PyTorch modules on the meta device."""
  with torch.device("meta"):
    llm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32))
    bert = T.InstructBlipQFormerModel(T.InstructBlipQFormerConfig(vocab_size=30523, encoder_hidden_size=1408,
                                                                  max_position_embeddings=512))
    eva = T.Blip2VisionModel(T.Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                                 num_attention_heads=16, image_size=image_size, patch_size=14))
    parts = {"mm_projector": torch.nn.Sequential(torch.nn.Linear(1408, 4096), torch.nn.GELU(),
                                                 torch.nn.Linear(4096, 4096)),
             "vlm_att_projector": torch.nn.Linear(768, 1408), "vlm_att_key_projector": torch.nn.Linear(1408, 1408),
             "vlm_att_val_projector": torch.nn.Linear(1408, 4096), "vlm_att_ln": torch.nn.LayerNorm(1408)}
  shapes = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
  shapes.update({f"model.{name}.{k}": tuple(v.shape) for name, part in parts.items()
                 for k, v in part.state_dict().items()})
  shapes["model.vlm_att_query"] = (1, 32, 768)
  lavis_bert = [("embeddings.layernorm.", "embeddings.LayerNorm."), ("embeddings.", "bert.embeddings."),
                ("encoder.", "bert.encoder."), (".attention.attention.", ".attention.self."),
                (".crossattention.attention.", ".crossattention.self.")]
  for key, value in bert.state_dict().items():
    for old, new in lavis_bert:
      key = key.replace(old, new, 1)
    shapes["model.vlm_att_encoder." + key] = tuple(value.shape)
  lavis_eva = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
               ("embeddings.patch_embedding.", "patch_embed.proj."), ("encoder.layers.", "blocks."),
               ("self_attn.projection.", "attn.proj."), ("self_attn.qkv.", "attn.qkv."), ("layer_norm1.", "norm1."),
               ("layer_norm2.", "norm2.")]
  for key, value in eva.state_dict().items():
    if key.startswith("post_layernorm."):  # LLaMA-VID's EVA has no final norm
      continue
    for old, new in lavis_eva:
      key = key.replace(old, new)
    if key.endswith("attn.qkv.bias"):  # LAVIS keeps the q and v biases apart (k has none)
      for name in ("q_bias", "v_bias"):
        shapes[conv.VISION + key.replace("qkv.bias", name)] = (value.shape[0] // 3,)
    else:
      shapes[conv.VISION + key] = tuple(value.shape)
  return shapes


@pytest.mark.parametrize("image_size", [224, 336])
def test_7b_keys_and_shapes_match_reference_modules(image_size):
  config = conv.config_from_hf({**VIDEO_7B, "image_processor": f"./llamavid/processor/clip-patch14-{image_size}"})
  abstract = nn.meta.unbox(abstract_params(config))
  rules = conv.rules(config)
  ours = expected_source_shapes(rules, abstract)
  theirs = reference_shapes(image_size)
  assert not set(theirs) - set(ours) and not set(ours) - set(theirs)
  assert ours == theirs
  assert ours[conv.VISION + "pos_embed"] == (1, 1 + (image_size // 14) ** 2, 1408)
  targets = [p for r in rules for p in r.target_paths]
  leaves = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract)}
  assert len(targets) == len(set(targets)) and set(targets) == leaves  # every parameter from exactly one key
  assert sum(np.prod(s) for s in ours.values()) > 7.7e9  # LLaMA 6.7B + EVA-g 1B + Q-Former + heads
