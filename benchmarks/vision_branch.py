"""Forward time of Video-LLaMA's vision-language branch: vllm_jax against a PyTorch composition
of transformers' Blip2VisionModel + Blip2QFormerModel (x2) + frame positions + projection.

    python benchmarks/vision_branch.py [--size mid] [--frames 8] [--batch 1] [--repeats 5] [--threads 1|all]

Same weights on both sides (converted from the PyTorch modules), fp32, same CPU. Compile time
is reported apart; after a warm-up the two sides run alternately (so that load from other
processes hits both alike) and each reports its best of `--repeats` runs (thread modes: common.py).
Prints a table and one JSON line: ratio > 1 means vllm_jax is faster.
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
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel  # noqa: E402

from vllm_jax.configs.video_llama_vision import branch_config  # noqa: E402
from vllm_jax.converters import blip2 as blip2_format  # noqa: E402
from vllm_jax.converters.core import DictReader, Rule, convert, dense  # noqa: E402
from vllm_jax.converters.video_llama import abstract_params, hf_blip2_rules  # noqa: E402
from vllm_jax.models.qformer import QFormerConfig  # noqa: E402
from vllm_jax.models.video_branch import VideoBranch, VideoBranchConfig  # noqa: E402


def qformer(q: QFormerConfig) -> Blip2QFormerModel:
  return Blip2QFormerModel(Blip2QFormerConfig(
      hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
      intermediate_size=q.intermediate_size, encoder_hidden_size=q.encoder_width,
      cross_attention_frequency=q.cross_attention_frequency, layer_norm_eps=q.layer_norm_eps))


class TorchBranch(torch.nn.Module):
  """The branch from transformers modules; state dict in the transformers Blip2 layout plus
  `video_qformer`, `video_query_tokens`, `video_frame_position_embedding`, `llama_proj`."""

  def __init__(self, cfg: VideoBranchConfig):
    super().__init__()
    v, q, vq = cfg.vit, cfg.qformer, cfg.video_qformer
    self.cfg = cfg
    self.vision_model = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps))
    self.query_tokens = torch.nn.Parameter(torch.randn(1, q.num_queries, q.hidden_size) * 0.02)
    self.qformer = qformer(q)
    self.video_frame_position_embedding = torch.nn.Embedding(cfg.max_frames, q.hidden_size)
    self.video_query_tokens = torch.nn.Parameter(torch.randn(1, vq.num_queries, vq.hidden_size) * 0.02)
    self.video_qformer = qformer(vq)
    self.llama_proj = torch.nn.Linear(vq.hidden_size, cfg.llm_hidden_size)
    with torch.no_grad():
      for name, p in self.named_parameters():
        if name.endswith("qkv.bias"):
          p[v.width:2 * v.width] = 0  # EVA has no key bias
    self.eval()

  @torch.no_grad()
  def forward(self, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    """pixels: [B*T, 3, H, W] -> [B, Q_v, llm_hidden_size]."""
    h = self.vision_model.encoder(inputs_embeds=self.vision_model.embeddings(pixels)).last_hidden_state
    post = self.vision_model.post_layernorm
    h = F.layer_norm(h, h.shape[-1:], post.weight, post.bias, eps=self.cfg.ln_vision_eps)
    q = self.qformer(query_embeds=self.query_tokens.expand(h.shape[0], -1, -1), encoder_hidden_states=h)
    q = q.last_hidden_state.unflatten(0, (batch, -1))
    q = q + self.video_frame_position_embedding.weight[:q.shape[1]][None, :, None, :]
    v = self.video_qformer(query_embeds=self.video_query_tokens.expand(batch, -1, -1),
                           encoder_hidden_states=q.flatten(1, 2)).last_hidden_state
    return self.llama_proj(v)


def rules(cfg: VideoBranchConfig) -> list[Rule]:
  return hf_blip2_rules(cfg) + blip2_format.qformer_rules(
      cfg.video_qformer, "video_qformer.", "video_qformer/", blip2_format.TRANSFORMERS,
      query_tokens="video_query_tokens") + [
          Rule("video_frame_position_embedding.weight", "frame_position_embedding/embedding"),
          Rule("llama_proj.weight", "llama_proj/kernel", dense()),
          Rule("llama_proj.bias", "llama_proj/bias")]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="mid", choices=("tiny", "mid", "full"))
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  add_arguments(parser)
  args = parser.parse_args()

  cfg = branch_config(args.size)
  torch.manual_seed(0)
  ref = TorchBranch(cfg)
  params = convert(DictReader(ref.state_dict()), rules(cfg), nn.meta.unbox(abstract_params(cfg)), progress=False)
  params = jax.device_put(params)
  size = cfg.vit.image_size
  frames = np.random.default_rng(0).normal(size=(args.batch, args.frames, size, size, 3)).astype(np.float32)
  pixels = torch.from_numpy(frames).flatten(0, 1).permute(0, 3, 1, 2).contiguous()
  print(f"branch '{args.size}': ViT {cfg.vit.width} wide x {cfg.vit.depth}, Q-Former {cfg.qformer.hidden_size} wide "
        f"x {cfg.qformer.num_layers}, {args.batch} x {args.frames} frames at {size} px, fp32; "
        f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")

  forward = jax.jit(VideoBranch(cfg).apply)
  start = time.perf_counter()
  compiled = forward.lower({"params": params}, frames).compile()
  compile_s = time.perf_counter() - start
  run = lambda: jax.block_until_ready(compiled({"params": params}, frames))
  ref_run = lambda: ref(pixels, args.batch)
  ours, reference = interleaved(args.repeats, run, ref_run)

  out, want = np.asarray(run(), np.float64), ref_run().numpy().astype(np.float64)
  error = np.abs(out - want).max() / np.abs(want).max()
  print(f"\n{'compile s':>9} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'max rel err':>11}")
  print(f"{compile_s:>9.2f} {ours * 1e3:>9.1f} {reference * 1e3:>9.1f} {reference / ours:>6.2f} {error:>11.1e}")
  RUN.report([{"benchmark": "vision_branch", "ours": round(ours * 1e3, 1), "reference": round(reference * 1e3, 1),
               "unit": "ms", "ratio": round(reference / ours, 2)}])


if __name__ == "__main__":
  main()
