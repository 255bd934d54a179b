"""Spectrogram features: log-mel (our own Slaney filterbank + torch.stft, runs on any device), CQT
(nnAudio), and a content-addressed on-disk cache of per-file features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from musefm.atomic import save_npy_atomic
from musefm.audio.io import iter_audio_chunks
from musefm.errors import BadInputError, MusefmError

FEATURE_VERSION = 1  # bump when a feature's computation changes: old cache entries stop matching

# Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per x6.4).
_MEL_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_MEL_BREAK_HZ = 1000.0
_MEL_BREAK = _MEL_BREAK_HZ / _MEL_LINEAR_HZ_PER_MEL  # 15.0
_MEL_LOG_STEP = math.log(6.4) / 27.0


@dataclass
class MelConfig:
    sample_rate: int = 16000
    n_fft: int = 2048
    hop_length: int = 320
    n_mels: int = 229
    fmin: float = 30.0
    fmax: float = 8000.0
    log_floor: float = 1e-5  # magnitudes are clamped here before the log: silence -> log(1e-5)

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if int(getattr(self, name)) <= 0:
                raise MusefmError(f"MelConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise MusefmError(f"MelConfig needs 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin} "
                              f"fmax={self.fmax} sample_rate={self.sample_rate}")
        if self.log_floor <= 0:
            raise MusefmError(f"MelConfig.log_floor must be positive, got {self.log_floor}")


def hz_to_mel(hz):
    """Slaney mel scale (librosa's default, htk=False); works on floats and numpy arrays."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _MEL_LINEAR_HZ_PER_MEL
    logarithmic = _MEL_BREAK + np.log(np.maximum(hz, _MEL_BREAK_HZ) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    return np.where(hz >= _MEL_BREAK_HZ, logarithmic, linear)


def mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _MEL_LINEAR_HZ_PER_MEL
    logarithmic = _MEL_BREAK_HZ * np.exp(_MEL_LOG_STEP * (np.maximum(mel, _MEL_BREAK) - _MEL_BREAK))
    return np.where(mel >= _MEL_BREAK, logarithmic, linear)


def mel_band_edges_hz(n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels + 2,) Hz, evenly spaced on the mel scale: band b rises from edge b, peaks at edge
    b + 1 (its centre) and falls to edge b + 2."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """Triangular filters evenly spaced on the Slaney mel scale, each scaled to unit area in Hz
    (Slaney normalisation, as librosa's default). Returns (n_mels, n_fft // 2 + 1) float32."""
    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (bins,)
    edges_hz = mel_band_edges_hz(n_mels, fmin, fmax)  # (n_mels + 2,)
    widths_hz = np.diff(edges_hz)  # (n_mels + 1,)
    offsets = edges_hz[:, None] - bin_hz[None, :]  # (n_mels + 2, bins): edge minus bin frequency
    rising = -offsets[:-2] / widths_hz[:-1, None]  # (n_mels, bins): 0 at left edge, 1 at centre
    falling = offsets[2:] / widths_hz[1:, None]  # (n_mels, bins): 1 at centre, 0 at right edge
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # triangle area = 1
    return torch.from_numpy(weights.astype(np.float32))


def num_frames(num_samples: int, hop_length: int) -> int:
    """Frames of a centred STFT (center=True): one per hop, plus the frame centred on the end."""
    return num_samples // hop_length + 1


class LogMelSpectrogram(torch.nn.Module):
    """Waveform -> log mel magnitude spectrogram.

    Mel filters are applied to the STFT *magnitude* (not power), then log(clamp(mel, log_floor)),
    as in the PyTorch Onsets and Frames; a power spectrogram would only double the log values.
    Frames are centred (reflect padding) so frame t is at t * hop_length samples. The window and
    filterbank are non-persistent buffers: derived from the config, they follow ``.to(device)``
    but are not stored in checkpoints.
    """

    def __init__(self, config: MelConfig | None = None):
        super().__init__()
        self.config = config or MelConfig()
        c = self.config
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax),
                             persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> (B, frames, n_mels); (samples,) -> (frames, n_mels); float32."""
        single = waveform.dim() == 1
        batch = waveform.float().reshape(1, -1) if single else waveform.float()  # (B, samples)
        half = self.config.n_fft // 2
        # Reflect padding needs more samples than the pad; very short clips are zero padded instead
        # (same frame count either way).
        mode = "reflect" if batch.shape[-1] > half else "constant"
        padded = F.pad(batch.unsqueeze(1), (half, half), mode=mode).squeeze(1)  # (B, samples + n_fft)
        features = self.from_padded(padded)
        return features[0] if single else features

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """Frames of an already padded waveform (B, samples), one every hop starting at sample 0 —
        for callers that stream long audio and pad its ends themselves. -> (B, frames, n_mels)."""
        c = self.config
        # float32 even under bf16 autocast: log of small magnitudes needs the mantissa, and the
        # front end costs little next to the network.
        device_type = padded.device.type
        no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                       else contextlib.nullcontext())
        with no_autocast:
            spectrum = torch.stft(padded.float(), c.n_fft, c.hop_length, window=self.window.float(), center=False,
                                  return_complex=True)  # (B, bins, frames)
            mel = torch.matmul(self.filterbank.float(), spectrum.abs())  # (B, n_mels, frames)
            return torch.log(torch.clamp(mel, min=c.log_floor)).transpose(1, 2)  # (B, frames, n_mels)


@functools.lru_cache(maxsize=2)  # each holds its kernels: ~70 MB at the defaults and 16 kHz
def _cqt_module(sample_rate: int, hop_length: int, fmin: float, n_bins: int, bins_per_octave: int, device: str):
    from nnAudio.features import CQT  # imported on use: nnAudio takes ~1 s to import

    # Constant padding: the lowest kernels are longer than a short clip, where reflect would fail.
    module = CQT(sr=sample_rate, hop_length=hop_length, fmin=fmin, n_bins=n_bins, bins_per_octave=bins_per_octave,
                 pad_mode="constant", output_format="Magnitude", verbose=False)
    return module.to(device)


def cqt_spectrogram(waveform, sample_rate: int, hop_length: int, fmin: float = 27.5, n_bins: int = 88 * 3,
                    bins_per_octave: int = 36, log_floor: float = 1e-5) -> torch.Tensor:
    """Log-magnitude constant-Q spectrogram of a mono waveform ((samples,), numpy or torch) ->
    (frames, n_bins) float32, frames = num_frames(samples, hop_length). Bin k is centred on
    fmin * 2 ** (k / bins_per_octave): by default three bins per semitone from A0 (27.5 Hz)."""
    signal = (waveform if torch.is_tensor(waveform) else torch.from_numpy(np.asarray(waveform))).float()
    if signal.dim() != 1:
        raise MusefmError(f"cqt_spectrogram takes one mono waveform (samples,), got shape {tuple(signal.shape)}")
    top_hz = fmin * 2 ** ((n_bins - 1) / bins_per_octave)
    if top_hz >= sample_rate / 2:
        raise MusefmError(f"CQT top bin {top_hz:.0f} Hz is above the Nyquist frequency {sample_rate / 2:.0f} Hz")
    module = _cqt_module(sample_rate, hop_length, float(fmin), n_bins, bins_per_octave, str(signal.device))
    with torch.no_grad():
        magnitude = module(signal)[0]  # (n_bins, frames)
    return torch.log(torch.clamp(magnitude, min=log_floor)).T.contiguous()  # (frames, n_bins)


def file_sha256(path, block_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """Features per audio file as ``<root>/<key[:2]>/<key>.npy``. The key hashes the file's content,
    the config, the compute function's name and FEATURE_VERSION, so a changed file, setting or
    feature never reads a stale entry (and a moved file still hits)."""

    def __init__(self, root):
        self.root = Path(root)

    def key(self, audio_path, config, compute_fn: Callable) -> str:
        settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        identity = {"content": file_sha256(audio_path), "config": settings, "version": FEATURE_VERSION,
                    "feature": f"{compute_fn.__module__}.{compute_fn.__qualname__}"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def get(self, audio_path, config, compute_fn: Callable) -> np.ndarray:
        """The cached array, or ``compute_fn(audio_path, config)`` computed, stored and returned."""
        key = self.key(audio_path, config, compute_fn)
        path = self.root / key[:2] / f"{key}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                pass  # an unreadable entry is recomputed and overwritten
        features = np.asarray(compute_fn(audio_path, config))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy_atomic(path, features)
        return features


def log_mel_for_file(path, config: MelConfig | None = None, cache: FeatureCache | None = None,
                     chunk_seconds: float = 60.0) -> np.ndarray:
    """Log-mel features of an audio file -> (frames, n_mels) float32, equal (to float rounding) to
    ``LogMelSpectrogram(config)(load_audio(path, config.sample_rate)[0])`` but in bounded memory."""
    config = config or MelConfig()
    if cache is not None:
        return cache.get(path, config, lambda p, c: _streamed_log_mel(p, c, chunk_seconds))
    return _streamed_log_mel(path, config, chunk_seconds)


def _streamed_log_mel(path, config: MelConfig, chunk_seconds: float) -> np.ndarray:
    return np.concatenate(list(iter_log_mel(path, config, chunk_seconds)))


def iter_log_mel(path, config: MelConfig | None = None, chunk_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """Log-mel frames of an audio file as they stream in: float32 ``(frames, n_mels)`` blocks that
    concatenate to ``log_mel_for_file(path, config)``; memory stays bounded by a chunk of audio.

    The buffer keeps what the next frame still needs, and the two ends are reflect padded exactly
    as torch.stft(center=True) pads the whole signal."""
    config = config or MelConfig()
    module = LogMelSpectrogram(config)
    half, hop = config.n_fft // 2, config.hop_length
    chunk_seconds = max(chunk_seconds, 2.0 * config.n_fft / config.sample_rate)  # chunk > pad
    chunks = iter_audio_chunks(path, config.sample_rate, chunk_seconds)
    first = next(chunks, None)
    if first is None:  # the header promised frames that the data does not hold
        raise BadInputError(path, "audio has no samples (no decodable frames)")
    second = next(chunks, None)
    if second is None:  # one chunk is the whole file: no streaming needed
        with torch.no_grad():
            yield module(torch.from_numpy(first)).numpy()
        return
    buffer = np.concatenate([first[half:0:-1], first])  # left reflect pad, as torch does

    def frames_of(samples: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(every whole frame in ``samples`` or None, the samples later frames still need)."""
        frames = 0 if len(samples) < config.n_fft else 1 + (len(samples) - config.n_fft) // hop
        if not frames:
            return None, samples
        used = torch.from_numpy(samples[: (frames - 1) * hop + config.n_fft]).unsqueeze(0)  # (1, samples)
        with torch.no_grad():
            return module.from_padded(used)[0].numpy(), samples[frames * hop:]  # (frames, n_mels) float32

    signal_end = first[-(half + 1):]  # the last half + 1 samples so far, for the right reflect pad
    for chunk in itertools.chain([second], chunks):  # lazily: a list would hold the whole file
        block, buffer = frames_of(np.concatenate([buffer, chunk]))
        if block is not None:
            yield block
        signal_end = np.concatenate([signal_end, chunk])[-(half + 1):]
    block, _ = frames_of(np.concatenate([buffer, signal_end[-2::-1]]))  # right reflect pad, as torch does
    if block is not None:
        yield block
