"""Audio clips and Kaldi fbank vs kaldi-native-fbank; decoding real mp4/wav files; bad inputs."""

import fractions

import av
import numpy as np
import pytest
import soundfile
import torch
from scipy import signal

from vllm_jax.data import audio as A

knf = pytest.importorskip("kaldi_native_fbank", reason="kaldi-native-fbank (the fbank reference) is not installed")

SR = 16000
EPS_LOG = float(np.log(np.finfo(np.float32).eps))


# ----------------------------------------------------------------------------------------------
# References.


def _knf(x, num_bins, low, high):
  opts = knf.FbankOptions()
  opts.frame_opts.samp_freq = SR
  opts.frame_opts.dither = 0.0
  opts.frame_opts.window_type = "hanning"
  opts.mel_opts.num_bins = num_bins
  opts.mel_opts.low_freq = low
  opts.mel_opts.high_freq = high
  opts.htk_compat = True
  opts.use_energy = False
  fbank = knf.OnlineFbank(opts)
  fbank.accept_waveform(SR, np.asarray(x, np.float32).tolist())
  fbank.input_finished()
  return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def reference_fbank(x, num_bins=128):
  """kaldi-native-fbank with ImageBind's options -> [frames, num_bins].

  With 128 bins at 16 kHz, bin 3 contains no FFT bin: Kaldi refuses such a filterbank,
  torchaudio (ImageBind's implementation) keeps it as an all-zero filter, so its output is the
  log floor. The other bins are the same triangles as knf banks over [20 Hz, edge] and
  [edge, 8 kHz] with the mel spacing unchanged, so knf computes them exactly.
  """
  mel = lambda f: 1127.0 * np.log1p(f / 700.0)
  if num_bins != 128:
    return _knf(x, num_bins, 20.0, 0.0)
  lo, hi = mel(20.0), mel(SR / 2)
  edge = 700.0 * np.expm1((lo + 4 * (hi - lo) / 129) / 1127.0)
  low, high = _knf(x, 3, 20.0, edge), _knf(x, 124, edge, SR / 2)
  return np.concatenate([low, np.full((len(low), 1), EPS_LOG, np.float32), high], axis=1)


def reference_clip_bounds(num_samples, num_clips, clip_seconds=2):
  """The constant-clips-per-video sampler loop, run as ImageBind runs it."""
  duration = num_samples / SR
  max_start = fractions.Fraction(max(duration - fractions.Fraction(clip_seconds), 0))
  step = fractions.Fraction(max_start, max(num_clips - 1, 1))
  bounds, index = [], 0
  while True:
    start = step * index
    bounds.append((int(start * SR), int((start + clip_seconds) * SR)))
    index += 1
    if index >= num_clips or step * index > max_start:
      return bounds


def reference_clips(waveform, num_clips=8):
  """ImageBind's clip loop on a torch tensor (its in-place mean subtraction on views included),
  with knf as the fbank -> [N, 1, 128, 204]."""
  waveform = torch.tensor(waveform, dtype=torch.float32)[None]
  out = []
  for start, end in reference_clip_bounds(waveform.shape[1], num_clips):
    clip = waveform[:, start:end]
    clip -= clip.mean()
    fbank = torch.from_numpy(reference_fbank(clip[0].numpy())).T
    pad = 204 - fbank.shape[1]
    fbank = torch.nn.functional.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :204]
    out.append(((fbank - -4.268) / 9.138)[None])
  return torch.stack(out).numpy()


# ----------------------------------------------------------------------------------------------
# Signals.


def formant_speech(seconds, sr=SR, seed=0):
  """Voiced syllables (a glottal pulse train with a wandering pitch through three formant
  resonators) alternating with fricative noise and pauses, plus a -60 dB room-noise floor."""
  rng = np.random.default_rng(seed)
  n = int(seconds * sr)
  t = np.arange(n) / sr
  f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)
  pulses = (np.diff(np.floor(np.cumsum(f0) / sr), prepend=0) > 0).astype(float)
  voiced = np.zeros(n)
  for formant, bandwidth in ((700, 130), (1220, 70), (2600, 160)):
    r = np.exp(-np.pi * bandwidth / sr)
    voiced += signal.lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / sr), r * r], pulses)
  syllable = 0.5 * (1 - np.cos(2 * np.pi * 3.5 * t))
  fricative = signal.lfilter(*signal.butter(4, 3500, "high", fs=sr), rng.standard_normal(n))
  gate = (np.sin(2 * np.pi * 0.9 * t) > 0.3).astype(float)
  x = voiced / np.abs(voiced).max() * syllable * gate + 0.05 * fricative * (1 - gate)
  return (0.5 * x / np.abs(x).max() + 1e-3 * rng.standard_normal(n)).astype(np.float32)


