"""Small music-theory helpers shared by the corpus, the dataset card and augmentation.

Keys are named like ``"G major"`` / ``"E minor"`` (sharps preferred for major keys with up to six
sharps, flats for flat keys), so that a transposed label is always spelled the same way.
"""

from __future__ import annotations

import numpy as np

PITCH_CLASS_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")

# Krumhansl-Kessler key profiles (probe-tone ratings), index 0 = tonic.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def key_name(tonic_pc: int, mode: str) -> str:
    return f"{PITCH_CLASS_NAMES[tonic_pc % 12]} {mode}"


def parse_key(name: str) -> tuple[int, str]:
    """``"G major"`` -> (7, "major"). Accepts the spellings of PITCH_CLASS_NAMES and enharmonics."""
    tonic, mode = name.split()
    letter = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}[tonic[0].upper()]
    accidental = tonic[1:].replace("b", "-").replace("#", "+")
    pc = (letter + accidental.count("+") - accidental.count("-")) % 12
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} in key {name!r}")
    return pc, mode


def transpose_key(name: str | None, semitones: int) -> str | None:
    """The key label after transposing the music by ``semitones``; None stays None."""
    if not name:
        return name
    pc, mode = parse_key(name)
    return key_name(pc + semitones, mode)


def key_index(name: str | None) -> int:
    """Class index in 0..23 (12 major then 12 minor), or -1 when unknown."""
    if not name:
        return -1
    pc, mode = parse_key(name)
    return pc + 12 * MODES.index(mode)


def key_from_signature(sharps: int, mode: str) -> str:
    """Key name from a key signature's number of sharps (negative = flats) and its mode."""
    major_tonic = (7 * sharps) % 12
    return key_name(major_tonic if mode == "major" else major_tonic - 3, mode)


def pitch_class_histogram(pitches: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """Duration-weighted pitch-class histogram, shape (12,)."""
    return np.bincount(np.asarray(pitches, dtype=np.int64) % 12, weights=durations, minlength=12)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when one side is constant (e.g. all 12 pitch classes equally used)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def estimate_key(pitches: np.ndarray, durations: np.ndarray, sharps: int | None = None) -> str | None:
    """Krumhansl-Schmuckler key estimate from notes.

    With a key signature (``sharps``) only its relative major and minor are considered, which is
    how a reader decides the mode of a notated piece; without one, all 24 keys compete.
    """
    histogram = pitch_class_histogram(pitches, durations)
    if histogram.sum() <= 0:
        return None
    candidates = []
    if sharps is not None:
        major_tonic = (7 * sharps) % 12
        candidates = [(major_tonic, "major"), ((major_tonic - 3) % 12, "minor")]
    else:
        candidates = [(pc, mode) for mode in MODES for pc in range(12)]
    best, best_score = None, -np.inf
    for tonic, mode in candidates:
        profile = np.roll(_MAJOR_PROFILE if mode == "major" else _MINOR_PROFILE, tonic)
        score = _correlation(histogram, profile)
        if score > best_score:
            best, best_score = key_name(tonic, mode), score
    return best if best is not None else (key_from_signature(sharps, "major") if sharps is not None else None)
