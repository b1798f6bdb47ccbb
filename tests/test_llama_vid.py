"""LLaMA-VID against PyTorch (random weights, fp32, tiny sizes).

Proven here:
  1. the text-guided Q-Former equals transformers' InstructBlipQFormerModel on a right-padded
     batch of instructions, and more padding changes nothing;
  2. `LlamaVid.frame_tokens` equals a PyTorch transcription of LLaMA-VID's token maker (written
     here from the paper and the reference code) with the mean and with a 2 x 2 content grid, and
     on long videos' features, which come without CLS;
  3. the whole model (EVA ViT as transformers' Blip2VisionModel, its last block without the
     post-layernorm; the Q-Former; the token maker; LlamaForCausalLM on the spliced embeddings)
     gives the reference's logits for a 3-frame video, and greedy decoding the same tokens;
  4. a (2, 2, 2) mesh gives the single device's frame tokens and logits.
The reference's weights reach ours through the converters' rules, so their names are tested too.
"""

import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from vllm_jax import generate as gen
from vllm_jax.configs import llama_vid as recipes
from vllm_jax.converters import blip2 as blip2_format
from vllm_jax.converters import eva_vit as eva_vit_format
from vllm_jax.converters import llama as llama_format
from vllm_jax.converters.core import DictReader, Rule, convert, dense
from vllm_jax.converters.video_llava import prefixed
from vllm_jax.data.tokenizer import train_wordpiece_tokenizer
from vllm_jax.models.llama_vid import LlamaVid, LlamaVidConfig, abstract_params
from vllm_jax.models.qformer import QFormer, QFormerConfig
from vllm_jax.models.vit import ViTConfig
from vllm_jax.systems.llama_vid import LlamaVidSystem
from vllm_jax.train import optim, sharding
from vllm_jax.train import run as run_lib

VIT = ViTConfig(image_size=56, patch_size=14, width=48, depth=2, num_heads=4, mlp_dim=96)  # a 4 x 4 grid
QUERIES = 8
LLM_VOCAB = 128
IMAGE_ID = LLM_VOCAB  # outside the LLM's vocabulary, as the reference's placeholder (-200) is
FRAMES = 3
INSTRUCTIONS = ["Describe the video in detail.", "Where does the red car go after it turns left?",
                "How many people are in the room?", "What is the man doing?"]


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


