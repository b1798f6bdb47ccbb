"""Audio branch (clips -> LLM-space tokens) vs a PyTorch composition of the references:
ImageBind (reference code) + transformers' Blip2QFormerModel + position embedding + projection."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from test_imagebind_audio import SMALL_CONFIG, needs_reference, reference_embed, small_reference
from vllm_jax.converters import core
from vllm_jax.converters import video_llama_audio as conv
from vllm_jax.models.audio_branch import AudioBranch, AudioBranchConfig
from vllm_jax.models.qformer import QFormerConfig

QFORMER = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                        encoder_width=SMALL_CONFIG.out_dim, cross_attention_frequency=1, num_queries=8)
CONFIG = AudioBranchConfig(encoder=SMALL_CONFIG, qformer=QFORMER, llm_hidden_size=40)


def lavis_name(key):
  """transformers' Blip2QFormerModel key -> the LAVIS BERT key Video-LLaMA's checkpoints use."""
  key = re.sub(r"^layernorm\.", "bert.embeddings.LayerNorm.", key)
  key = re.sub(r"^encoder\.", "bert.encoder.", key)
  return re.sub(r"(attention|crossattention)\.attention\.", r"\1.self.", key)


class TorchAudioBranch(torch.nn.Module):
  """Video-LLaMA's encode_audioQformer, composed from the reference parts."""

  def __init__(self, seed=0):
    super().__init__()
    self.imagebind = small_reference(seed)
    torch.manual_seed(seed + 1)
    self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=QFORMER.hidden_size, num_hidden_layers=QFORMER.num_layers,
        num_attention_heads=QFORMER.num_heads, intermediate_size=QFORMER.intermediate_size,
        encoder_hidden_size=QFORMER.encoder_width, cross_attention_frequency=1,
        layer_norm_eps=QFORMER.layer_norm_eps)).eval()
    for p in self.qformer.parameters():
      torch.nn.init.normal_(p, std=0.2)
    self.query_tokens = torch.nn.Parameter(torch.randn(1, QFORMER.num_queries, QFORMER.hidden_size))
    self.position_embedding = torch.nn.Embedding(CONFIG.max_clips, QFORMER.encoder_width)
    self.llama_proj = torch.nn.Linear(QFORMER.hidden_size, CONFIG.llm_hidden_size)

  @torch.no_grad()
  def forward(self, clips):
    b, n = clips.shape[:2]
    x = reference_embed(self.imagebind, clips.flatten(0, 1)).reshape(b, n, -1)
    x = x + self.position_embedding(torch.arange(n))[None]
    q = self.qformer(query_embeds=self.query_tokens.expand(b, -1, -1), encoder_hidden_states=x,
                     encoder_attention_mask=torch.ones(b, n, dtype=torch.long)).last_hidden_state
    return self.llama_proj(q)

  def video_llama_state_dict(self):
    """The Video-LLaMA layout, with vision-branch and LLM keys that the converter must ignore."""
    state = {"audio_encoder." + k: v for k, v in self.imagebind.state_dict().items()}
    state.update({"audio_Qformer." + lavis_name(k): v for k, v in self.qformer.state_dict().items()})
    state.update({"audio_query_tokens": self.query_tokens.detach(),
                  "audio_position_embedding.weight": self.position_embedding.weight.detach(),
                  "audio_llama_proj.weight": self.llama_proj.weight.detach(),
                  "audio_llama_proj.bias": self.llama_proj.bias.detach(),
                  "video_query_tokens": torch.zeros(1, 4, 32), "llama_proj.weight": torch.zeros(40, 32),
                  "video_Qformer.bert.embeddings.LayerNorm.weight": torch.zeros(32)})
    return state


@needs_reference
def test_branch_matches_torch_composition():
  ref = TorchAudioBranch()
  clips = torch.randn(2, 8, 1, 128, 204)
  expected = ref(clips).numpy()
  params = conv.convert_branch(core.DictReader(ref.video_llama_state_dict()), CONFIG, with_encoder=True,
                               progress=False)
  ours = np.asarray(jax.jit(AudioBranch(CONFIG).apply)({"params": params}, jnp.asarray(clips.numpy())))
  rel = np.abs(ours - expected).max() / np.abs(expected).max()
  print(f"audio branch: max rel err {rel:.2e}")
  assert ours.shape == (2, 8, 40) and rel <= 1e-4
  # Sensitive to the clips' order (the position embedding), by far more than the tolerance.
  assert np.abs(ref(clips.flip(1)).numpy() - expected).max() / np.abs(expected).max() > 1e-2
  # Precomputed embeddings (Video-LLaMA can cache ImageBind's outputs) give the same tokens.
  with torch.no_grad():
    embeddings = reference_embed(ref.imagebind, clips.flatten(0, 1)).reshape(2, 8, -1).numpy()
  connected = AudioBranch(CONFIG).apply({"params": params}, jnp.asarray(embeddings), method="connect")
  np.testing.assert_allclose(connected, ours, rtol=1e-5, atol=1e-5)


def test_full_size_shapes():
  config = AudioBranchConfig()
  clips = jax.ShapeDtypeStruct((2, 8, 1, 128, 204), jnp.float32)
  abstract = jax.eval_shape(AudioBranch(config).init, jax.random.key(0), clips)
  out = jax.eval_shape(AudioBranch(config).apply, abstract, clips)
  assert out.shape == (2, 8, 4096)
  shapes = core.expected_source_shapes(conv.connector_rules(config), nn.meta.unbox(abstract["params"]))
  assert shapes["audio_query_tokens"] == (1, 8, 768)
  assert shapes["audio_position_embedding.weight"] == (8, 1024)
  assert shapes["audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] == (768, 1024)
  assert shapes["audio_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"] == (3072, 768)
  assert shapes["audio_llama_proj.weight"] == (4096, 768) and shapes["audio_llama_proj.bias"] == (4096,)
  assert not any(k.startswith("audio_Qformer.bert.encoder.layer.2") for k in shapes)


@pytest.fixture(scope="module")
def branch_params():
  """Random parameters of the small branch, drawn in numpy (compiling `init` is slow on CPU)."""
  clips = jax.ShapeDtypeStruct((1, 8, 1, 128, 204), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(AudioBranch(CONFIG).init, jax.random.key(0), clips))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)


def test_gradients_fewer_clips_and_a_sample_without_audio(branch_params):
  """The frozen encoder gets no gradient; fewer clips use the first position rows; an all-zero
  sample (no audio: `valid=False`) runs without NaNs (the caller drops its tokens)."""
  model = AudioBranch(CONFIG)
  clips = jax.random.normal(jax.random.key(1), (2, 3, 1, 128, 204)).at[0].set(0.0)

  def loss(params):
    out = model.apply({"params": params}, clips, train=True)
    return out.sum(), out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(branch_params)
  assert out.shape == (2, 8, 40) and bool(jnp.isfinite(out).all())
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["encoder"]))
  assert float(jnp.abs(grads["qformer"]["query_tokens"]).max()) > 0
  assert float(jnp.abs(grads["llama_proj"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["position_embedding"]["embedding"][:3]).max()) > 0
  assert float(jnp.abs(grads["position_embedding"]["embedding"][3:]).max()) == 0
  with pytest.raises(ValueError, match="position embedding"):
    model.apply({"params": branch_params}, jnp.zeros((1, 9, SMALL_CONFIG.out_dim)), method="connect")
