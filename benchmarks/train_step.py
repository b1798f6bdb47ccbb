"""Step time of Video-LLaMA stage-1 training: vllm_jax's train step against a PyTorch step built
from transformers modules (Blip2VisionModel + Blip2QFormerModel x2 + frame positions + projection
+ LlamaForCausalLM), the same frozen/trainable split on both sides.

    python benchmarks/train_step.py [--batch 2] [--frames 4] [--steps 5] [--rounds 3] [--threads 1|all]

Frozen: ViT, ln_vision, image Q-Former, LLM (PyTorch: requires_grad=False, the encoder part under
torch.no_grad as Video-LLaMA runs it). Trained with AdamW (wd 0.05, none on 1-D tensors): video
Q-Former, video queries, frame positions, llama_proj. Same weights (converted from the PyTorch
modules), fp32, same CPU, same batch: [BOS, 32 query placeholders, 32 caption tokens].
Compile time is reported apart; after warm-up steps the sides run `--rounds` rounds of `--steps`
steps in turn (so load from other processes hits both alike) and each keeps its best round
(thread modes: common.py).
Prints the first-step losses of both, a table, and one JSON line: ratio > 1 means vllm_jax is faster.
"""

from common import add_arguments, interleaved, setup

RUN = setup()

import argparse  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig as HFLlamaConfig  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from vision_branch import TorchBranch, rules  # noqa: E402
from vllm_jax.configs.video_llama import VISION_CONNECTOR, get_config  # noqa: E402
from vllm_jax.configs.video_llama_vision import branch_config  # noqa: E402
from vllm_jax.converters import llama as llama_conv  # noqa: E402
from vllm_jax.converters.core import DictReader, convert  # noqa: E402
from vllm_jax.models.llama import LlamaConfig  # noqa: E402
from vllm_jax.models.video_llama import VideoLlamaConfig, abstract_params  # noqa: E402
from vllm_jax.train import sharding  # noqa: E402
from vllm_jax.systems.video_llama import VideoLlamaSystem  # noqa: E402
from vllm_jax.train import run as train_lib  # noqa: E402

TEXT_LEN = 32


def model_config(frames: int) -> VideoLlamaConfig:
  """A ViT-S-sized vision branch at 112 px (BLIP-2's 12-layer Q-Former shape, 384 wide) and a
  4-layer, 512-wide LLaMA."""
  llama = LlamaConfig(vocab_size=4000, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8,
                      num_kv_heads=8, head_dim=64, max_position_embeddings=256, remat_policy="none")
  vision = branch_config("mid")
  vision = vision.replace(vit=vision.vit.replace(image_size=112), llm_hidden_size=llama.hidden_size,
                          max_frames=frames)
  return VideoLlamaConfig(llama=llama, vision=vision, audio=None, video_token_id=4000, audio_token_id=4001,
                          num_frames=frames)