class TorchLlamaVid(torch.nn.Module):
  """LLaMA-VID from transformers modules, its parts named as the reference names them."""

  def __init__(self, qformer_vocab: int, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    width, llm = VIT.width, self.llm_config()
    self.vision_model = T.Blip2VisionModel(T.Blip2VisionConfig(
        hidden_size=width, intermediate_size=VIT.mlp_dim, num_hidden_layers=VIT.depth,
        num_attention_heads=VIT.num_heads, image_size=VIT.image_size, patch_size=VIT.patch_size,
        layer_norm_eps=VIT.layer_norm_eps))
    self.vlm_att_ln = torch.nn.LayerNorm(width)
    self.vlm_att_query = torch.nn.Parameter(torch.zeros(1, QUERIES, 32))
    self.vlm_att_encoder = T.InstructBlipQFormerModel(T.InstructBlipQFormerConfig(
        vocab_size=qformer_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=2,
        encoder_hidden_size=width, pad_token_id=0))
    self.vlm_att_projector = torch.nn.Linear(32, width)
    self.vlm_att_key_projector = torch.nn.Linear(width, width)
    self.vlm_att_val_projector = torch.nn.Linear(width, llm.hidden_size)
    self.mm_projector = torch.nn.Sequential(torch.nn.Linear(width, llm.hidden_size), torch.nn.GELU(),
                                            torch.nn.Linear(llm.hidden_size, llm.hidden_size))
    self.llm = T.LlamaForCausalLM(llm)
    with torch.no_grad():  # the default init leaves biases at zero and norms at one: test them too
      for name, p in self.named_parameters():
        torch.nn.init.normal_(p, std=0.2)
        if name.endswith("qkv.bias"):
          p[width:2 * width] = 0  # EVA has no key bias
    self.eval()

  @staticmethod
  def llm_config() -> T.LlamaConfig:
    return T.LlamaConfig(vocab_size=LLM_VOCAB, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)

  @torch.no_grad()
  def features(self, frames: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] -> the last block's output [N, 1+G*G, D]: `hidden_states[-1]`, which (unlike
    `last_hidden_state`) has no post-layernorm."""
    pixels = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
    return self.vision_model(pixels, output_hidden_states=True).hidden_states[-1]

  @torch.no_grad()
  def qformer_queries(self, memory, text_ids: np.ndarray, text_mask: np.ndarray) -> torch.Tensor:
    """The query outputs [N, Q, 32]; the attention mask spans [queries + instruction]."""
    memory = torch.as_tensor(memory)
    n = memory.shape[0]
    mask = torch.cat([torch.ones(n, QUERIES, dtype=torch.long), torch.from_numpy(text_mask).long()], dim=1)
    out = self.vlm_att_encoder(input_ids=torch.from_numpy(text_ids).long(), attention_mask=mask,
                               query_embeds=self.vlm_att_query.expand(n, -1, -1), encoder_hidden_states=memory)
    return out.last_hidden_state[:, :QUERIES]

  @torch.no_grad()
  def frame_tokens(self, features, text_ids: np.ndarray, text_mask: np.ndarray, content_grid: int) -> torch.Tensor:
    """LLaMA-VID's token maker: [N, 1+G*G, D] features -> [N, 1 + content tokens, E]; content_grid
    0 is the mean, k a k x k average-pooled grid."""
    f = torch.as_tensor(features)
    n, d = f.shape[0], f.shape[-1]
    text_q = self.vlm_att_projector(self.qformer_queries(self.vlm_att_ln(f), text_ids, text_mask))
    vis = f[:, 1:] if f.shape[1] % 2 else f  # CLS dropped (an odd count); long videos' features have none
    attention = (text_q @ self.vlm_att_key_projector(vis).transpose(1, 2) / d ** 0.5).softmax(-1)
    context = self.vlm_att_val_projector((attention @ vis).mean(1))[:, None]  # values are the raw features
    if content_grid:
      g = int(round(vis.shape[1] ** 0.5))
      stride = g // content_grid
      grid = vis.transpose(1, 2).reshape(n, d, g, g)
      pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)
    else:
      pooled = vis.mean(1, keepdim=True)
    return torch.cat([context, self.mm_projector(pooled)], dim=1)

  @torch.no_grad()
  def video_embeds(self, before: list[int], frames: np.ndarray, instruction: tuple, after: list[int],
                   content_grid: int) -> torch.Tensor:
    """[1, L, E]: the embedded text around one video's tokens (frame 0 first), each frame's
    context token read with the same instruction (ids, mask [1, L_t])."""
    features = self.features(frames)
    ids, mask = (np.repeat(x, len(frames), axis=0) for x in instruction)
    tokens = self.frame_tokens(features, ids, mask, content_grid).flatten(0, 1)
    embed = lambda ids: self.llm.get_input_embeddings()(torch.tensor(ids))
    return torch.cat([embed(before), tokens, embed(after)])[None]


def torch_rules(config: LlamaVidConfig) -> list[Rule]:
  """TorchLlamaVid's state dict -> our params."""
  table = eva_vit_format.vit_rules(config.vit, eva_vit_format.TRANSFORMERS, "vision_model.", "vision/")
  table += blip2_format.norm_rules("vlm_att_ln", "att_norm")
  table += blip2_format.qformer_rules(config.qformer, "vlm_att_encoder.", "qformer/", blip2_format.INSTRUCTBLIP,
                                      query_tokens="vlm_att_query")
  for source, target in (("vlm_att_projector", "att_projector"), ("vlm_att_key_projector", "key_projector"),
                         ("vlm_att_val_projector", "val_projector"), ("mm_projector.0", "projector/fc1"),
                         ("mm_projector.2", "projector/fc2")):
    table += [Rule(f"{source}.weight", f"{target}/kernel", dense()), Rule(f"{source}.bias", f"{target}/bias")]
  return table + prefixed(llama_format.rules(config.llama), "llm/",
                          {"model.": "llm.model.", "lm_head.": "llm.lm_head."})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A real BERT WordPiece tokenizer (its vocabulary odd-sized, as bert-base-uncased + [DEC] is),
  the reference, our config (a 2 x 2 content grid) and params converted from the reference."""
  tokenizer = train_wordpiece_tokenizer(INSTRUCTIONS * 5, str(tmp_path_factory.mktemp("bert")), vocab_size=200)
  assert len(tokenizer) % 2  # as 30,523 is: no even mesh axis divides the Q-Former's word table
  ref = TorchLlamaVid(len(tokenizer))
  qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, encoder_width=VIT.width,
                          cross_attention_frequency=2, num_queries=QUERIES, vocab_size=len(tokenizer),
                          max_position_embeddings=64)
  llama = llama_format.config_from_hf(ref.llm.config.to_dict())
  config = LlamaVidConfig(llama=llama, vit=VIT, qformer=qformer, content_grid=2, image_token_id=IMAGE_ID)
  params = convert(DictReader(ref.state_dict()), torch_rules(config), nn.meta.unbox(abstract_params(config)),
                   ignore=(r"vision_model\.post_layernorm\..*",), progress=False)  # LLaMA-VID reads the last block
  return types.SimpleNamespace(tokenizer=tokenizer, ref=ref, config=config, params=params)


def instructions(tokenizer, texts, pad_to=None):
  """Right-padded BERT ids and mask [N, L] (numpy int32)."""
  out = tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="np")
  return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def frame_tokens_fn(config: LlamaVidConfig):
  return jax.jit(lambda p, f, i, m: LlamaVid(config).apply({"params": p}, f, i, m, method="frame_tokens"))


def prompt(rng) -> tuple[list[int], list[int]]:
  """BOS and random text before the placeholder run, random text after it."""
  return [1] + rng.integers(3, LLM_VOCAB, 5).tolist(), rng.integers(3, LLM_VOCAB, 7).tolist()


def test_text_guided_qformer_matches_instructblip(setup):
  s = setup
  ids, mask = instructions(s.tokenizer, INSTRUCTIONS[:2])
  assert mask[0].sum() < mask[1].sum()  # one row is padded
  memory = np.random.default_rng(0).normal(size=(2, 1 + VIT.grid ** 2, VIT.width)).astype(np.float32)
  apply = jax.jit(QFormer(s.config.qformer).apply)
  qformer = {"params": s.params["qformer"]}
  ours = np.asarray(apply(qformer, memory, text_ids=ids, text_mask=mask))
  assert ours.shape == (2, QUERIES, 32)
  err = rel_err(ours, s.ref.qformer_queries(memory, ids, mask))
  print(f"llama-vid q-former vs InstructBlipQFormerModel: max rel err {err:.2e}")
  assert err <= 1e-5
  more_ids, more_mask = instructions(s.tokenizer, INSTRUCTIONS[:2], pad_to=ids.shape[1] + 5)
  padded = apply(qformer, memory, text_ids=more_ids, text_mask=more_mask)
  np.testing.assert_allclose(padded, ours, rtol=1e-6, atol=1e-6)
  # The mask is what hides the padding: without it the short row changes.
  unmasked = np.asarray(apply(qformer, memory, text_ids=ids, text_mask=np.ones_like(mask)))
  assert np.abs(unmasked[0] - ours[0]).max() > 1e-3


@pytest.mark.parametrize("grid,cls", [(0, 1), (2, 1), (0, 0)], ids=["mean", "grid2", "long_video"])
def test_frame_tokens_match_torch_transcription(setup, grid, cls):
  """Also on a long video's features, which come without CLS: the Q-Former then reads G*G tokens."""
  s = setup
  features = np.random.default_rng(1).normal(size=(FRAMES, cls + VIT.grid ** 2, VIT.width)).astype(np.float32)
  ids, mask = instructions(s.tokenizer, INSTRUCTIONS[:FRAMES])  # one instruction a frame, padded
  ours = frame_tokens_fn(s.config.replace(content_grid=grid))(s.params, features, ids, mask)
  assert ours.shape == (FRAMES, {0: 2, 2: 5}[grid], 40)  # the context token, then the content
  err = rel_err(ours, s.ref.frame_tokens(features, ids, mask, grid))
  print(f"llama-vid frame tokens ({grid=}, {cls=}): max rel err {err:.2e}")
  assert err <= 1e-5


