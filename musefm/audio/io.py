"""Reading and writing audio files: whole (``load_audio``) or streamed in bounded memory
(``iter_audio_chunks``), resampled with soxr, and note arrays shared by transcription code.

Every problem with a file becomes a one-line ``BadInputError(path, reason)``: missing, not audio,
empty, NaN/inf samples, unsupported extension. Silent audio is valid.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile
import soxr

from musefm.errors import BadInputError, MusefmError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
TRANSCRIPTION_SAMPLE_RATE = 16000
NOTE_COLUMNS = ("onset", "offset", "pitch", "velocity")  # seconds, seconds, MIDI pitch, 1..127
NORMALIZE_PEAK = 0.95
RESAMPLE_QUALITY = "HQ"
READ_BLOCK_FRAMES = 65536  # streaming read size: ~1.5 s at 44.1 kHz, a few MB at 8 channels
WRITE_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".aif": "AIFF", ".aiff": "AIFF"}


def empty_notes() -> np.ndarray:
    """A notes array with no notes: shape (0, 4), columns ``NOTE_COLUMNS``."""
    return np.zeros((0, len(NOTE_COLUMNS)), dtype=np.float64)


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int
    duration_seconds: float
    format: str  # container, e.g. "WAV", "FLAC"
    subtype: str  # sample encoding, e.g. "PCM_16", "FLOAT"


def _open(path) -> soundfile.SoundFile:
    """Open for reading, turning every way a file can be unusable into a BadInputError."""
    path = Path(path)
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        raise BadInputError(path, f"unsupported audio extension {path.suffix or '(none)'!r}; "
                                  f"expected one of {', '.join(AUDIO_EXTENSIONS)}")
    if not path.is_file():
        raise BadInputError(path, "file not found")
    try:
        handle = soundfile.SoundFile(str(path))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        detail = getattr(error, "error_string", None) or str(error)
        raise BadInputError(path, f"not a readable audio file ({detail})") from None
    if handle.frames <= 0:
        handle.close()
        raise BadInputError(path, "audio has no samples (0 frames)")
    if handle.samplerate <= 0:
        handle.close()
        raise BadInputError(path, f"invalid sample rate {handle.samplerate}")
    return handle


def _read_block(path, handle: soundfile.SoundFile, frames: int) -> np.ndarray:
    """Read up to ``frames`` frames as float32 (frames, channels); decoding errors and
    non-finite samples become BadInputError."""
    start = handle.tell()
    try:
        block = handle.read(frames, dtype="float32", always_2d=True)  # (frames, channels)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        detail = getattr(error, "error_string", None) or str(error)
        raise BadInputError(path, f"audio data cannot be decoded ({detail})") from None
    if not np.isfinite(block).all():
        first_bad = int(np.argmax(~np.isfinite(block).all(axis=1)))
        seconds = (start + first_bad) / handle.samplerate
        raise BadInputError(path, f"audio contains NaN or infinite samples (first at {seconds:.3f} s)")
    return block


def audio_info(path) -> AudioInfo:
    with _open(path) as handle:
        return AudioInfo(path=str(path), sample_rate=handle.samplerate, channels=handle.channels,
                         frames=handle.frames, duration_seconds=handle.frames / handle.samplerate,
                         format=handle.format, subtype=handle.subtype)


def load_audio(path, sample_rate: int | None = None, mono: bool = True, normalize: bool = False,
               max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """The whole file (or its first ``max_seconds``) as float32: (samples,) when ``mono`` (mean of
    the channels), else (samples, channels); resampled to ``sample_rate`` when given. Returns
    (audio, sample_rate)."""
    with _open(path) as handle:
        native_rate = handle.samplerate
        frames = handle.frames if max_seconds is None else min(handle.frames, max(1, int(max_seconds * native_rate)))
        audio = _read_block(path, handle, frames)  # (frames, channels)
    if mono:
        audio = audio.mean(axis=1, dtype=np.float32)  # (frames,)
    rate = native_rate
    if sample_rate is not None and sample_rate != native_rate:
        audio = soxr.resample(np.ascontiguousarray(audio), native_rate, sample_rate, quality=RESAMPLE_QUALITY)
        rate = sample_rate
    if normalize:
        audio = normalize_peak(audio)
    return np.ascontiguousarray(audio, dtype=np.float32), rate


def normalize_peak(audio: np.ndarray, peak: float = NORMALIZE_PEAK) -> np.ndarray:
    """Scale so the largest magnitude is ``peak``; silence stays silence."""
    largest = float(np.max(np.abs(audio))) if audio.size else 0.0
    if largest == 0.0:
        return audio
    return (audio * (peak / largest)).astype(np.float32)


def iter_audio_chunks(path, sample_rate: int | None, chunk_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """Stream the file as mono float32 chunks of ``round(chunk_seconds * sample_rate)`` samples
    (the last one shorter) at ``sample_rate`` (None keeps the file's rate).

    Memory stays bounded by a chunk plus a read block, whatever the file's length. One soxr
    ResampleStream carries its filter state across blocks, so the chunks concatenated equal
    ``load_audio(path, sample_rate)[0]`` (no clicks at chunk boundaries).
    """
    with _open(path) as handle:
        native_rate = handle.samplerate
        target_rate = sample_rate or native_rate
        chunk_samples = max(1, int(round(chunk_seconds * target_rate)))
        resampler = (soxr.ResampleStream(native_rate, target_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
                     if target_rate != native_rate else None)
        pending: list[np.ndarray] = []  # resampled mono pieces not yet yielded
        pending_samples = 0
        remaining = handle.frames
        while remaining > 0:
            block = _read_block(path, handle, min(READ_BLOCK_FRAMES, remaining))
            if len(block) == 0:  # header promised more frames than the data holds
                break
            remaining -= len(block)
            mono = block.mean(axis=1, dtype=np.float32)  # (frames,)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=remaining <= 0)
            pending.append(mono)
            pending_samples += len(mono)
            if pending_samples >= chunk_samples:
                joined = np.concatenate(pending)
                whole = len(joined) - len(joined) % chunk_samples
                for start in range(0, whole, chunk_samples):
                    yield joined[start:start + chunk_samples]
                pending, pending_samples = [joined[whole:]], len(joined) - whole
        if resampler is not None and remaining > 0:  # stopped early: flush the filter's tail
            pending.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
            pending_samples += len(pending[-1])
        tail = np.concatenate(pending) if pending else np.zeros(0, dtype=np.float32)
        for start in range(0, len(tail), chunk_samples):
            yield tail[start:start + chunk_samples]


def save_audio(path, audio: np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Write ``audio`` ((samples,) or (samples, channels)) atomically: a temporary file beside the
    destination renamed into place, so a crash never leaves half a file. The container comes from
    the extension; ``subtype`` defaults to PCM_16 (VORBIS for .ogg). Out-of-range samples are
    clipped by libsndfile for integer subtypes."""
    path = Path(path)
    container = WRITE_FORMATS.get(path.suffix.lower())
    if container is None:
        raise MusefmError(f"{path}: cannot write {path.suffix or 'files without an extension'!r}; "
                          f"use one of {', '.join(WRITE_FORMATS)}")
    subtype = subtype or ("VORBIS" if container == "OGG" else "PCM_16")
    if not soundfile.check_format(container, subtype):
        raise MusefmError(f"{path}: {container} files cannot hold {subtype} samples")
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[0] == 0:
        raise MusefmError(f"{path}: audio must be (samples,) or (samples, channels) and not empty, got {audio.shape}")
    if not np.isfinite(audio).all():
        raise MusefmError(f"{path}: refusing to write NaN or infinite samples")
    path.parent.mkdir(parents=True, exist_ok=True)
    # soundfile writes by file name, so atomic.py's handle-based helpers do not fit; same pattern.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix + ".tmp")
    os.close(descriptor)
    try:
        soundfile.write(temporary, audio, sample_rate, subtype=subtype, format=container)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
