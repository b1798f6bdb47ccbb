"""Audio -> model inputs ([N, 1, 128, 204] log-mel clips) throughput, ours vs kaldi-native-fbank.

Both sides do the same work on the same 16 kHz waveform: ImageBind's 8 clips of 2 s, per-clip
mean removal, Kaldi fbank (128 bins), pad/crop to 204 frames, normalisation. The reference runs
kaldi-native-fbank (C++) once per clip; Kaldi refuses ImageBind's 128 bins at 20 Hz (one filter
is empty), so it starts its bank at 30 Hz: the same amount of work. Throughput is seconds of
audio per second of process CPU time (all threads), the best of `--rounds` rounds of `--repeats`
calls in which the sides take turns (thread modes: common.py). The last line is JSON.

  python benchmarks/audio_features.py [--seconds 16] [--repeats 10] [--rounds 5] [--threads 1|all]
"""

from common import add_arguments, interleaved, setup

RUN = setup()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import av  # noqa: E402
import kaldi_native_fbank as knf  # noqa: E402
import numpy as np  # noqa: E402

from vllm_jax.data import audio as A  # noqa: E402


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


def repeated(fn, repeats: int):
  return lambda: [fn() for _ in range(repeats)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=16.0, help="length of the audio track")
  parser.add_argument("--repeats", type=int, default=10, help="calls per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  add_arguments(parser)
  args = parser.parse_args()
  config = A.AudioClipConfig()
  waveform = synthetic_audio(args.seconds)

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "audio.mp4")
    write_mp4(path, synthetic_audio(args.seconds, 44100))
    e2e_repeats = max(args.repeats // 5, 1)
    times = interleaved(args.rounds, repeated(lambda: A.audio_clips(waveform, config), args.repeats),
                        repeated(lambda: reference_clips(waveform, config), args.repeats),
                        repeated(lambda: A.load_audio_clips(path, config), e2e_repeats), clock=time.process_time)
  ours, reference, end_to_end = (args.seconds * n / t for n, t in zip((args.repeats, args.repeats, e2e_repeats), times))

  print(f"{'pipeline':<48}{'audio s / CPU s':>18}")
  print(f"{'ours: waveform -> clips (numpy, batched)':<48}{ours:>18.0f}")
  print(f"{'reference: kaldi-native-fbank per clip':<48}{reference:>18.0f}")
  print(f"{'ours: AAC mp4 (44.1 kHz) -> decode+resample+clips':<48}{end_to_end:>18.0f}")
  RUN.report([{"benchmark": "audio_features", "ours": round(ours, 1), "reference": round(reference, 1),
               "unit": "audio_s_per_cpu_s", "ratio": round(ours / reference, 2)}])


if __name__ == "__main__":
  main()