def test_logits_and_greedy_generation_match_torch(setup):
  s = setup
  rng = np.random.default_rng(2)
  frames = rng.normal(size=(1, FRAMES, VIT.image_size, VIT.image_size, 3)).astype(np.float32)
  text_ids, text_mask = instructions(s.tokenizer, INSTRUCTIONS[1:2])
  before, after = prompt(rng)
  ids = np.asarray([before + [IMAGE_ID] * FRAMES * s.config.tokens_per_frame + after])
  embeds = s.ref.video_embeds(before, frames[0], (text_ids, text_mask), after, s.config.content_grid)
  assert embeds.shape[1] == ids.shape[1]

  model = LlamaVid(s.config)
  ours = jax.jit(model.apply)({"params": s.params}, ids, frames, text_ids, text_mask)[0]
  with torch.no_grad():
    want = s.ref.llm(inputs_embeds=embeds).logits.numpy()
  err = rel_err(ours, want)
  print(f"llama-vid logits: max rel err {err:.2e}")
  assert err <= 1e-4

  features = model.apply({"params": s.params}, frames[0], method="encode_frames")
  per_frame = (np.repeat(x, FRAMES, axis=0) for x in (text_ids, text_mask))
  tokens = frame_tokens_fn(s.config)(s.params, features, *per_frame)
  our_embeds = model.apply({"params": s.params}, ids, tokens.reshape(1, -1, tokens.shape[-1]), method="embed")
  out = gen.generate(s.config.llama, s.params["llm"], inputs_embeds=our_embeds, max_new_tokens=8)
  with torch.no_grad():
    ref = s.ref.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
  assert ref.shape == (1, 8)
  np.testing.assert_array_equal(out.tokens, ref)


