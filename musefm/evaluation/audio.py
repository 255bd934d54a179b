"""Fréchet Audio Distance between two sets of audio files: FAD, FAD-infinity and per-song FAD.

Definitions (Kilgour et al. 2019; Gui et al., "Adapting Frechet Audio Distance for Generative Music
Evaluation", ICASSP 2024):

- An embedding model turns mono audio at its ``sample_rate`` into frame-level vectors (frames, dim).
  ``LogMelStatsEmbedding`` (no weights): per 1 s window every 0.5 s, the mean and std over time of
  each log-mel band. ``TranscriberEmbedding``: the transcriber's conv-stack features averaged over
  the same windows. Any object with ``name``, ``sample_rate`` and ``embed`` plugs in.
- FAD: the Fréchet distance between Gaussians fitted (mean, covariance with ddof=1) to all frames of
  each set pooled: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).
- FAD-inf: FAD of random subsets of N test frames, fitted as slope / N + intercept by least squares
  over N from ``min_fraction`` of the frames to all of them; the intercept is FAD at N -> infinity.
  Subsets are drawn *without* replacement: a random subset of an iid sample is an iid sample of size
  N, so the line extrapolates towards the true distance (bootstrap draws would extrapolate to the
  full set's own biased FAD). The reference statistics are not subsampled: their bias remains.
- Per-song FAD: each generated file's frames against the pooled reference statistics.

Undefined values are NaN with a reason in ``AudioEvalResult.reasons``, never a crash: a set needs
more frames than dimensions (else its covariance is singular); a song needs at least 2 frames.
Mismatched sample rates: every file is read at the embedding's rate (soxr), in chunks with bounded
memory; each set's original rates are recorded, with a note when they differ. Unreadable, empty and
NaN files are skipped and listed in ``rejected``; silent audio is valid and counts.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
import torch

from musefm.atomic import write_text_atomic
from musefm.audio.features import LogMelSpectrogram, MelConfig
from musefm.audio.io import AUDIO_EXTENSIONS, audio_info, iter_audio_chunks
from musefm.errors import BadInputError, MusefmError
from musefm.evaluation.report import format_number

BATCH_WINDOWS = 32  # windows embedded at once: bounds the conv stack's activations


class AudioEmbedding(Protocol):
    name: str
    sample_rate: int

    def embed(self, audio: np.ndarray) -> np.ndarray:
        """Mono float32 audio (samples,) at ``sample_rate`` -> (frames, dim)."""


class WindowedEmbedding(abc.ABC):
    """One vector per window of ``window_seconds`` every ``hop_seconds``; audio shorter than one
    window is one (shorter) window. Subclasses implement ``embed_windows``."""

    name, dim = "windowed", 0

    def __init__(self, sample_rate: int, window_seconds: float, hop_seconds: float):
        if not 0 < hop_seconds <= window_seconds:
            raise MusefmError(f"embedding windows need 0 < hop_seconds <= window_seconds, got {hop_seconds}, {window_seconds}")
        self.sample_rate, self.window_seconds, self.hop_seconds = int(sample_rate), window_seconds, hop_seconds
        self.window_samples = max(1, round(window_seconds * sample_rate))
        self.hop_samples = max(1, round(hop_seconds * sample_rate))

    def embed(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise MusefmError(f"{self.name}: expects mono audio (samples,), got shape {audio.shape}")
        if len(audio) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(audio) < self.window_samples:
            windows = audio[None]  # (1, samples)
        else:
            count = 1 + (len(audio) - self.window_samples) // self.hop_samples
            windows = np.lib.stride_tricks.sliding_window_view(audio, self.window_samples)[::self.hop_samples][:count]
        parts = [self.embed_windows(windows[start:start + BATCH_WINDOWS].copy())
                 for start in range(0, len(windows), BATCH_WINDOWS)]
        return np.concatenate(parts).astype(np.float32)  # (frames, dim)

    @abc.abstractmethod
    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """(W, samples) float32 -> (W, dim); each embedding defines it."""

    def settings(self) -> dict:
        return {"sample_rate": self.sample_rate, "window_seconds": self.window_seconds, "hop_seconds": self.hop_seconds}


class LogMelStatsEmbedding(WindowedEmbedding):
    """Mean and std over time of each log-mel band per window: dim 2 * n_mels, deterministic."""

    def __init__(self, window_seconds: float = 1.0, hop_seconds: float = 0.5, mel: MelConfig | None = None):
        self.mel_config = mel or MelConfig(sample_rate=16000, n_fft=1024, hop_length=160, n_mels=64)
        super().__init__(self.mel_config.sample_rate, window_seconds, hop_seconds)
        self.spectrogram = LogMelSpectrogram(self.mel_config)
        self.dim = 2 * self.mel_config.n_mels
        self.name = f"logmel-stats-{self.mel_config.n_mels}"

    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            mel = self.spectrogram(torch.from_numpy(windows))  # (W, T, n_mels)
            # Population std: a window of a single STFT frame gets 0, not NaN.
            return torch.cat([mel.mean(dim=1), mel.std(dim=1, unbiased=False)], dim=-1).numpy()  # (W, 2 * n_mels)

    def settings(self) -> dict:
        return {**super().settings(), "mel": dataclasses.asdict(self.mel_config)}


class TranscriberEmbedding(WindowedEmbedding):
    """The transcriber's conv-stack features (B, T, d_model) averaged over each window: dim d_model."""

    def __init__(self, model, window_seconds: float = 1.0, hop_seconds: float = 0.5):
        super().__init__(model.config.sample_rate, window_seconds, hop_seconds)
        self.model = model.eval()
        self.dim = model.config.d_model
        self.name = f"transcriber-conv-{self.dim}"

    @classmethod
    def from_shipped(cls, **kwargs) -> "TranscriberEmbedding":
        from musefm.transcription.transcribe import load_transcriber

        return cls(load_transcriber(), **kwargs)

    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            mel = self.model.mel(torch.from_numpy(windows).to(device))  # (W, T, n_mels)
            return self.model.acoustic_features(mel).mean(dim=1).float().cpu().numpy()  # (W, d_model)


