"""Audio -> model inputs ([N, 1, 128, 204] log-mel clips) throughput, ours vs kaldi-native-fbank.

Both sides do the same work on the same 16 kHz waveform: ImageBind's 8 clips of 2 s, per-clip
mean removal, Kaldi fbank (128 bins), pad/crop to 204 frames, normalisation. The reference runs
kaldi-native-fbank (C++) once per clip; Kaldi refuses ImageBind's 128 bins at 20 Hz (one filter
is empty), so it starts its bank at 30 Hz: the same amount of work. Throughput is seconds of
audio per second of process CPU time (all threads). The last line is JSON.

  python benchmarks/audio_features.py [--seconds 16] [--repeats 50]
"""

import argparse
import json
import os
import tempfile
import time

import av
import kaldi_native_fbank as knf
import numpy as np

from vllm_jax.data import audio as A


def synthetic_audio(seconds: float, rate: int = A.SAMPLE_RATE) -> np.ndarray:
  rng = np.random.default_rng(0)
  t = np.arange(int(seconds * rate)) / rate
  x = 0.3 * np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 0.5 * t)) * t) + 0.05 * rng.standard_normal(len(t))
  return x.astype(np.float32)


def reference_clips(waveform: np.ndarray, config: A.AudioClipConfig) -> np.ndarray:
  opts = knf.FbankOptions()
  opts.frame_opts.dither = 0.0
  opts.frame_opts.window_type = "hanning"
  opts.mel_opts.num_bins = config.num_mel_bins
  opts.mel_opts.low_freq = 30.0
  opts.htk_compat = True
  out = np.zeros((config.num_clips, 1, config.num_mel_bins, config.num_frames), np.float32)
  shared = waveform.copy()
  for i, (start, end) in enumerate(A.clip_bounds(len(shared), config)):
    clip = shared[start:end]
    clip -= clip.mean()
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(config.sample_rate, clip)
    fbank.input_finished()
    n = min(fbank.num_frames_ready, config.num_frames)
    frames = np.stack([fbank.get_frame(j) for j in range(n)])
    out[i, 0, :, :n] = frames.T
  return (out - config.mean) / config.std


def write_mp4(path: str, waveform: np.ndarray, rate: int = 44100) -> None:
  with av.open(path, "w") as container:
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    for start in range(0, len(waveform), 1024):
      frame = av.AudioFrame.from_ndarray(waveform[None, start:start + 1024], format="fltp", layout="mono")
      frame.sample_rate, frame.pts = rate, start
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def throughput(fn, audio_seconds: float, repeats: int) -> float:
  fn()  # warm-up (caches, allocator)
  start = time.process_time()
  for _ in range(repeats):
    fn()
  return audio_seconds * repeats / (time.process_time() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=16.0, help="length of the audio track")
  parser.add_argument("--repeats", type=int, default=50)
  args = parser.parse_args()
  config = A.AudioClipConfig()
  waveform = synthetic_audio(args.seconds)

  ours = throughput(lambda: A.audio_clips(waveform, config), args.seconds, args.repeats)
  reference = throughput(lambda: reference_clips(waveform, config), args.seconds, args.repeats)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "audio.mp4")
    write_mp4(path, synthetic_audio(args.seconds, 44100))
    end_to_end = throughput(lambda: A.load_audio_clips(path, config), args.seconds, max(args.repeats // 5, 1))

  print(f"{'pipeline':<48}{'audio s / CPU s':>18}")
  print(f"{'ours: waveform -> clips (numpy, batched)':<48}{ours:>18.0f}")
  print(f"{'reference: kaldi-native-fbank per clip':<48}{reference:>18.0f}")
  print(f"{'ours: AAC mp4 (44.1 kHz) -> decode+resample+clips':<48}{end_to_end:>18.0f}")
  print(json.dumps({"benchmark": "audio_features", "ours": round(ours, 1), "reference": round(reference, 1),
                    "unit": "audio_s_per_cpu_s", "ratio": round(ours / reference, 3)}))


if __name__ == "__main__":
  main()
