"""Audio inputs of Video-LLaMA's audio branch: decoding, clip sampling, ImageBind's log-mel fbank.

The pipeline reproduces ImageBind's `load_and_transform_audio_data`:
  decode -> mono float in [-1, 1] at 16 kHz (no 32768 scaling)
  -> N clips of 2 s whose starts are spread evenly over [0, duration - 2] (ImageBind's
     constant-clips-per-video sampler: start_i = i * max(duration - 2, 0) / max(N - 1, 1) s)
  -> per clip: subtract its mean, Kaldi fbank (128 mel bins, 25 ms / 10 ms frames, Hann window,
     preemphasis 0.97, per-frame DC removal, power spectrum, log floored at float32 eps,
     snip_edges, mel range 20 Hz .. Nyquist), [frames, 128] -> [128, frames]
  -> right-pad with 0 or crop to 204 frames -> (x - (-4.268)) / 9.138 -> [N, 1, 128, 204].

No usable audio (no audio stream, fewer samples than one 25 ms frame, or a digitally silent
track) gives all-zero features and `valid=False`, so the model can drop the audio branch for
that sample. A track shorter than 2 s is valid: every clip starts at 0 and holds the whole
track, and its missing frames are padded as ImageBind pads them.
"""

import dataclasses
import fractions
import functools

import av
import numpy as np
import scipy.fft

from vllm_jax import paths

SAMPLE_RATE = 16000
PREEMPHASIS = 0.97


@dataclasses.dataclass(frozen=True)
class AudioClipConfig:
  num_clips: int = 8             # Video-LLaMA: 8 (ImageBind's default elsewhere: 3)
  clip_seconds: float = 2.0
  sample_rate: int = SAMPLE_RATE
  num_mel_bins: int = 128
  num_frames: int = 204          # fbank frames per clip after padding/cropping
  frame_length_ms: float = 25.0
  frame_shift_ms: float = 10.0
  mean: float = -4.268
  std: float = 9.138

  @property
  def frame_length(self) -> int:
    return int(self.sample_rate * self.frame_length_ms / 1000)

  @property
  def frame_shift(self) -> int:
    return int(self.sample_rate * self.frame_shift_ms / 1000)


class AudioDecodeError(ValueError):
  """The file exists but is not decodable media (empty, truncated, corrupt)."""


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
  """The first audio stream of a video or audio file, downmixed to mono and resampled.

  -> [T] float32 in [-1, 1], or None when the file has no audio stream. `path` may be a URL (gs://...).
  Raises FileNotFoundError, AudioDecodeError for a file that cannot be decoded, or
  `paths.StorageError` when its store cannot be reached.
  """
  path = paths.resolve(path)
  source = paths.media_source(path)
  try:
    with av.open(source) as container:
      if not container.streams.audio:
        return None
      stream = container.streams.audio[0]
      resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
      chunks = []
      for frame in container.decode(stream):
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
      chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
  except av.FFmpegError as e:
    raise AudioDecodeError(f"cannot decode audio of {path}: {e}") from e
  return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


def clip_bounds(num_samples: int, config: AudioClipConfig = AudioClipConfig()) -> list[tuple[int, int]]:
  """[(start, end)] sample indices of the clips, as ImageBind's sampler computes them.

  The arithmetic is exact (fractions) on the float duration, as in the reference, so the
  sample indices agree to the sample.
  """
  sr = config.sample_rate
  clip = fractions.Fraction(config.clip_seconds)
  max_start = fractions.Fraction(max(num_samples / sr - config.clip_seconds, 0))
  step = max_start / max(config.num_clips - 1, 1)
  bounds = []
  for i in range(config.num_clips):
    start = step * i
    bounds.append((int(start * sr), min(int((start + clip) * sr), num_samples)))
  return bounds


@functools.lru_cache(maxsize=8)
def mel_banks(num_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0) -> np.ndarray:
  """Kaldi's triangular mel filters on the HTK mel scale -> [n_fft // 2 + 1, num_bins].

  The triangles are evaluated at the mel value of each FFT bin's frequency (not linear in
  Hz, as Kaldi does); the Nyquist bin gets no weight.
  """
  mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)
  lo, hi = mel(low_freq), mel(sample_rate / 2)
  delta = (hi - lo) / (num_bins + 1)
  left = lo + delta * np.arange(num_bins)
  center, right = left + delta, left + 2 * delta
  bins = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[:, None]
  weights = np.maximum(0.0, np.minimum((bins - left) / (center - left), (right - bins) / (right - center)))
  return np.concatenate([weights, np.zeros((1, num_bins))]).astype(np.float32)


