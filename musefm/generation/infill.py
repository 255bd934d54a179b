"""Infilling: regenerate bars i..j of a piece given the music on both sides.

Bars are numbered from 0 here (bar ``k`` is Octuple's ``Bar_k``, the ``k``-th ``Bar`` token of REMI),
both ends included. Everything outside bars i..j comes back unchanged, token for token, and decodes
to the same notes: the infilled bars keep their time signatures, so the music after them stays on
its beats.

Two methods build on these helpers: ``musefm.generation.infill_bert`` (MusicBERT, iterative
mask-predict) and ``musefm.generation.infill_lm`` (MusicLM, sample-and-rerank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from symusic import Score

from musefm.data.tokenize import bar_token_ids, encode
from musefm.errors import MusefmError

SPECIAL_TOKENS = 4  # PAD, BOS, EOS, MASK: ids 0..3 of every vocabulary


@dataclass
class InfillResult:
    """A piece with bars ``bars[0]..bars[1]`` regenerated."""

    ids: np.ndarray  # (T,) REMI base ids, or (T, F) Octuple rows; no special tokens
    score: Score  # what ``ids`` decode to
    bars: tuple[int, int]  # 0-based, inclusive
    span: tuple[int, int]  # ids[span[0] : span[1]] are the regenerated tokens (Octuple: rows)
    log_probs: np.ndarray  # per regenerated token (Octuple: per row, summed over its predicted fields)
    method: str  # "mask-predict" (MusicBERT) or "rerank" (MusicLM)
    seed: int
    details: dict = field(default_factory=dict)  # per method, JSON-ready: passes, candidate scores ...
    candidates: list[np.ndarray] | None = None  # MusicLM: every complete candidate for bars i..j

    def quarters(self) -> tuple[float, float]:
        """Where the infilled bars start and end in ``score``, in quarter notes."""
        return bar_start_quarter(self.score, self.bars[0]), bar_start_quarter(self.score, self.bars[1] + 1)

    def marked_score(self) -> Score:
        """A copy of ``score`` whose notes starting in the infilled bars form one more track (for pictures)."""
        from symusic import Track

        start, end = (quarter * self.score.ticks_per_quarter for quarter in self.quarters())
        marked = self.score.copy()
        infilled = Track(name=f"infilled bars {self.bars[0] + 1}-{self.bars[1] + 1}", program=0)
        for track in marked.tracks:
            infilled.notes.extend(note for note in track.notes if start <= note.time < end)
            track.notes = [note for note in track.notes if not start <= note.time < end]
        marked.tracks.append(infilled)
        return marked


def check_bars(bars, num_bars: int) -> tuple[int, int]:
    """(i, j) as ints; MusefmError unless 0 <= i <= j < num_bars."""
    try:
        first, last = (int(bar) for bar in bars)
    except (TypeError, ValueError):
        raise MusefmError(f"bars: expected (first, last) bar numbers, got {bars!r}") from None
    if first > last:
        raise MusefmError(f"bars: the first bar ({first}) comes after the last ({last})")
    if first < 0 or last >= num_bars:
        raise MusefmError(f"bars: {first}..{last} lie outside the piece's bars 0..{num_bars - 1} (numbered from 0)")
    return first, last


def num_bars(tokenizer, ids) -> int:
    """Bars of a piece's base ids: Bar tokens (REMI), or the last Octuple bar value + 1."""
    ids = np.asarray(ids)
    if tokenizer.is_multi_voc:
        bar_values = OctupleLayout(tokenizer).bar_values(ids)
        return int(bar_values.max()) + 1 if len(bar_values) else 0
    return int(np.isin(ids, bar_token_ids(tokenizer)).sum())