def make_signals():
  t = np.arange(2 * SR) / SR
  rng = np.random.default_rng(1)
  return {
      "tone_440": 0.5 * np.sin(2 * np.pi * 440 * t),
      "tone_7k": 0.3 * np.sin(2 * np.pi * 7000 * t),
      "hum_50_harmonics": sum(0.2 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 8)),
      "chirp": 0.3 * signal.chirp(t, 60, t[-1], 7900, method="logarithmic"),
      "white_noise": 0.1 * rng.standard_normal(len(t)),
      "quiet_tone": 1e-4 * np.sin(2 * np.pi * 3000 * t),
      "speech": formant_speech(2.0),
  }


SIGNALS = make_signals()


def assert_fbank_close(ours, ref, atol=1e-3):
  """|ours - ref| <= atol wherever the mel energy is within 70 dB of its frame's peak.

  Further down, both are float32 rounding noise of the FFT: ours and knf each differ from a
  float64 computation by ~1e-3 at 80 dB and up to ~1e-2 near 110 dB, so only a loose bound
  is meaningful there.
  """
  assert ours.shape == ref.shape
  err = np.abs(ours - ref)
  within = ref > ref.max(axis=-1, keepdims=True) - np.log(1e7)
  assert err[within].max() <= atol, err[within].max()
  assert err.max() <= 3e-2, err.max()
  return err[within].max()


# ----------------------------------------------------------------------------------------------
# Fbank.


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_fbank_matches_kaldi(name):
  x = np.asarray(SIGNALS[name], np.float32)
  ours = A.kaldi_fbank(x)
  assert ours.shape == (198, 128) and ours.dtype == np.float32
  assert_fbank_close(ours, reference_fbank(x))
  np.testing.assert_array_equal(ours[:, 3], EPS_LOG)  # torchaudio's empty filter: the log floor


def test_fbank_matches_kaldi_80_bins_and_odd_length():
  x = SIGNALS["speech"][:12345]
  cfg = A.AudioClipConfig(num_mel_bins=80)
  assert_fbank_close(A.kaldi_fbank(x, cfg), reference_fbank(x, 80))


def test_fbank_batched_equals_single():
  x = np.stack([SIGNALS["speech"], SIGNALS["chirp"].astype(np.float32)])
  both = A.kaldi_fbank(x)
  np.testing.assert_allclose(both[1], A.kaldi_fbank(x[1]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Clips.


@pytest.mark.parametrize("seconds", [0.5, 1.99, 2.0, 3.3, 7.0, 16.0, 37.123])
@pytest.mark.parametrize("num_clips", [1, 3, 8])
def test_clip_bounds_match_sampler(seconds, num_clips):
  n = int(seconds * SR)
  ref = [(s, min(e, n)) for s, e in reference_clip_bounds(n, num_clips)]
  assert A.clip_bounds(n, A.AudioClipConfig(num_clips=num_clips)) == ref


@pytest.mark.parametrize("seconds", [0.5, 5.0, 11.7])
def test_clips_match_reference_pipeline(seconds):
  x = formant_speech(seconds, seed=2)
  features, valid = A.audio_clips(x)
  assert valid and features.shape == (8, 1, 128, 204) and features.dtype == np.float32
  assert_fbank_close(features, reference_clips(x))


def test_short_track_repeats_whole_track_and_pads():
  features, valid = A.audio_clips(formant_speech(0.5))
  assert valid
  np.testing.assert_allclose(features[0], features[7], atol=1e-4)  # up to the repeated mean removal
  frames = 1 + (8000 - 400) // 160
  np.testing.assert_allclose(features[:, 0, :, frames:], (0 - -4.268) / 9.138, rtol=1e-6)


@pytest.mark.parametrize("waveform", [None, np.zeros(0, np.float32), np.zeros(399, np.float32),
                                      np.zeros(5 * SR, np.float32)], ids=["none", "empty", "short", "silent"])
def test_no_usable_audio_gives_zeros_and_invalid(waveform):
  features, valid = A.audio_clips(waveform)
  assert not valid and features.shape == (8, 1, 128, 204) and not features.any()


# ----------------------------------------------------------------------------------------------
# Files.


def write_mp4(path, audio=None, audio_rate=44100, layout="mono", seconds=3.0):
  """h264 video (+ AAC audio when `audio` [channels, T] is given) written with PyAV."""
  with av.open(str(path), "w") as out:
    video = out.add_stream("libx264", rate=10)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    sound = None
    if audio is not None:
      sound = out.add_stream("aac", rate=audio_rate)
      sound.layout = layout
    for i in range(int(seconds * 10)):
      frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8 % 255, np.uint8), format="rgb24")
      out.mux(video.encode(frame))
    out.mux(video.encode())
    if sound is not None:
      frame_size = 1024
      data = np.asarray(audio, np.float32)
      for start in range(0, data.shape[1], frame_size):
        chunk = np.ascontiguousarray(data[:, start:start + frame_size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = audio_rate, start
        out.mux(sound.encode(frame))
      out.mux(sound.encode())


def aligned_correlation(a, b, max_lag=3000):
  """Best normalised correlation of a and b over lags up to max_lag (codec delay)."""
  n = min(len(a), len(b)) - max_lag
  best = 0.0
  for lag in range(0, max_lag, 1):
    for x, y in ((a[lag:lag + n], b[:n]), (a[:n], b[lag:lag + n])):
      best = max(best, float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)))
  return best