def kaldi_fbank(waveforms: np.ndarray, config: AudioClipConfig = AudioClipConfig()) -> np.ndarray:
  """Kaldi-compatible log-mel filterbank of a batch of equal-length waveforms.

  waveforms: [..., T] float (T >= one frame) -> [..., frames, num_mel_bins] float32 with
  frames = 1 + (T - frame_length) // frame_shift (snip_edges).
  """
  x = np.asarray(waveforms, np.float32)
  length, shift = config.frame_length, config.frame_shift
  n_fft = 1 << (length - 1).bit_length()
  num_frames = 1 + (x.shape[-1] - length) // shift
  starts = np.arange(num_frames) * shift
  # Per-frame DC removal then preemphasis, from whole-waveform passes: with d = x[1:] - p x[:-1],
  # frame sample i >= 1 becomes d[start + i - 1] - (1 - p) mean and sample 0 (1 - p)(x[start] - mean).
  sums = np.concatenate([np.zeros((*x.shape[:-1], 1)), np.cumsum(x, axis=-1, dtype=np.float64)], axis=-1)
  mean = ((sums[..., starts + length] - sums[..., starts]) / length).astype(np.float32)[..., None]
  diff = x[..., 1:] - PREEMPHASIS * x[..., :-1]
  frames = np.zeros((*x.shape[:-1], num_frames, n_fft), np.float32)
  frames[..., 1:length] = np.lib.stride_tricks.sliding_window_view(
      diff, length - 1, axis=-1)[..., ::shift, :][..., :num_frames, :]
  frames[..., 1:length] -= (1 - PREEMPHASIS) * mean
  frames[..., :1] = (1 - PREEMPHASIS) * (x[..., starts, None] - mean)
  frames[..., :length] *= _hann(length)
  spectrum = scipy.fft.rfft(frames, axis=-1, overwrite_x=True)
  power = np.square(spectrum.real) + np.square(spectrum.imag)
  # einsum's own loop: a BLAS matmul this small spends more CPU on its threads than on the sums.
  energies = np.einsum("...k,km->...m", power, mel_banks(config.num_mel_bins, n_fft, config.sample_rate))
  return np.log(np.maximum(energies, np.finfo(np.float32).eps))


@functools.lru_cache(maxsize=4)
def _hann(length: int) -> np.ndarray:
  """Kaldi's symmetric "hanning" window: 0.5 - 0.5 cos(2 pi n / (length - 1))."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))).astype(np.float32)


def audio_clips(waveform: np.ndarray | None,
                config: AudioClipConfig = AudioClipConfig()) -> tuple[np.ndarray, bool]:
  """A mono 16 kHz waveform [T] (or None) -> (features [N, 1, mel, frames] float32, valid)."""
  shape = (config.num_clips, 1, config.num_mel_bins, config.num_frames)
  if waveform is None or len(waveform) < config.frame_length or not np.any(waveform):
    return np.zeros(shape, np.float32), False
  shared = np.array(waveform, np.float32)
  clips = []
  for start, end in clip_bounds(len(shared), config):
    clip = shared[start:end]
    # ImageBind subtracts the mean in place on a view of the shared waveform, so a later
    # overlapping clip sees the earlier subtractions: kept for exact parity.
    clip -= clip.mean()
    clips.append(clip.copy())
  # Every clip has the same length: 2 s, or the whole track when it is shorter than that.
  fbank = kaldi_fbank(np.stack(clips), config)[:, :config.num_frames]
  features = np.zeros((config.num_clips, config.num_frames, config.num_mel_bins), np.float32)
  features[:, :fbank.shape[1]] = fbank
  features = (features - config.mean) / config.std
  return np.ascontiguousarray(features.transpose(0, 2, 1)[:, None]), True


def load_audio_clips(path: str, config: AudioClipConfig = AudioClipConfig(),
                     bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, bool]:
  """Video or audio file -> (features [N, 1, mel, frames] float32, valid); see the module doc.
  `bounds`: only the track within these (start, end) seconds."""
  waveform = load_audio(path, config.sample_rate)
  if bounds is not None and waveform is not None:
    waveform = waveform[round(bounds[0] * config.sample_rate):round(bounds[1] * config.sample_rate)]
  return audio_clips(waveform, config)
