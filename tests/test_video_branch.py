"""The whole vision-language branch against a PyTorch composition of transformers modules."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import trained_scale_init_
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from vllm_jax.configs.video_llama_vision import get_config
from vllm_jax.converters import blip2 as blip2_format
from vllm_jax.converters.core import DictReader, Rule, convert, dense
from vllm_jax.converters.video_llama import abstract_params, hf_blip2_rules
from vllm_jax.models.qformer import QFormerConfig
from vllm_jax.models.video_branch import VideoBranch, VideoBranchConfig
from vllm_jax.models.vit import ViTConfig
from vllm_jax.train.sharding import make_mesh, mesh_context, param_shardings, shard_params

# Tiny models: compile time dominates, so skip the backend's expensive LLVM passes.

TINY = VideoBranchConfig.from_dict(get_config("tiny").model.to_dict())
APPLY = jax.jit(VideoBranch(TINY).apply)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return np.abs(ours - ref).max() / np.abs(ref).max()


class TorchBranch(torch.nn.Module):
  """Video-LLaMA's VL branch from transformers modules. Its state dict is the transformers
  Blip2 layout (`vision_model`, `qformer`, `query_tokens`) plus the video part named as in
  Video-LLaMA (`video_qformer` in transformers' Q-Former names)."""

  def __init__(self, cfg: VideoBranchConfig, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    v, q, vq = cfg.vit, cfg.qformer, cfg.video_qformer
    self.cfg = cfg
    self.vision_model = Blip2VisionModel(self.vision_config(v))
    self.query_tokens = torch.nn.Parameter(torch.randn(1, q.num_queries, q.hidden_size))
    self.qformer = Blip2QFormerModel(self.qformer_config(q))
    self.video_frame_position_embedding = torch.nn.Embedding(cfg.max_frames, q.hidden_size)
    self.video_query_tokens = torch.nn.Parameter(torch.randn(1, vq.num_queries, vq.hidden_size))
    self.video_qformer = Blip2QFormerModel(self.qformer_config(vq))
    self.llama_proj = torch.nn.Linear(vq.hidden_size, cfg.llm_hidden_size)
    trained_scale_init_(self)  # off the defaults (zero biases, unit norms), yet no bias dominates
    with torch.no_grad():
      for name, p in self.named_parameters():
        if name.endswith("qkv.bias"):
          p[v.width:2 * v.width] = 0  # EVA has no key bias
    self.eval()

  @staticmethod
  def vision_config(v: ViTConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                             num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                             layer_norm_eps=v.layer_norm_eps)

  @staticmethod
  def qformer_config(q: QFormerConfig) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size, encoder_hidden_size=q.encoder_width,
        cross_attention_frequency=q.cross_attention_frequency, layer_norm_eps=q.layer_norm_eps)

  @torch.no_grad()
  def forward(self, frames: np.ndarray) -> np.ndarray:
    """frames: [B, T, H, W, 3] -> [B, Q_v, llm_hidden_size]."""
    b, t = frames.shape[:2]
    pixels = torch.from_numpy(frames).flatten(0, 1).permute(0, 3, 1, 2)
    h = self.vision_model.encoder(inputs_embeds=self.vision_model.embeddings(pixels)).last_hidden_state
    post = self.vision_model.post_layernorm  # plays ln_vision, with LAVIS's eps
    h = F.layer_norm(h, h.shape[-1:], post.weight, post.bias, eps=self.cfg.ln_vision_eps)
    q = self.qformer(query_embeds=self.query_tokens.expand(b * t, -1, -1), encoder_hidden_states=h).last_hidden_state
    q = q.unflatten(0, (b, t)) + self.video_frame_position_embedding.weight[:t][None, :, None, :]
    v = self.video_qformer(query_embeds=self.video_query_tokens.expand(b, -1, -1),
                           encoder_hidden_states=q.flatten(1, 2)).last_hidden_state
    return self.llama_proj(v).numpy()


def torch_branch_rules(cfg: VideoBranchConfig) -> list[Rule]:
  """TorchBranch state dict -> our params."""
  return hf_blip2_rules(cfg) + blip2_format.qformer_rules(
      cfg.video_qformer, "video_qformer.", "video_qformer/", blip2_format.TRANSFORMERS,
      query_tokens="video_query_tokens") + [
          Rule("video_frame_position_embedding.weight", "frame_position_embedding/embedding"),
          Rule("llama_proj.weight", "llama_proj/kernel", dense()),
          Rule("llama_proj.bias", "llama_proj/bias")]


@pytest.fixture(scope="module")
def reference():
  ref = TorchBranch(TINY)
  abstract = nn.meta.unbox(abstract_params(TINY))
  params = convert(DictReader(ref.state_dict()), torch_branch_rules(TINY), abstract, progress=False)
  return ref, params


def frames(batch, num_frames, seed=0, size=28):
  return np.random.default_rng(seed).normal(size=(batch, num_frames, size, size, 3)).astype(np.float32)


def test_branch_parity_with_torch_composition(reference):
  ref, params = reference
  x = frames(2, 3)
  ours = APPLY({"params": params}, x)
  assert ours.shape == (2, 4, 64)
  assert rel_err(ours, ref(x)) <= 1e-4


def test_image_is_a_one_frame_video(reference):
  ref, params = reference
  x = frames(2, 1, seed=1)
  assert rel_err(APPLY({"params": params}, x[:, 0]), ref(x)) <= 1e-4


def test_frame_mask_equals_fewer_frames(reference):
  ref, params = reference
  x = frames(2, 3, seed=2)
  masked = APPLY({"params": params}, x, np.array([[True, True, True], [True, True, False]]))
  assert rel_err(masked[:1], ref(x[:1])) <= 1e-4
  assert rel_err(masked[1:], ref(x[1:, :2])) <= 1e-4


def test_too_many_frames_names_the_limit_and_the_opt_in(reference):
  _, params = reference
  run = lambda cfg, x: jax.eval_shape(VideoBranch(cfg).apply, {"params": params}, x)
  with pytest.raises(ValueError, match="got 5 frames, but the frame position table has 4 entries"
                                       ".*interpolate_frames=True"):
    run(TINY, frames(1, 5))
  assert run(TINY.replace(interpolate_frames=True), frames(1, 7)).shape == (1, 4, 64)


def test_stretched_frame_table_keeps_its_ends():
  from vllm_jax.models.video_branch import stretch_frame_table
  table = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  out = stretch_frame_table(table, 7)  # rows 0, 0.5, 1, ..., 3 of the table
  np.testing.assert_allclose(out[::2], table, rtol=1e-6)
  np.testing.assert_allclose(out[1], (table[0] + table[1]) / 2, rtol=1e-6)


def test_config_round_trips_and_names_unknown_fields():
  assert VideoBranchConfig.from_dict(TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match="unknown VideoBranchConfig field.*: llm_hidden$"):
    VideoBranchConfig.from_dict({**TINY.to_dict(), "llm_hidden": 8})


def test_sharded_on_8_devices_equals_single_device(reference):
  _, params = reference
  x = frames(2, 3, seed=3)
  single = APPLY({"params": params}, x)
  mesh = make_mesh((1, 2, 4))  # batch over fsdp, heads and MLP over tensor
  sharded_params = shard_params(params, param_shardings(abstract_params(TINY), mesh))
  assert not sharded_params["visual_encoder"]["blocks"]["mlp"]["fc1"]["kernel"].sharding.is_fully_replicated
  with mesh_context(mesh):
    out = jax.jit(VideoBranch(TINY).apply)({"params": sharded_params}, x)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-5)


def test_reference_depends_on_frame_order_and_mask(reference):
  """The parity tests above catch a frame-order or mask bug only if these move the output by far
  more than their tolerance (they do not when a large llama_proj bias dominates it)."""
  ref, _ = reference
  x = frames(2, 3, seed=2)
  assert rel_err(ref(x[:, ::-1].copy()), ref(x)) > 1e-2
  assert rel_err(ref(x[1:]), ref(x[1:, :2])) > 1e-2