def resample_to_16k(x, rate):
  return signal.resample_poly(x, 16000, rate).astype(np.float32)


def test_mp4_with_aac_audio_pipeline(tmp_path):
  speech = formant_speech(5.0, sr=44100, seed=3)
  path = tmp_path / "talk.mp4"
  write_mp4(path, speech[None], seconds=5.0)
  waveform = A.load_audio(str(path))
  assert waveform.dtype == np.float32 and abs(len(waveform) - 5 * SR) < 2048
  expected = resample_to_16k(speech, 44100)
  assert aligned_correlation(waveform[::4], expected[::4], max_lag=800) > 0.9  # lossy AAC
  features, valid = A.load_audio_clips(str(path))
  assert valid and features.shape == (8, 1, 128, 204)
  assert_fbank_close(features, reference_clips(waveform))


def test_stereo_wav_is_downmixed_and_resampled(tmp_path):
  left, right = formant_speech(3.0, sr=22050, seed=4), formant_speech(3.0, sr=22050, seed=5)
  path = tmp_path / "stereo.wav"
  soundfile.write(str(path), np.stack([left, right], axis=1), 22050, subtype="FLOAT")
  waveform = A.load_audio(str(path))
  expected = resample_to_16k((left + right) / 2, 22050)
  assert abs(len(waveform) - len(expected)) <= 2
  n = min(len(waveform), len(expected))
  assert aligned_correlation(waveform[:n], expected[:n], max_lag=40) > 0.99


def test_flac_at_16k_is_read_exactly(tmp_path):
  x = formant_speech(2.5, seed=6)
  path = tmp_path / "speech.flac"
  soundfile.write(str(path), x, SR, subtype="PCM_24")
  np.testing.assert_allclose(A.load_audio(str(path)), x, atol=1e-6)


def test_video_without_audio_track(tmp_path):
  path = tmp_path / "mute.mp4"
  write_mp4(path, None)
  assert A.load_audio(str(path)) is None
  features, valid = A.load_audio_clips(str(path))
  assert not valid and not features.any()


def test_silent_audio_track(tmp_path):
  path = tmp_path / "silent.mp4"
  write_mp4(path, np.zeros((1, 3 * 44100), np.float32))
  features, valid = A.load_audio_clips(str(path))
  assert not valid and not features.any()


def test_half_second_track(tmp_path):
  path = tmp_path / "blip.mp4"
  write_mp4(path, formant_speech(0.5, sr=44100)[None], seconds=0.5)
  features, valid = A.load_audio_clips(str(path))
  assert valid
  np.testing.assert_allclose(features[0], features[-1], atol=1e-4)
  assert np.allclose(features[0, 0, :, 60:], 4.268 / 9.138)  # ~0.5 s = 48 frames, then padding


def test_zero_length_file(tmp_path):
  path = tmp_path / "empty.mp4"
  path.write_bytes(b"")
  with pytest.raises(A.AudioDecodeError, match="empty.mp4"):
    A.load_audio_clips(str(path))


def test_corrupt_file(tmp_path):
  good = tmp_path / "good.mp4"
  write_mp4(good, formant_speech(2.0, sr=44100)[None], seconds=2.0)
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
  with pytest.raises(A.AudioDecodeError, match="corrupt.mp4"):
    A.load_audio_clips(str(bad))
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(good.read_bytes()[:2000])
  with pytest.raises(A.AudioDecodeError, match="truncated.mp4"):
    A.load_audio_clips(str(truncated))


def test_missing_file():
  with pytest.raises(FileNotFoundError):
    A.load_audio("/nonexistent/clip.mp4")
