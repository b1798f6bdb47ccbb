"""Forward time of Video-LLaVA on one video prompt (towers, projector, LLaMA over ~2.1k tokens):
vllm_jax against transformers' VideoLlavaForConditionalGeneration with the same weights.

    python benchmarks/video_llava.py [--width 256] [--layers 4] [--repeats 5] [--threads 1|all]

fp32, same inputs. Compile time is reported apart; after a warm-up the two sides run alternately
and each reports its best of `--repeats`; the headline is both sides on one core and thread (see
common.py). Prints a table and one JSON line: ratio > 1 means vllm_jax is faster.
"""

from common import add_arguments, interleaved, setup

RUN = setup()

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402

from vllm_jax.converters import video_llava as video_llava_format  # noqa: E402
from vllm_jax.models.video_llava import VideoLlava  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--width", type=int, default=256, help="tower width (ViT-L: 1024)")
  parser.add_argument("--layers", type=int, default=4, help="tower layers used (ViT-L: 23) and LLaMA layers")
  parser.add_argument("--hidden", type=int, default=512, help="LLaMA width (7B: 4096)")
  parser.add_argument("--repeats", type=int, default=5)
  add_arguments(parser)
  args = parser.parse_args()

  frames, text = 8, 40
  vision = T.CLIPVisionConfig(hidden_size=args.width, intermediate_size=4 * args.width,
                              num_hidden_layers=args.layers + 1, num_attention_heads=args.width // 64,
                              image_size=224, patch_size=14)
  llm = T.LlamaConfig(vocab_size=32064, hidden_size=args.hidden, intermediate_size=(8 * args.hidden) // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      max_position_embeddings=4096)
  torch.manual_seed(0)
  ref = T.VideoLlavaForConditionalGeneration(T.VideoLlavaConfig(
      vision_config=vision, text_config=llm, image_token_index=32000, video_token_index=32001,
      video_seq_length=frames * 257)).eval()
  with tempfile.TemporaryDirectory() as folder:
    ref.save_pretrained(folder)
    config, params = video_llava_format.load_hf(folder, progress=False)
  params = jax.device_put(params)

  rng = np.random.default_rng(0)
  ids = np.concatenate([[1], rng.integers(3, 31000, text // 2), [32001] * (frames * 257),
                        rng.integers(3, 31000, text // 2)])[None].astype(np.int32)
  videos = rng.normal(size=(1, frames, 224, 224, 3)).astype(np.float32)
  torch_ids = torch.from_numpy(ids).long()
  torch_videos = torch.from_numpy(np.ascontiguousarray(videos.transpose(0, 1, 4, 2, 3)))
  print(f"Video-LLaVA forward: towers {args.width} wide x {args.layers} layers at 224 px, {frames} frames; "
        f"LLaMA {args.hidden} x {args.layers}; {ids.shape[1]} tokens; fp32; "
        f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()}")

  forward = jax.jit(lambda p, i, v: VideoLlava(config).apply({"params": p}, i, videos=v)[0])
  start = time.perf_counter()
  compiled = forward.lower(params, ids, videos).compile()
  compile_s = time.perf_counter() - start
  run = lambda: jax.block_until_ready(compiled(params, ids, videos))

  def ref_run():
    with torch.no_grad():
      return ref(input_ids=torch_ids, pixel_values_videos=torch_videos).logits

  ours, reference = interleaved(args.repeats, run, ref_run)
  out, want = np.asarray(run(), np.float64), ref_run().numpy().astype(np.float64)
  error = np.abs(out - want).max() / np.abs(want).max()
  print(f"\n{'compile s':>9} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} {'max rel err':>11}")
  print(f"{compile_s:>9.2f} {ours * 1e3:>9.1f} {reference * 1e3:>9.1f} {reference / ours:>6.2f} {error:>11.1e}")
  RUN.report([{"benchmark": "video_llava_forward", "ours": round(ours * 1e3, 1),
               "reference": round(reference * 1e3, 1), "unit": "ms", "ratio": round(reference / ours, 2)}])


if __name__ == "__main__":
  main()