def test_sharded_mesh_matches_single_device(setup):
  """A (2, 2, 2) mesh (data, fsdp, tensor) against one device: two videos of 2 frames with their
  own instructions."""
  s = setup
  rng = np.random.default_rng(3)
  frames = rng.normal(size=(2, 2, VIT.image_size, VIT.image_size, 3)).astype(np.float32)
  text_ids, text_mask = instructions(s.tokenizer, INSTRUCTIONS[2:4])
  features = rng.normal(size=(4, 1 + VIT.grid ** 2, VIT.width)).astype(np.float32)
  frame_ids, frame_mask = instructions(s.tokenizer, INSTRUCTIONS)
  run = [IMAGE_ID] * 2 * s.config.tokens_per_frame
  ids = np.asarray([before + run + after for before, after in (prompt(rng) for _ in range(2))])
  forward = jax.jit(LlamaVid(s.config).apply)
  tokens_fn = frame_tokens_fn(s.config)
  out = {}
  for name, mesh in (("single", sharding.make_mesh((1, 1, 1), jax.devices()[:1])),
                     ("sharded", sharding.make_mesh((2, 2, 2)))):
    params = sharding.shard_params(s.params, sharding.param_shardings(abstract_params(s.config), mesh))
    with sharding.mesh_context(mesh):
      out[name] = (tokens_fn(params, features, frame_ids, frame_mask),
                   forward({"params": params}, ids, frames, text_ids, text_mask)[0])
  for what, sharded, single in zip(("frame tokens", "logits"), out["sharded"], out["single"]):
    err = rel_err(sharded, single)
    print(f"llama-vid sharded {what}: max rel err {err:.2e}")
    assert err <= 1e-5