def piece_ids(tokenizer, piece, label: str = "piece", first_bars: int = 0) -> np.ndarray:
    """Base ids of a Score or of token ids, special tokens (BOS, EOS, PAD rows) dropped; only the
    first ``first_bars`` bars when it is not 0. ``label`` names the piece in errors."""
    if isinstance(piece, Score):
        ids = np.asarray(encode(tokenizer, piece, label=label), dtype=np.int64)
    else:
        ids = np.asarray(piece, dtype=np.int64)
    if tokenizer.is_multi_voc:
        if ids.ndim != 2 or ids.shape[1] != len(tokenizer.vocab):
            raise MusefmError(f"{label}: expected (T, {len(tokenizer.vocab)}) Octuple ids, got shape {ids.shape}")
        ids = ids[(ids >= SPECIAL_TOKENS).all(axis=1)]
        return ids[OctupleLayout(tokenizer).bar_values(ids) < first_bars] if first_bars else ids
    if ids.ndim != 1:
        raise MusefmError(f"{label}: expected (T,) token ids, got shape {ids.shape}")
    if tokenizer.is_trained:
        raise MusefmError(f"{label}: infilling works on base tokens; this tokenizer uses BPE")
    ids = ids[~np.isin(ids, tokenizer.special_tokens_ids)]
    starts = np.flatnonzero(np.isin(ids, bar_token_ids(tokenizer)))  # bar k opens at starts[k]
    return ids[: starts[first_bars]] if first_bars and len(starts) > first_bars else ids


def bar_start_quarter(score: Score, bar: int) -> float:
    """Where bar ``bar`` (from 0) starts in ``score``, in quarter notes, following its time signatures."""
    tpq = score.ticks_per_quarter
    signatures = sorted((ts.time, ts.numerator, ts.denominator) for ts in score.time_signatures) or [(0, 4, 4)]
    tick = 0
    for _ in range(bar):
        in_force = [signature for signature in signatures if signature[0] <= tick] or signatures[:1]
        _, numerator, denominator = in_force[-1]
        tick += numerator * 4 * tpq // denominator
    return tick / tpq


def notes_between(score: Score, start: float, end: float) -> int:
    """Notes of ``score`` starting in [start, end) quarter notes."""
    tpq = score.ticks_per_quarter
    return sum(sum(1 for note in track.notes if start * tpq <= note.time < end * tpq) for track in score.tracks)


def piece_programs(tokenizer, ids) -> list[int] | None:
    """The MIDI programs (-1 = drums) of a REMI/TSD piece's Program tokens; None when it has none."""
    names = {tokenizer[int(token)] for token in set(np.asarray(ids).tolist()) if 0 <= int(token) < len(tokenizer)}
    return sorted(int(name.split("_")[1]) for name in names if name.startswith("Program_")) or None


# -- Octuple rows -----------------------------------------------------------------------------------------


class OctupleLayout:
    """Field indices and token values of an Octuple tokenizer."""

    def __init__(self, tokenizer):
        from miditok.constants import TIME_SIGNATURE

        self.tokenizer = tokenizer
        self.index = dict(tokenizer.vocab_types_idx)  # "Pitch" -> 0, "Bar" -> 2 ...
        if "Bar" not in self.index or "Position" not in self.index:
            raise MusefmError(f"{type(tokenizer).__name__}: infilling needs Bar and Position fields")
        self.values = []  # per field: (V_f,) int values (-10**9 for specials and non-numbers)
        self.kinds = []  # per field: (V_f,) token type ("Pitch", "PitchDrum", ...)
        for vocabulary in tokenizer.vocab:
            values = np.full(len(vocabulary), -10**9, dtype=np.int64)
            kinds = np.empty(len(vocabulary), dtype=object)
            for token, token_id in vocabulary.items():
                kind, value = token.split("_", 1)
                kinds[token_id] = kind
                if token_id >= SPECIAL_TOKENS and kind in ("Pitch", "PitchDrum", "Position", "Bar", "Program"):
                    values[token_id] = int(value)
            self.values.append(values)
            self.kinds.append(kinds)
        self.default_time_signature = TIME_SIGNATURE

    def bar_values(self, rows: np.ndarray) -> np.ndarray:
        return self.values[self.index["Bar"]][rows[:, self.index["Bar"]]]

    def bar_positions(self, time_signature_id: int | None) -> int:
        """Positions in a bar of this time signature, as MidiTok's Octuple decoder counts them."""
        from miditok.utils import compute_ticks_per_bar
        from symusic import TimeSignature

        if time_signature_id is None:
            numerator, denominator = self.default_time_signature
        else:
            token = self.tokenizer.vocab[self.index["TimeSig"]]
            name = next(name for name, token_id in token.items() if token_id == time_signature_id)
            numerator, denominator = (int(part) for part in name.split("_")[1].split("/"))
        division = self.tokenizer.time_division
        ticks_per_bar = compute_ticks_per_bar(TimeSignature(0, numerator, denominator), division)
        ticks_per_position = self.tokenizer._tpb_per_ts[denominator] // self.tokenizer.config.max_num_pos_per_beat
        return ticks_per_bar // ticks_per_position
