"""Audio checkpoints as files: `imagebind_huge.pth`-style and Video-LLaMA AL `.pth` layouts,
conversion both ways, ignored keys, and named errors for mismatches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_audio_branch import CONFIG
from vllm_jax.converters import core
from vllm_jax.converters import imagebind
from vllm_jax.converters import video_llama_audio as conv
from vllm_jax.models.audio_branch import AudioBranch


@pytest.fixture(scope="module")
def params():
  clips = jax.ShapeDtypeStruct((1, 8, 1, 128, 204), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(AudioBranch(CONFIG).init, jax.random.key(0), clips))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_al_pth_and_imagebind_pth_roundtrip(tmp_path, params):
  al = {k: torch.from_numpy(np.array(v)) for k, v in conv.export_connector(params, CONFIG)}
  assert al["audio_query_tokens"].shape == (1, 8, 32) and al["audio_llama_proj.weight"].shape == (40, 32)
  assert "audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight" in al
  al.update({"video_query_tokens": torch.zeros(1, 32, 32), "llama_proj.weight": torch.zeros(40, 32),
             "video_Qformer.bert.encoder.layer.0.attention.self.query.weight": torch.zeros(32, 32),
             "llama_model.model.embed_tokens.weight": torch.zeros(10, 40)})
  torch.save({"model": al, "optimizer": {}, "config": {}, "scaler": None, "epoch": 3}, tmp_path / "al.pth")
  ib = {k: torch.from_numpy(np.array(v)) for k, v in imagebind.export_audio_encoder(params["encoder"], CONFIG.encoder)}
  ib.update({"modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.zeros(3, 1),
             "modality_heads.text.proj.1.weight": torch.zeros(2, 2),
             "modality_postprocessors.imu.1.log_logit_scale": torch.zeros(())})
  torch.save(ib, tmp_path / "imagebind_huge.pth")
  loaded = conv.load_audio_branch(str(tmp_path / "al.pth"), str(tmp_path / "imagebind_huge.pth"), CONFIG,
                                  progress=False)
  assert_trees_equal(loaded, params)


def test_encoder_from_audio_encoder_keys(tmp_path, params):
  state = {k: torch.from_numpy(np.array(v)) for k, v in conv.export_connector(params, CONFIG)}
  state.update({"audio_encoder." + k: torch.from_numpy(np.array(v))
                for k, v in imagebind.export_audio_encoder(params["encoder"], CONFIG.encoder)})
  state["audio_encoder.modality_trunks.depth.blocks.0.norm_1.weight"] = torch.zeros(4)
  torch.save({"model": state}, tmp_path / "full.pth")
  assert_trees_equal(conv.load_audio_branch(str(tmp_path / "full.pth"), None, CONFIG, progress=False), params)


def test_connector_mismatches_are_named(params):
  state = dict(conv.export_connector(params, CONFIG))
  state.pop("audio_Qformer.bert.encoder.layer.0.crossattention.self.value.bias")
  state["audio_position_embedding.weight"] = np.zeros((16, CONFIG.encoder.out_dim), np.float32)
  state["audio_unknown.weight"] = np.zeros(2, np.float32)
  with pytest.raises(core.CheckpointMismatchError) as err:
    conv.convert_branch(core.DictReader(state), CONFIG, progress=False)
  msg = str(err.value)
  assert "crossattention.self.value.bias" in msg and "audio_unknown.weight" in msg
  assert "audio_position_embedding.weight: checkpoint has [16, 48], model expects [8, 48]" in msg


def test_imagebind_file_without_audio_keys_fails_clearly(tmp_path):
  torch.save({"modality_trunks.vision.blocks.0.norm_1.weight": torch.zeros(4)}, tmp_path / "vision_only.pth")
  with pytest.raises(core.CheckpointMismatchError, match="missing keys"):
    imagebind.load_audio_encoder(str(tmp_path / "vision_only.pth"), CONFIG.encoder, progress=False)