def remat_batch(tokenizer, tokens_per_frame: int) -> dict:
  """Two videos of 3 and 2 frames (zeros after), two turns each: BOS, text and a placeholder run
  per turn, the text learned; right-padded to one length."""
  rng = np.random.default_rng(4)
  num_frames = np.asarray([FRAMES, 2], np.int32)
  rows = [sum(([1] + rng.integers(3, LLM_VOCAB, 4).tolist() + [IMAGE_ID] * n * tokens_per_frame
               for _ in range(2)), []) + rng.integers(3, LLM_VOCAB, 6).tolist() for n in num_frames]
  length = max(map(len, rows))
  ids = np.asarray([r + [0] * (length - len(r)) for r in rows], np.int32)
  mask = np.asarray([[1] * len(r) + [0] * (length - len(r)) for r in rows], np.int32)
  pixels = rng.normal(size=(2, FRAMES, VIT.image_size, VIT.image_size, 3)).astype(np.float32)
  pixels[1, 2:] = 0
  text_ids, text_mask = instructions(tokenizer, INSTRUCTIONS, pad_to=16)
  return dict(pixels=pixels, num_frames=num_frames, instruction_ids=text_ids.reshape(2, 2, -1),
              instruction_mask=text_mask.reshape(2, 2, -1), input_ids=ids, attention_mask=mask,
              labels=np.where((ids == IMAGE_ID) | (mask == 0), -100, ids).astype(np.int32))


def test_context_remat_keeps_loss_and_gradients(setup):
  """Rematerialising the text-guided part (each turn's pass and each Q-Former layer), with the
  frames passing 2 at a time (3 = 2 + a remainder), changes neither the training loss nor any
  parameter's gradient (fp32)."""
  s = setup
  batch = remat_batch(s.tokenizer, s.config.tokens_per_frame)
  remat = s.config.replace(context_remat_policy="nothing_saveable", chunk_frames=2,
                           qformer=s.config.qformer.replace(remat_policy="nothing_saveable"))
  def loss_and_grads(config):
    loss = LlamaVidSystem.loss_fn(config)
    return jax.jit(jax.value_and_grad(lambda p: loss(p, batch, None)[0]))(s.params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = loss_and_grads(s.config), loss_and_grads(remat)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads))
  assert float(np.abs(plain_grads["qformer"]["layer_0"]["self_attention"]["query"]["kernel"]).max()) > 0
  for path, want in optim.flatten(plain_grads).items():
    np.testing.assert_allclose(optim.flatten(remat_grads)[path], want, rtol=1e-6, atol=1e-6 * scale, err_msg=path)


def test_recipe_context_remat_applies_over_a_loaded_config(setup):
  """The full-size stage-2 recipes set the context remat over a model folder's config (whose own
  is off), stage 3 the sliced loss; the tiny recipes and the other stages leave them."""
  for name, want in (("stage2", "nothing_saveable"), ("stage2_lora", "nothing_saveable"), ("stage1", "none"),
                     ("stage3", "none"), ("tiny_stage2", "none")):
    config = run_lib.training_config(recipes.get_config(name), LlamaVidSystem, setup.config)
    assert (config.context_remat_policy, config.qformer.remat_policy) == (want, want), name
    assert config.llama.loss_chunk == (4096 if name == "stage3" else 0), name