class TorchStage1:
  """Video-LLaMA's stage-1 step: frozen encoder under no_grad, trainable video part, frozen LLM
  over [BOS embedding, video tokens, caption embeddings]."""

  def __init__(self, config: VideoLlamaConfig, lr: float):
    torch.manual_seed(0)
    self.branch = TorchBranch(config.vision)
    self.llm = LlamaForCausalLM(HFLlamaConfig(**llama_conv.config_to_hf(config.llama)))
    self.trainable = [self.branch.video_qformer, self.branch.video_frame_position_embedding, self.branch.llama_proj]
    for p in list(self.branch.parameters()) + list(self.llm.parameters()):
      p.requires_grad = False
    params = [self.branch.video_query_tokens] + [p for m in self.trainable for p in m.parameters()]
    for p in params:
      p.requires_grad = True
    self.opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=lr, betas=(0.9, 0.999), eps=1e-8)
    self.llm.eval()  # no dropout, like our model (and the branch, in eval mode already)

  def step(self, pixels: torch.Tensor, batch: int, text: torch.Tensor, labels: torch.Tensor) -> float:
    """pixels [B*T, 3, H, W]; text [B, TEXT_LEN]; labels [B, 1 + Q + TEXT_LEN] -> loss."""
    b = self.branch
    with torch.no_grad():
      h = b.vision_model.encoder(inputs_embeds=b.vision_model.embeddings(pixels)).last_hidden_state
      post = b.vision_model.post_layernorm
      h = F.layer_norm(h, h.shape[-1:], post.weight, post.bias, eps=b.cfg.ln_vision_eps)
      q = b.qformer(query_embeds=b.query_tokens.expand(h.shape[0], -1, -1), encoder_hidden_states=h)
      q = q.last_hidden_state.unflatten(0, (batch, -1))
    q = q + b.video_frame_position_embedding.weight[:q.shape[1]][None, :, None, :]
    v = b.video_qformer(query_embeds=b.video_query_tokens.expand(batch, -1, -1),
                        encoder_hidden_states=q.flatten(1, 2)).last_hidden_state
    embed = self.llm.model.embed_tokens
    bos = embed(torch.ones((batch, 1), dtype=torch.long))
    embeds = torch.cat([bos, b.llama_proj(v), embed(text)], dim=1)
    loss = self.llm(inputs_embeds=embeds, labels=labels).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=4)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=3)
  add_arguments(parser)
  args = parser.parse_args()

  config = model_config(args.frames)
  cfg = get_config("tiny_stage1")
  cfg.optim.update(trainable=(VISION_CONNECTOR,), frozen_dtype="float32", warmup_steps=0, lr=1e-4, min_lr=1e-4)
  ref = TorchStage1(config, lr=cfg.optim.lr)
  abstract = nn.meta.unbox(abstract_params(config))
  params = {"vision": convert(DictReader(ref.branch.state_dict()), rules(config.vision), abstract["vision"],
                              progress=False),
            "llm": convert(DictReader(ref.llm.state_dict()), llama_conv.rules(config.llama), abstract["llm"],
                           ignore=llama_conv.IGNORED, progress=False)}

  rng = np.random.default_rng(0)
  b, t, size, q = args.batch, args.frames, config.vision.vit.image_size, config.num_video_tokens
  frames = rng.normal(size=(b, t, size, size, 3)).astype(np.float32)
  text = rng.integers(3, config.llama.vocab_size, (b, TEXT_LEN)).astype(np.int32)
  ids = np.concatenate([np.ones((b, 1), np.int32), np.full((b, q), config.video_token_id, np.int32), text], 1)
  labels = np.where(np.arange(ids.shape[1]) > q, ids, -100).astype(np.int32)
  batch = dict(input_ids=ids, labels=labels, attention_mask=np.ones_like(ids), frames=frames,
               frame_mask=np.ones((b, t), bool))
  pixels = torch.from_numpy(frames).flatten(0, 1).permute(0, 3, 1, 2).contiguous()
  torch_args = (pixels, b, torch.from_numpy(text).long(), torch.from_numpy(labels).long())
  print(f"stage-1 step: ViT {config.vision.vit.width} x {config.vision.vit.depth} at {size} px, Q-Former "
        f"{config.vision.qformer.hidden_size} x {config.vision.qformer.num_layers}, LLaMA "
        f"{config.llama.hidden_size} x {config.llama.num_layers}; batch {b} x {t} frames, "
        f"{ids.shape[1]} tokens, fp32; torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  t_ours = train_lib.make_trainer(cfg, mesh, VideoLlamaSystem, config)
  state = t_ours.init(jax.device_put(params))
  global_batch = sharding.make_global_batch(batch, mesh)
  start = time.perf_counter()
  state, metrics = t_ours.train_step(state, global_batch)
  ours_first = float(metrics["loss"])
  compile_s = time.perf_counter() - start
  ref_first = ref.step(*torch_args)
  print(f"first-step loss: ours {ours_first:.6f}, torch {ref_first:.6f} "
        f"(rel diff {abs(ours_first - ref_first) / abs(ref_first):.1e})")

  def run_ours():
    nonlocal state
    for _ in range(args.steps):
      state, m = t_ours.train_step(state, global_batch)
    jax.block_until_ready(m["loss"])

  def run_ref():
    for _ in range(args.steps):
      ref.step(*torch_args)

  best = [t / args.steps for t in interleaved(args.rounds, run_ours, run_ref)]
  ours, reference = 1 / best[0], 1 / best[1]
  print(f"\n{'compile s':>9} {'ours ms':>9} {'torch ms':>9} {'ratio':>6}")
  print(f"{compile_s:>9.2f} {best[0] * 1e3:>9.1f} {best[1] * 1e3:>9.1f} {ours / reference:>6.2f}")
  RUN.report([{"benchmark": "train_step", "ours": round(ours, 3), "reference": round(reference, 3),
               "unit": "steps/s", "ratio": round(ours / reference, 2)}])


if __name__ == "__main__":
  main()
