"""Detecting generated music copied from the training set.

Representation. A piece is reduced to its top-line melody (the skyline): among its non-drum
notes, at each distinct onset time the highest note starting then, unless a higher note that
started earlier still sounds (a note struck under a held melody note is accompaniment). A copied
tune is the copy a listener recognises, and it survives a changed accompaniment; all notes in
onset order would interleave the voices, so a copied melody over new harmony would share no
n-gram with its source.
Each melody note after the first becomes one token, (pitch interval from the previous melody note
in semitones, clipped to +-127; its written duration in twelfths of a quarter, rounded, clipped to
1..255). Intervals make the tokens transposition-invariant and quarter-based durations make them
independent of the file's ticks per quarter.

Index. Every run of n consecutive tokens of a training piece (an n-gram, n = 8 by default: nine
notes) is hashed to 64 bits and kept, sorted, with the piece and position it occurs at; the token
sequences are kept too, so that a reported copy is confirmed token by token.

Check of a generated piece:

- ``copied_ngram_share``: the share of its n-grams found anywhere in the index; NaN when it has
  none (a melody of at most n notes).
- ``longest_copied_notes``: the longest run of consecutive melody notes equal, up to one
  transposition, to consecutive melody notes of one training piece: L notes match when their L - 1
  tokens do (the first note of the run anchors the transposition; its own duration is not
  compared). Runs are found as chains of n-gram hits on one alignment (training piece, position
  offset), then confirmed on the stored tokens, so runs shorter than n + 1 notes are below the
  index's resolution and report 0.
- ``source_id``: the id of the training piece holding that run, None without one.
- ``flagged``: ``copied_ngram_share >= copied_share_threshold`` or
  ``longest_copied_notes >= copied_notes_threshold``.

scikit-learn style: ``fit`` returns self, learned state ends in ``_``. ``save``/``load`` use a
directory holding ``ngrams.npz`` (arrays, read without pickle) and ``index.json`` (settings, ids).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from symusic import Score

FORMAT_VERSION = 1
ARRAYS_FILE = "ngrams.npz"
SETTINGS_FILE = "index.json"
_MAX_INTERVAL, _MAX_DURATION_STEPS = 127, 255
# Odd multiplier of the polynomial n-gram hash (mod 2^64, numpy's uint64 wrap-around): the
# 64-bit golden-ratio constant, whose bits are well mixed.
_HASH_MULTIPLIER = 0x9E3779B97F4A7C15


def melody_tokens(score: Score, duration_steps_per_quarter: int = 12) -> np.ndarray:
    """Token codes of the score's skyline melody (see the module docstring), shape (notes - 1,).

    A code packs one token as ``(interval + 128) * 256 + duration_steps``.
    """
    onsets, durations, pitches = [], [], []
    for track in score.tracks:
        if track.is_drum:
            continue
        arrays = track.notes.numpy()
        onsets.append(arrays["time"].astype(np.int64))
        durations.append(arrays["duration"].astype(np.int64))
        pitches.append(arrays["pitch"].astype(np.int64))
    if not onsets or sum(len(part) for part in onsets) < 2:
        return np.zeros(0, dtype=np.int64)
    onset, duration, pitch = np.concatenate(onsets), np.concatenate(durations), np.concatenate(pitches)
    order = np.lexsort((-pitch, onset))  # by onset, highest pitch first
    onset, duration, pitch = onset[order], duration[order], pitch[order]
    first_at_onset = np.ones(len(onset), dtype=bool)
    first_at_onset[1:] = onset[1:] != onset[:-1]
    onset_times = onset[first_at_onset]
    # Highest pitch held over each onset time by a note that started before it: one (note, onset
    # time) row for every onset time falling strictly inside a note.
    offset = onset + np.maximum(duration, 1)
    inside_from = np.searchsorted(onset_times, onset, side="right")
    inside_count = np.searchsorted(onset_times, offset, side="left") - inside_from
    inside_count = np.maximum(inside_count, 0)
    rows = np.repeat(inside_from, inside_count) + (
        np.arange(inside_count.sum()) - np.repeat(np.cumsum(inside_count) - inside_count, inside_count)
    )
    highest_held = np.full(len(onset_times), -1)
    np.maximum.at(highest_held, rows, np.repeat(pitch, inside_count))
    top = pitch[first_at_onset] >= highest_held
    duration, pitch = duration[first_at_onset][top], pitch[first_at_onset][top]
    if len(pitch) < 2:
        return np.zeros(0, dtype=np.int64)
    interval = np.clip(np.diff(pitch), -_MAX_INTERVAL, _MAX_INTERVAL)
    steps = np.floor(duration[1:] * duration_steps_per_quarter / score.ticks_per_quarter + 0.5).astype(np.int64)
    steps = np.clip(steps, 1, _MAX_DURATION_STEPS)
    return (interval + 128) * 256 + steps


def ngram_hashes(tokens: np.ndarray, ngram_length: int) -> np.ndarray:
    """64-bit hash of every window of ``ngram_length`` consecutive tokens, shape (T - n + 1,)."""
    if len(tokens) < ngram_length:
        return np.zeros(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), ngram_length)  # (W, n)
    powers = np.array([pow(_HASH_MULTIPLIER, k, 2**64) for k in range(ngram_length)], dtype=np.uint64)
    return (windows * powers).sum(axis=1, dtype=np.uint64)


def _longest_true_run(mask: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D boolean array (0 without any)."""
    if not mask.any():
        return 0
    padded = np.concatenate([[False], mask, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])  # alternately run starts and run ends
    return int((changes[1::2] - changes[::2]).max())