def embed_file(embedding: AudioEmbedding, path, chunk_seconds: float = 60.0) -> np.ndarray:
    """Frames (frames, dim) of one file read in chunks at the embedding's rate; a windowed embedding
    gives exactly ``embedding.embed(whole file)``. Raises BadInputError for an unusable file."""
    chunks = iter_audio_chunks(path, embedding.sample_rate, chunk_seconds)
    if not isinstance(embedding, WindowedEmbedding):  # unknown framing: chunks embedded one by one
        parts = [np.asarray(embedding.embed(chunk), dtype=np.float32) for chunk in chunks]
    else:
        parts, pending, emitted = [], np.zeros(0, dtype=np.float32), False
        for chunk in chunks:
            pending = np.concatenate([pending, chunk])  # samples from the next window's start on
            if len(pending) >= embedding.window_samples:
                count = 1 + (len(pending) - embedding.window_samples) // embedding.hop_samples
                parts.append(embedding.embed(pending[:(count - 1) * embedding.hop_samples + embedding.window_samples]))
                pending, emitted = pending[count * embedding.hop_samples:], True
        if not emitted:
            parts.append(embedding.embed(pending))  # shorter than one window
    frames = np.concatenate([part.reshape(len(part), -1) for part in parts])
    if len(frames) == 0 or not np.isfinite(frames).all():
        raise BadInputError(path, f"{embedding.name} gave {'no' if len(frames) == 0 else 'non-finite'} embedding frames")
    return frames