class MemorizationIndex:
    """An n-gram index of training melodies that reports how much of a generated piece is copied."""

    def __init__(
        self,
        ngram_length: int = 8,
        duration_steps_per_quarter: int = 12,
        copied_share_threshold: float = 0.5,
        copied_notes_threshold: int = 16,
    ):
        self.ngram_length = ngram_length
        self.duration_steps_per_quarter = duration_steps_per_quarter
        self.copied_share_threshold = copied_share_threshold
        self.copied_notes_threshold = copied_notes_threshold

    def _settings(self) -> dict:
        return {
            "ngram_length": self.ngram_length,
            "duration_steps_per_quarter": self.duration_steps_per_quarter,
            "copied_share_threshold": self.copied_share_threshold,
            "copied_notes_threshold": self.copied_notes_threshold,
        }

    def fit(self, scores, ids=None) -> "MemorizationIndex":
        """Index the training ``scores``; ``ids`` (default "0", "1", ...) name them in reports."""
        if self.ngram_length < 1:
            raise ValueError(f"ngram_length must be at least 1, got {self.ngram_length}")
        token_lists = [melody_tokens(score, self.duration_steps_per_quarter) for score in scores]
        ids = [str(index) for index in range(len(token_lists))] if ids is None else [str(name) for name in ids]
        if len(ids) != len(token_lists):
            raise ValueError(f"{len(ids)} ids for {len(token_lists)} scores")
        hashes = [ngram_hashes(tokens, self.ngram_length) for tokens in token_lists]
        ngrams_per_piece = [len(piece_hashes) for piece_hashes in hashes]
        all_hashes = np.concatenate([np.zeros(0, np.uint64), *hashes])
        hash_piece = np.repeat(np.arange(len(hashes), dtype=np.int32), ngrams_per_piece)
        hash_position = np.concatenate([np.zeros(0, np.int32), *(np.arange(n, dtype=np.int32) for n in ngrams_per_piece)])
        order = np.argsort(all_hashes, kind="stable")
        self.ids_ = ids
        self.tokens_ = np.concatenate([np.zeros(0, np.int32), *token_lists]).astype(np.int32)
        self.piece_starts_ = np.concatenate([[0], np.cumsum([len(tokens) for tokens in token_lists])]).astype(np.int64)
        self.ngram_hashes_ = all_hashes[order]
        self.ngram_pieces_ = hash_piece[order]
        self.ngram_positions_ = hash_position[order]
        return self

    def _require_fitted(self) -> None:
        if not hasattr(self, "ngram_hashes_"):
            raise RuntimeError("this MemorizationIndex has no training pieces: call fit() or load() first")

    def check(self, score: Score) -> dict:
        """How much of ``score``'s melody is copied from the training set (see the module docstring).

        Returns ``{"longest_copied_notes": int, "copied_ngram_share": float, "source_id": str |
        None, "flagged": bool}``.
        """
        self._require_fitted()
        tokens = melody_tokens(score, self.duration_steps_per_quarter)
        hashes = ngram_hashes(tokens, self.ngram_length)
        if len(hashes) == 0:
            return {"longest_copied_notes": 0, "copied_ngram_share": math.nan, "source_id": None, "flagged": False}
        first = np.searchsorted(self.ngram_hashes_, hashes, side="left")
        last = np.searchsorted(self.ngram_hashes_, hashes, side="right")
        occurrences = last - first
        share = float((occurrences > 0).mean())
        longest, source = self._longest_copy(tokens, first, occurrences)
        flagged = share >= self.copied_share_threshold or longest >= self.copied_notes_threshold
        return {
            "longest_copied_notes": longest,
            "copied_ngram_share": share,
            "source_id": None if source is None else self.ids_[source],
            "flagged": bool(flagged),
        }

    def _longest_copy(self, tokens: np.ndarray, first: np.ndarray, occurrences: np.ndarray) -> tuple[int, int | None]:
        """(notes, training piece) of the longest copied run; (0, None) when no n-gram is found."""
        total = int(occurrences.sum())
        if total == 0:
            return 0, None
        # One row per (generated n-gram, training occurrence) hit.
        query_position = np.repeat(np.arange(len(occurrences)), occurrences)
        within = np.arange(total) - np.repeat(np.cumsum(occurrences) - occurrences, occurrences)
        entry = np.repeat(first, occurrences) + within
        piece = self.ngram_pieces_[entry].astype(np.int64)
        alignment = self.ngram_positions_[entry].astype(np.int64) - query_position
        order = np.lexsort((query_position, alignment, piece))
        piece, alignment, query_position = piece[order], alignment[order], query_position[order]
        # A chain of hits on one (piece, alignment) at consecutive positions is one copied run.
        continues = np.zeros(total, dtype=bool)
        continues[1:] = (piece[1:] == piece[:-1]) & (alignment[1:] == alignment[:-1]) & (np.diff(query_position) == 1)
        chain_start = np.flatnonzero(~continues)
        chain_length = np.diff(np.append(chain_start, total))
        best = chain_start[int(np.argmax(chain_length))]
        best_piece, best_alignment = int(piece[best]), int(alignment[best])
        # Confirm on the stored tokens: exact, whatever the hashes did.
        source = self.tokens_[self.piece_starts_[best_piece] : self.piece_starts_[best_piece + 1]]
        query_from, query_to = max(0, -best_alignment), min(len(tokens), len(source) - best_alignment)
        equal = tokens[query_from:query_to] == source[query_from + best_alignment : query_to + best_alignment]
        matched_tokens = _longest_true_run(equal)
        if matched_tokens < self.ngram_length:
            return 0, None
        return matched_tokens + 1, best_piece

    def save(self, path) -> None:
        """Write the index to the directory ``path`` (replaced whole if it exists; written beside it
        first and renamed, so a crash never leaves a half-written index)."""
        self._require_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            np.savez(
                staging / ARRAYS_FILE,
                tokens=self.tokens_,
                piece_starts=self.piece_starts_,
                ngram_hashes=self.ngram_hashes_,
                ngram_pieces=self.ngram_pieces_,
                ngram_positions=self.ngram_positions_,
            )
            settings = {"format_version": FORMAT_VERSION, **self._settings(), "ids": self.ids_}
            (staging / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
            previous = None
            if path.exists():
                previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                path.rename(previous / path.name)
            staging.rename(path)
            if previous is not None:
                shutil.rmtree(previous)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path) -> "MemorizationIndex":
        """Read an index written by ``save``; nothing is unpickled."""
        path = Path(path)
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if settings.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: memorization index format {settings.get('format_version')!r}, expected {FORMAT_VERSION}")
        index = cls(**{name: settings[name] for name in cls()._settings()})
        with np.load(path / ARRAYS_FILE, allow_pickle=False) as arrays:
            index.tokens_ = arrays["tokens"]
            index.piece_starts_ = arrays["piece_starts"]
            index.ngram_hashes_ = arrays["ngram_hashes"]
            index.ngram_pieces_ = arrays["ngram_pieces"]
            index.ngram_positions_ = arrays["ngram_positions"]
        index.ids_ = [str(name) for name in settings["ids"]]
        if len(index.piece_starts_) != len(index.ids_) + 1 or index.piece_starts_[-1] != len(index.tokens_):
            raise ValueError(f"{path}: the arrays do not match the {len(index.ids_)} ids of {SETTINGS_FILE}")
        return index