# ---- distances --------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), as pytorch-fid / fadtk compute it: eps * I
    is added to both covariances when S1 S2 is (near) singular, a small imaginary part from rounding
    is dropped, a large one is an error. Rounding below 0 is clamped (the distance is >= 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = len(mu1)
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise MusefmError(f"frechet_distance: shapes differ: means {mu1.shape} {mu2.shape}, "
                          f"covariances {sigma1.shape} {sigma2.shape}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(warning.category, scipy.linalg.LinAlgWarning) for warning in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MusefmError(f"frechet_distance: sqrt(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():.3g} "
                              "(covariances not positive semi-definite?)")
        covmean = covmean.real
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _pool(embeddings, label: str) -> np.ndarray:
    """A list of (frames, dim) arrays -> (all frames, dim) float64."""
    arrays = [np.asarray(item, dtype=np.float64) for item in embeddings]
    dims = {item.shape[1] for item in arrays if item.ndim == 2}
    if not arrays or any(item.ndim != 2 for item in arrays) or len(dims) != 1:
        raise MusefmError(f"{label}: expected a non-empty list of (frames, dim) arrays of one dim, "
                          f"got shapes {[item.shape for item in arrays][:5]}")
    return np.concatenate(arrays)


def _statistics(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return frames.mean(axis=0), np.atleast_2d(np.cov(frames, rowvar=False))  # (dim,), (dim, dim)


def _shortage(frames: np.ndarray, label: str, full_rank: bool = True) -> str | None:
    """Why ``frames`` cannot give a usable covariance, or None."""
    count, dim = frames.shape
    if count < 2:
        return f"{label} has {count} embedding frame(s); a covariance needs at least 2"
    if full_rank and count <= dim:
        return (f"{label} has {count} embedding frames for {dim} dimensions: its covariance is singular "
                f"(needs at least {dim + 1}; use more or longer audio)")
    return None


def _distance(statistics, frames: np.ndarray) -> tuple[float, str | None]:
    try:
        return frechet_distance(*statistics, *_statistics(frames)), None
    except MusefmError as error:
        return math.nan, str(error)


def _fad_with_reason(reference, test) -> tuple[float, str | None]:
    reference, test = _pool(reference, "reference set"), _pool(test, "test set")
    reason = _shortage(reference, "reference set") or _shortage(test, "test set")
    return (math.nan, reason) if reason else _distance(_statistics(reference), test)


def fad(reference_embeddings: list[np.ndarray], test_embeddings: list[np.ndarray]) -> float:
    """FAD between all frames of each set pooled; NaN when a set has too few frames."""
    return _fad_with_reason(reference_embeddings, test_embeddings)[0]


@dataclass
class FadInfinity:
    value: float  # the intercept: FAD extrapolated to infinitely many test frames (may dip below 0)
    slope: float
    r2: float
    points: list[tuple[int, float]] = field(default_factory=list)  # (subset size N, FAD)
    reason: str | None = None  # why value is NaN


def fad_infinity(reference: list[np.ndarray], test: list[np.ndarray], num_points: int = 15,
                 min_fraction: float = 0.2, seed: int = 0) -> FadInfinity:
    """FAD-inf (Gui et al. 2024): see the module docstring."""
    if num_points < 3 or not 0 < min_fraction <= 1:
        raise MusefmError(f"fad_infinity needs num_points >= 3 and 0 < min_fraction <= 1, got {num_points}, {min_fraction}")
    reference, test = _pool(reference, "reference set"), _pool(test, "test set")
    count, dim = test.shape
    smallest = max(dim + 1, math.ceil(min_fraction * count))  # every subset keeps a full-rank covariance
    sizes = np.unique(np.linspace(smallest, count, num_points).astype(int))
    reason = _shortage(reference, "reference set") or _shortage(test, "test set")
    if reason is None and len(sizes) < 3:
        reason = f"test set has {count} frames: too few subset sizes above {dim} for an extrapolation (needs 3)"
    statistics, rng, values = (None if reason else _statistics(reference)), np.random.default_rng(seed), []
    for size in [] if reason else sizes:
        value, reason = _distance(statistics, test[rng.choice(count, size=int(size), replace=False)])  # (size, dim)
        if reason:
            break
        values.append(value)
    if reason:
        return FadInfinity(math.nan, math.nan, math.nan, reason=reason)
    inverse, values = 1.0 / sizes, np.array(values)
    slope, intercept = np.polyfit(inverse, values, 1)
    residual = float(np.sum((values - (slope * inverse + intercept)) ** 2))
    total = float(np.sum((values - values.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else math.nan)
    return FadInfinity(float(intercept), float(slope), float(r2), [(int(n), float(v)) for n, v in zip(sizes, values)])


def _per_song_with_reasons(reference, test_songs) -> list[tuple[float, str | None]]:
    reference = _pool(reference, "reference set")
    reason = _shortage(reference, "reference set")
    statistics = None if reason else _statistics(reference)
    results = []
    for song in test_songs:
        frames = _pool([song], "song")
        # A song may have fewer frames than dimensions: per-song FAD ranks songs (Gui et al.), the
        # (pseudo-)inverse is never needed, and sqrtm's eps fallback covers the singular product.
        why = reason or _shortage(frames, "song", full_rank=False)
        results.append((math.nan, why) if why else _distance(statistics, frames))
    return results


def per_song_fad(reference: list[np.ndarray], test_songs: list[np.ndarray]) -> list[float]:
    """Each song's frames against the pooled reference statistics; NaN for a song with < 2 frames."""
    return [value for value, _ in _per_song_with_reasons(reference, test_songs)]


# ---- files in, report out ---------------------------------------------------------------------

@dataclass
class AudioEvalResult:
    embedding: str
    fad: float
    fad_inf: float
    fad_inf_slope: float
    fad_inf_r2: float
    per_song: dict[str, float]  # generated file -> its FAD against the reference set
    files: dict[str, int]  # set -> files embedded
    frames: dict[str, int]  # set -> embedding frames
    sample_rates: dict[str, dict[int, int]]  # set -> {original sample rate: files}
    rejected: list[dict] = field(default_factory=list)  # {"set", "path", "reason"}
    reasons: dict[str, str] = field(default_factory=dict)  # "fad", "fad_inf" or a file -> why it is NaN
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        def clean(value):
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {str(key): clean(item) for key, item in value.items()}
            return [clean(item) for item in value] if isinstance(value, (list, tuple)) else value
        return clean(asdict(self))

    def to_markdown(self) -> str:
        def table(header, rows):
            lines = [header, ["---"] * len(header), *rows]
            return "\n".join("| " + " | ".join(str(cell).replace("|", "\\|") for cell in line) + " |" for line in lines) + "\n"

        summary = [["FAD", format_number(self.fad)],
                   ["FAD-inf", format_number(self.fad_inf)],
                   ["FAD-inf slope / r²", f"{format_number(self.fad_inf_slope)} / {format_number(self.fad_inf_r2)}"],
                   *([f"{name} files / frames", f"{self.files[name]} / {self.frames[name]}"] for name in self.files),
                   *([f"{name} sample rates", ", ".join(f"{rate} Hz × {n}" for rate, n in sorted(rates.items()))]
                     for name, rates in self.sample_rates.items())]
        parts = ["# Audio report (FAD)\n", f"Embedding `{self.embedding}`; generated set against the reference set.\n",
                 table(["measure", "value"], summary)]
        if self.per_song:
            ordered = sorted(self.per_song.items(), key=lambda item: -item[1] if item[1] == item[1] else math.inf)  # NaN last
            parts += ["## Per-song FAD (furthest first)\n", table(["file", "FAD"], [[name, format_number(value)] for name, value in ordered])]
        if self.reasons:
            parts += ["## Undefined values\n", table(["value", "reason"], [[key, reason] for key, reason in self.reasons.items()])]
        if self.rejected:
            parts += [f"## Rejected files ({len(self.rejected)})\n",
                      table(["set", "file", "reason"], [[item["set"], item["path"], item["reason"]] for item in self.rejected])]
        if self.notes:
            parts += ["## Notes\n", *(f"- {note}" for note in self.notes), ""]
        parts += ["## Settings\n", table(["setting", "value"], [[key, json.dumps(value)] for key, value in self.settings.items()])]
        return "\n".join(parts)

    def write(self, out_dir: Path) -> Path:
        """audio_report.json, audio_report.md (and audio_rejected.jsonl when files were rejected), each atomically."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "audio_report.json", json.dumps(self.to_dict(), indent=2) + "\n")
        write_text_atomic(out_dir / "audio_report.md", self.to_markdown())
        if self.rejected:
            write_text_atomic(out_dir / "audio_rejected.jsonl", "".join(json.dumps(item) + "\n" for item in self.rejected))
        return out_dir


def _audio_files(spec) -> list[Path]:
    """A folder (searched recursively for audio extensions), a file, or a list of either."""
    files = []
    for item in [spec] if isinstance(spec, (str, Path)) else list(spec):
        path = Path(item)
        files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS) if path.is_dir() else [path]
    return files


def _resolve_embedding(embedding) -> AudioEmbedding:
    if embedding == "logmel":
        return LogMelStatsEmbedding()
    if embedding == "transcriber":
        return TranscriberEmbedding.from_shipped()
    if isinstance(embedding, str) or not all(hasattr(embedding, name) for name in ("name", "sample_rate", "embed")):
        raise MusefmError(f"unknown embedding {embedding!r}: use 'logmel', 'transcriber' or an object with name, sample_rate and embed")
    return embedding


def _embed_set(label: str, spec, model, chunk_seconds: float, rejected: list) -> tuple[dict, dict]:
    """{file: frames} of one set's readable files and {original sample rate: files}; the others are
    appended to ``rejected``. No readable file at all is an error."""
    embedded, rates = {}, Counter()
    for path in _audio_files(spec):
        try:
            rate = audio_info(path).sample_rate
            embedded[str(path)] = embed_file(model, path, chunk_seconds)
            rates[rate] += 1
        except BadInputError as error:
            rejected.append({"set": label, "path": error.path, "reason": error.reason})
    if not embedded:
        mine = [item for item in rejected if item["set"] == label]
        first = f"; first: {mine[0]['path']}: {mine[0]['reason']}" if mine else ""
        raise MusefmError(f"the {label} set has no readable audio files ({len(mine)} rejected{first})")
    return embedded, dict(sorted(rates.items()))


def evaluate_audio_sets(generated, reference, embedding="logmel", out: Path | None = None, num_points: int = 15,
                        min_fraction: float = 0.2, seed: int = 0, chunk_seconds: float = 60.0) -> AudioEvalResult:
    """FAD, FAD-inf and per-song FAD of the ``generated`` audio against the ``reference`` audio (each a
    folder, a file or a list); bad files are skipped and listed. Writes the report to ``out`` if given."""
    model = _resolve_embedding(embedding)
    rejected = []
    songs, generated_rates = _embed_set("generated", generated, model, chunk_seconds, rejected)
    references, reference_rates = _embed_set("reference", reference, model, chunk_seconds, rejected)
    generated_frames, reference_frames = list(songs.values()), list(references.values())
    value, reason = _fad_with_reason(reference_frames, generated_frames)
    reasons = {"fad": reason} if reason else {}
    infinity = fad_infinity(reference_frames, generated_frames, num_points, min_fraction, seed)
    if infinity.reason:
        reasons["fad_inf"] = infinity.reason
    per_song = dict(zip(songs, _per_song_with_reasons(reference_frames, generated_frames)))
    reasons.update({name: why for name, (_, why) in per_song.items() if why})
    notes, seen = [], set(generated_rates) | set(reference_rates)
    if len(seen) > 1:
        notes.append(f"original sample rates differ (generated {sorted(generated_rates)}, reference {sorted(reference_rates)} Hz); "
                     f"all audio was resampled to {model.sample_rate} Hz"
                     + (f", so content above {min(seen) / 2:g} Hz is missing from some files and counts towards FAD"
                        if min(seen) < model.sample_rate else ""))
    settings = {"embedding_sample_rate": model.sample_rate, "num_points": num_points, "min_fraction": min_fraction,
                "seed": seed, "chunk_seconds": chunk_seconds, "embedding": getattr(model, "settings", dict)()}
    result = AudioEvalResult(
        model.name, value, infinity.value, infinity.slope, infinity.r2,
        per_song={name: song_value for name, (song_value, _) in per_song.items()},
        files={"generated": len(songs), "reference": len(references)},
        frames={"generated": sum(map(len, generated_frames)), "reference": sum(map(len, reference_frames))},
        sample_rates={"generated": generated_rates, "reference": reference_rates},
        rejected=rejected, reasons=reasons, notes=notes, settings=settings)
    if out is not None:
        result.write(out)
    return result
