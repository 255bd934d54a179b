"""Per-piece symbolic music metrics: MusPy's (Dong et al. 2020) and MuseGAN's (Dong et al. 2018).

Every metric is a function ``metric(piece) -> float`` where ``piece`` is a ``symusic.Score`` (tick
time) or a ``PieceNotes`` already read from one; ``compute_all`` reads a score once and runs them
all. Conventions shared by every metric:

- Pitch metrics use the non-drum notes only (a drum note's "pitch" names an instrument), so a piece
  whose notes are all drums gets NaN for them.
- A piece without any note gets NaN for every metric: each one is a statistic over notes, bars or
  beats of the music, there are none to take it over, and any number (0 or 1) would pull a set's
  mean toward a value the piece never earned. ``distributions.compare_sets`` skips and counts NaNs.
- Time grids are musical, never in ticks, so a piece gives the same values at any
  ``ticks_per_quarter``: the step grid has ``STEPS_PER_QUARTER = 24`` steps per quarter note
  (MuseGAN's 96 steps per 4/4 bar, which holds 32nd notes and 16th triplets exactly), and a tick
  time maps to the nearest step.
- Bars and beats follow the time signatures, with 4/4 from tick 0 when there is none or the first
  one comes later. A bar lasts numerator x 4 / denominator quarters, and a time-signature change
  starts a new bar, even mid-bar. A beat is the denominator's note value, except in compound
  meters (numerator divisible by 3 and above 3: 6/8, 9/8, 12/8, 6/4) where it is three of them, as
  symusic's ``get_beats`` counts them. Bars and beats are those starting from tick 0 up to the end
  of the last note.
- A note of zero duration sounds for one tick (one step on the step grid) at its onset: it was
  played, so it is not silence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from symusic import Score

from musefm.data.music import MODES, estimate_key, parse_key

STEPS_PER_QUARTER = 24
SIXTEENTH_NOTE_STEPS = STEPS_PER_QUARTER // 4
# MuseGAN's drum filter over one 16th-note period of 6 steps: full credit on the grid, 0.3 one
# step off it (a slightly early or late hit still reads as the pattern), none elsewhere.
_DRUM_GRID_WEIGHTS = np.array([1.0, 0.3, 0.0, 0.0, 0.0, 0.3])
_MAJOR_SCALE_STEPS = (0, 2, 4, 5, 7, 9, 11)
_NATURAL_MINOR_SCALE_STEPS = (0, 2, 3, 5, 7, 8, 10)


def scale_mask(tonic_pitch_class: int, mode: str) -> np.ndarray:
    """Boolean (12,) mask of the pitch classes of a major or natural-minor scale."""
    steps = _MAJOR_SCALE_STEPS if mode == "major" else _NATURAL_MINOR_SCALE_STEPS
    mask = np.zeros(12, dtype=bool)
    mask[(tonic_pitch_class + np.array(steps)) % 12] = True
    return mask


# (24, 12): rows in ``musefm.data.music.key_index`` order, 12 major keys then 12 minor keys.
_ALL_SCALE_MASKS = np.array([scale_mask(tonic, mode) for mode in MODES for tonic in range(12)])


def _tonal_centroid_matrix(fifths_radius=1.0, minor_thirds_radius=1.0, major_thirds_radius=0.5) -> np.ndarray:
    """Harte, Sandler & Gasser (2006): pitch class l -> three circles (fifths, minor and major
    thirds) of the 6-D tonal space, as (sin, cos) pairs. Shape (6, 12); radii as in the paper."""
    pitch_class = np.arange(12)
    rows = []
    for radius, angle_per_semitone in (
        (fifths_radius, 7 * np.pi / 6),
        (minor_thirds_radius, 3 * np.pi / 2),
        (major_thirds_radius, 2 * np.pi / 3),
    ):
        rows += [radius * np.sin(pitch_class * angle_per_semitone), radius * np.cos(pitch_class * angle_per_semitone)]
    return np.array(rows)


TONAL_CENTROID_MATRIX = _tonal_centroid_matrix()


def _to_steps(ticks, ticks_per_quarter: int) -> np.ndarray:
    """Nearest step of the 24-per-quarter grid (halves round up); equal at every resolution."""
    return np.floor(np.asarray(ticks, dtype=np.float64) * STEPS_PER_QUARTER / ticks_per_quarter + 0.5).astype(np.int64)


def _merge_intervals(key: np.ndarray, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of the [start, stop) intervals that share a key (a pitch, or one key for all notes).

    Returns (key, start, stop) of disjoint intervals sorted by key then start. ``start >= 0``.
    """
    if len(start) == 0:
        return key, start, stop
    order = np.lexsort((start, key))
    key, start, stop = key[order], start[order], stop[order]
    # Offsetting each key by more than the largest stop lets one running maximum serve every key
    # without carrying a long note of one key over into the next key.
    separation = int(stop.max()) + 1
    running_stop = np.maximum.accumulate(key * separation + stop)
    begins = np.ones(len(start), dtype=bool)
    begins[1:] = key[1:] * separation + start[1:] >= running_stop[:-1]
    first = np.flatnonzero(begins)
    last = np.append(first[1:] - 1, len(start) - 1)
    return key[first], start[first], running_stop[last] - key[first] * separation


def _sounding_counts(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For disjoint-per-key intervals: the elementary segments between all interval ends, as
    (segment lengths, how many intervals sound in each)."""
    bounds = np.unique(np.concatenate([start, stop]))
    sounding = np.searchsorted(np.sort(start), bounds[:-1], side="right") - np.searchsorted(
        np.sort(stop), bounds[:-1], side="right"
    )
    return np.diff(bounds), sounding


def _segment_grid(start: float, stop: float | None, end: float, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of equal units (bars or beats) from ``start`` until the next time signature
    (``stop``; a unit it cuts short ends there) or, for the last signature, the end of the music."""
    limit = end if stop is None else min(stop, end)
    # A quotient a rounding error above a whole number must not add a unit past the end.
    count = max(0, math.ceil((limit - start) / length - 1e-9))
    starts = start + np.arange(count) * length
    ends = starts + length if stop is None else np.minimum(starts + length, stop)
    return starts, ends


@dataclass
class PieceNotes:
    """The notes of one score as flat arrays sorted by onset then pitch, with its bars and beats.

    Times are ticks; ``offset`` is where a note stops sounding (at least one tick after onset).
    Bars and beats are those that start before the music ends (see the module docstring).
    """

    ticks_per_quarter: int
    onset: np.ndarray  # (N,) int64
    duration: np.ndarray  # (N,) int64, as written
    pitch: np.ndarray  # (N,) int64
    track: np.ndarray  # (N,) int64, index into score.tracks
    is_drum: np.ndarray  # (N,) bool
    track_is_drum: np.ndarray  # (T,) bool, one per score track
    bar_start: np.ndarray  # (B,) float64 ticks
    bar_end: np.ndarray  # (B,)
    beat_start: np.ndarray  # (K,)
    beat_end: np.ndarray  # (K,)

    @classmethod
    def from_score(cls, score: Score) -> "PieceNotes":
        ticks_per_quarter = int(score.ticks_per_quarter)
        columns = {"time": [], "duration": [], "pitch": []}
        track_of_note, track_is_drum = [], []
        for index, track in enumerate(score.tracks):
            arrays = track.notes.numpy()
            for name in columns:
                columns[name].append(arrays[name].astype(np.int64))
            track_of_note.append(np.full(len(arrays["time"]), index, dtype=np.int64))
            track_is_drum.append(bool(track.is_drum))
        if track_of_note:
            onset, duration, pitch = (np.concatenate(columns[name]) for name in ("time", "duration", "pitch"))
            track = np.concatenate(track_of_note)
        else:
            onset = duration = pitch = track = np.zeros(0, dtype=np.int64)
        onset, duration = np.maximum(onset, 0), np.maximum(duration, 0)
        order = np.lexsort((pitch, onset))
        onset, duration, pitch, track = onset[order], duration[order], pitch[order], track[order]
        track_is_drum = np.array(track_is_drum, dtype=bool)
        end = int((onset + np.maximum(duration, 1)).max()) if len(onset) else 0
        bar_start, bar_end, beat_start, beat_end = _metrical_grid(score, ticks_per_quarter, end)
        return cls(
            ticks_per_quarter, onset, duration, pitch, track, track_is_drum[track], track_is_drum,
            bar_start, bar_end, beat_start, beat_end,
        )

    @cached_property
    def offset(self) -> np.ndarray:
        return self.onset + np.maximum(self.duration, 1)

    @cached_property
    def pitched(self) -> np.ndarray:
        """Mask of the non-drum notes."""
        return ~self.is_drum

    @cached_property
    def onset_bar_and_position(self) -> tuple[np.ndarray, np.ndarray]:
        """Each note's bar index and onset position in that bar, in steps (24 per quarter)."""
        bar_start_step = _to_steps(self.bar_start, self.ticks_per_quarter)
        # At least one step: a bar that a time-signature change cuts to a few ticks still holds its onsets.
        bar_length_step = np.maximum(_to_steps(self.bar_end, self.ticks_per_quarter) - bar_start_step, 1)
        onset_step = _to_steps(self.onset, self.ticks_per_quarter)
        bar = np.clip(np.searchsorted(bar_start_step, onset_step, side="right") - 1, 0, None)
        # An onset within half a step of the music's last bar line still belongs to the last bar.
        position = np.minimum(onset_step - bar_start_step[bar], bar_length_step[bar] - 1)
        return bar, position

    @cached_property
    def note_bar_overlap(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (note, bar) pair where the note sounds: note indices, bar indices, ticks of overlap."""
        n_bars = len(self.bar_start)
        if n_bars == 0 or len(self.onset) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        first = np.clip(np.searchsorted(self.bar_start, self.onset, side="right") - 1, 0, n_bars - 1)
        last = np.clip(np.searchsorted(self.bar_start, self.offset, side="left") - 1, first, n_bars - 1)
        bars_per_note = last - first + 1
        note = np.repeat(np.arange(len(self.onset)), bars_per_note)
        within = np.arange(len(note)) - np.repeat(np.cumsum(bars_per_note) - bars_per_note, bars_per_note)
        bar = first[note] + within
        overlap = np.minimum(self.offset[note], self.bar_end[bar]) - np.maximum(self.onset[note], self.bar_start[bar])
        keep = overlap > 0
        return note[keep], bar[keep], overlap[keep]

    @cached_property
    def track_bar_chroma(self) -> np.ndarray:
        """(T, B, 12) ticks each pitch class sounds in each bar, per track; zero for drum tracks."""
        n_tracks, n_bars = len(self.track_is_drum), len(self.bar_start)
        note, bar, overlap = self.note_bar_overlap
        pitched = self.pitched[note]
        note, bar, overlap = note[pitched], bar[pitched], overlap[pitched]
        cell = (self.track[note] * n_bars + bar) * 12 + self.pitch[note] % 12
        chroma = np.bincount(cell, weights=overlap, minlength=n_tracks * n_bars * 12)
        return chroma.reshape(n_tracks, n_bars, 12)


def _metrical_grid(score: Score, ticks_per_quarter: int, end: int) -> tuple[np.ndarray, ...]:
    """Bar and beat (start, end) arrays in ticks; see the module docstring for the rules."""
    signatures = score.time_signatures.numpy()
    times = np.maximum(signatures["time"].astype(np.int64), 0)
    numerators = signatures["numerator"].astype(np.int64)
    denominators = signatures["denominator"].astype(np.int64)
    valid = (numerators > 0) & (denominators > 0)
    times, numerators, denominators = times[valid], numerators[valid], denominators[valid]
    # Several signatures at one tick: the last one written wins, as a MIDI reader would apply it.
    reverse_order = np.argsort(times[::-1], kind="stable")
    unique_times, first_in_reverse = np.unique(times[::-1][reverse_order], return_index=True)
    chosen = (len(times) - 1 - reverse_order[first_in_reverse]).astype(np.int64)
    times, numerators, denominators = unique_times, numerators[chosen], denominators[chosen]
    if len(times) == 0 or times[0] > 0:
        times, numerators, denominators = np.r_[0, times], np.r_[4, numerators], np.r_[4, denominators]
    grids = ([], [], [], [])
    for index in range(len(times)):
        start = float(times[index])
        if start >= end:
            break
        stop = float(times[index + 1]) if index + 1 < len(times) else None
        numerator, denominator = int(numerators[index]), int(denominators[index])
        bar_length = numerator * 4 * ticks_per_quarter / denominator
        compound = numerator % 3 == 0 and numerator > 3
        beat_length = bar_length / (numerator // 3 if compound else numerator)
        for offset, length in ((0, bar_length), (2, beat_length)):
            starts, ends = _segment_grid(start, stop, end, length)
            grids[offset].append(starts)
            grids[offset + 1].append(ends)
    return tuple(np.concatenate(parts) if parts else np.zeros(0) for parts in grids)


def _as_notes(piece: Score | PieceNotes) -> PieceNotes:
    return piece if isinstance(piece, PieceNotes) else PieceNotes.from_score(piece)


def _pitches(notes: PieceNotes) -> np.ndarray | None:
    """Pitches of the non-drum notes, or None when there are none (every pitch metric is NaN)."""
    pitches = notes.pitch[notes.pitched]
    return pitches if len(pitches) else None


def _entropy_bits(counts: np.ndarray) -> float:
    probabilities = counts[counts > 0] / counts.sum()
    return float(0.0 - (probabilities * np.log2(probabilities)).sum())  # 0.0 - : one pitch gives 0.0, not -0.0


def pitch_range(piece: Score | PieceNotes) -> float:
    """Highest minus lowest MIDI pitch over the non-drum notes, in semitones; NaN without any."""
    pitches = _pitches(_as_notes(piece))
    return math.nan if pitches is None else float(pitches.max() - pitches.min())


def n_pitches_used(piece: Score | PieceNotes) -> float:
    """Number of distinct MIDI pitches among the non-drum notes; NaN without any."""
    pitches = _pitches(_as_notes(piece))
    return math.nan if pitches is None else float(np.count_nonzero(np.bincount(pitches, minlength=128)))


def n_pitch_classes_used(piece: Score | PieceNotes) -> float:
    """Number of distinct pitch classes (0..12) among the non-drum notes; NaN without any."""
    pitches = _pitches(_as_notes(piece))
    return math.nan if pitches is None else float(np.count_nonzero(np.bincount(pitches % 12, minlength=12)))


def polyphony(piece: Score | PieceNotes) -> float:
    """Mean, over the distinct onset times of non-drum notes, of the number of non-drum notes
    sounding then (onset <= t < offset; notes starting at t included). 1.0 for a melody; NaN
    without non-drum notes. Counted in exact ticks, so no grid is involved. (MusPy's own
    ``polyphony`` averages over every sounding time step instead, which weighs a chord by its
    length; here each attack counts once.)"""
    notes = _as_notes(piece)
    onset, offset = notes.onset[notes.pitched], notes.offset[notes.pitched]
    if len(onset) == 0:
        return math.nan
    times = np.unique(onset)
    # onset is sorted already (PieceNotes sorts by onset); offsets need their own sort.
    sounding = np.searchsorted(onset, times, side="right") - np.searchsorted(np.sort(offset), times, side="right")
    return float(sounding.mean())


def polyphony_rate(piece: Score | PieceNotes) -> float:
    """Share of the steps (24 per quarter) with more than one distinct non-drum pitch sounding,
    among the steps with at least one. A note covers the steps from its onset's nearest step to its
    offset's nearest step (at least one step); two notes of the same pitch count once. NaN without
    non-drum notes. (MusPy's ``polyphony_rate`` divides by all steps, rests included, which mixes
    in how much of the piece is silent: ``empty_beat_rate`` measures that.)"""
    notes = _as_notes(piece)
    mask = notes.pitched
    if not mask.any():
        return math.nan
    start = _to_steps(notes.onset[mask], notes.ticks_per_quarter)
    stop = np.maximum(_to_steps(notes.offset[mask], notes.ticks_per_quarter), start + 1)
    _, start, stop = _merge_intervals(notes.pitch[mask], start, stop)
    lengths, sounding = _sounding_counts(start, stop)
    return float(lengths[sounding > 1].sum() / lengths[sounding >= 1].sum())


def pitch_in_scale_rate(piece: Score | PieceNotes, key: str | None = None) -> float:
    """Share of the non-drum notes (counted, not weighted by duration) whose pitch class belongs to
    the scale of ``key`` ("C major", "F# minor"; minor means the natural minor scale, as in MusPy).
    Without a key, the Krumhansl-Schmuckler estimate over all 24 keys (duration-weighted pitch-class
    histogram, ``musefm.data.music.estimate_key``) is used: a generated piece's key signature is not
    evidence of its key. NaN without non-drum notes."""
    notes = _as_notes(piece)
    pitches = _pitches(notes)
    if pitches is None:
        return math.nan
    if key is None:
        key = estimate_key(pitches, notes.offset[notes.pitched] - notes.onset[notes.pitched])
    tonic, mode = parse_key(key)
    return float(scale_mask(tonic, mode)[pitches % 12].mean())


def scale_consistency(piece: Score | PieceNotes) -> float:
    """Largest pitch-in-scale rate over the 24 major and natural-minor scales (MusPy); NaN without
    non-drum notes."""
    pitches = _pitches(_as_notes(piece))
    if pitches is None:
        return math.nan
    counts = np.bincount(pitches % 12, minlength=12)
    return float((_ALL_SCALE_MASKS @ counts).max() / len(pitches))


def pitch_entropy(piece: Score | PieceNotes) -> float:
    """Shannon entropy in bits of the histogram of non-drum note counts per MIDI pitch; NaN without
    non-drum notes."""
    pitches = _pitches(_as_notes(piece))
    return math.nan if pitches is None else _entropy_bits(np.bincount(pitches, minlength=128))


def pitch_class_entropy(piece: Score | PieceNotes) -> float:
    """Shannon entropy in bits of the histogram of non-drum note counts per pitch class (0..log2 12);
    NaN without non-drum notes."""
    pitches = _pitches(_as_notes(piece))
    return math.nan if pitches is None else _entropy_bits(np.bincount(pitches % 12, minlength=12))


def empty_beat_rate(piece: Score | PieceNotes) -> float:
    """Share of the beats in which no note, drums included, starts or sounds: a beat [b, e) is
    empty when no note's [onset, offset) meets it. A note held through a beat fills it. Beats are
    those starting from tick 0 before the last note's end. NaN without any note."""
    notes = _as_notes(piece)
    if len(notes.beat_start) == 0:
        return math.nan
    _, start, stop = _merge_intervals(np.zeros_like(notes.onset), notes.onset, notes.offset)
    # Merged intervals are disjoint and sorted, so the last one starting before a beat's end is
    # the only one that can reach into the beat.
    last = np.searchsorted(start, notes.beat_end, side="left") - 1
    filled = (last >= 0) & (stop[np.maximum(last, 0)] > notes.beat_start)
    return float(1.0 - filled.mean())


def groove_consistency(piece: Score | PieceNotes) -> float:
    """MusPy's groove consistency: 1 - mean over consecutive bar pairs of the Hamming distance
    between their onset patterns, divided by the pattern length. A bar's onset pattern is the set
    of steps (24 per quarter, from the bar line) where any note, drums included, starts. Bars of
    different lengths (a meter change) are compared over the longer one, the shorter padded with
    silence. NaN with fewer than two bars."""
    notes = _as_notes(piece)
    n_bars = len(notes.bar_start)
    if n_bars < 2:
        return math.nan
    bar_length = _to_steps(notes.bar_end, notes.ticks_per_quarter) - _to_steps(notes.bar_start, notes.ticks_per_quarter)
    bar_length = np.maximum(bar_length, 1)  # as in onset_bar_and_position
    bar, position = notes.onset_bar_and_position
    width = int(bar_length.max()) + 1
    occupied = np.unique(bar * width + position)  # one code per (bar, step) with an onset
    onsets_per_bar = np.bincount(occupied // width, minlength=n_bars)
    also_in_next_bar = np.isin(occupied + width, occupied)
    shared_with_next = np.bincount(occupied[also_in_next_bar] // width, minlength=n_bars)
    hamming = onsets_per_bar[:-1] + onsets_per_bar[1:] - 2 * shared_with_next[:-1]
    pattern_length = np.maximum(bar_length[:-1], bar_length[1:])
    return float(1.0 - (hamming / pattern_length).mean())


def _drum_positions(notes: PieceNotes) -> tuple[np.ndarray, np.ndarray]:
    bar, position = notes.onset_bar_and_position
    return bar[notes.is_drum], position[notes.is_drum]


def drum_pattern_consistency(piece: Score | PieceNotes) -> float:
    """Strict drum-pattern share: of all drum-note onsets, the share that fall on the 16th-note grid
    of their bar (a step, at 24 per quarter, that is a multiple of 6 from the bar line). An 8-beat
    pattern lies on this grid too. Unlike ``drum_in_pattern_rate`` (MuseGAN's DP) there is no
    partial credit for hits one step off and no shifted grid. NaN without drum notes."""
    _, position = _drum_positions(_as_notes(piece))
    return math.nan if len(position) == 0 else float((position % SIXTEENTH_NOTE_STEPS == 0).mean())


def drum_in_pattern_rate(piece: Score | PieceNotes) -> float:
    """MuseGAN's DP, ratio of drum notes in an 8- or 16-beat pattern. In each bar with drum notes,
    every drum onset scores 1 on the 16th-note grid, 0.3 one step (of 24 per quarter) off it and 0
    elsewhere; the bar's value is the best total over the 6 shifts of the grid, divided by its
    number of drum notes; DP is the mean over those bars. Counted on notes (MuseGAN counted
    one-step piano-roll cells of its drum notes). NaN without drum notes."""
    notes = _as_notes(piece)
    bar, position = _drum_positions(notes)
    if len(position) == 0:
        return math.nan
    n_bars = len(notes.bar_start)
    shifts = np.arange(SIXTEENTH_NOTE_STEPS)
    weights = _DRUM_GRID_WEIGHTS[(position[:, None] - shifts[None, :]) % SIXTEENTH_NOTE_STEPS]  # (N, 6)
    cell = bar[:, None] * SIXTEENTH_NOTE_STEPS + shifts[None, :]
    per_bar_and_shift = np.bincount(cell.ravel(), weights=weights.ravel(), minlength=n_bars * SIXTEENTH_NOTE_STEPS)
    per_bar_and_shift = per_bar_and_shift.reshape(n_bars, SIXTEENTH_NOTE_STEPS)  # (B, 6)
    hits_per_bar = np.bincount(bar, minlength=n_bars)
    played = hits_per_bar > 0
    return float((per_bar_and_shift[played].max(axis=1) / hits_per_bar[played]).mean())


def _track_bar_sounding(notes: PieceNotes) -> np.ndarray:
    """(T, B) whether each track has a note sounding in each bar."""
    note, bar, _ = notes.note_bar_overlap
    sounding = np.zeros((len(notes.track_is_drum), len(notes.bar_start)), dtype=bool)
    sounding[notes.track[note], bar] = True
    return sounding


def empty_bar_rate_per_track(piece: Score | PieceNotes) -> np.ndarray:
    """MuseGAN's EB for each track of the score (drums included): the share of the piece's bars in
    which the track has no note sounding. NaN for a track with no notes at all (a container, not a
    part that rests), and so for every track of a piece without notes."""
    notes = _as_notes(piece)
    n_tracks = len(notes.track_is_drum)
    has_notes = np.bincount(notes.track, minlength=n_tracks) > 0
    rate = np.full(n_tracks, np.nan)
    if len(notes.bar_start):
        rate[has_notes] = 1.0 - _track_bar_sounding(notes)[has_notes].mean(axis=1)
    return rate


def empty_bar_rate(piece: Score | PieceNotes) -> float:
    """Mean of ``empty_bar_rate_per_track`` over the tracks that have notes; NaN without notes."""
    rates = empty_bar_rate_per_track(piece)
    return float(np.nanmean(rates)) if np.isfinite(rates).any() else math.nan


def used_pitch_classes_per_bar_per_track(piece: Score | PieceNotes) -> np.ndarray:
    """MuseGAN's UPC for each track of the score: the number of distinct pitch classes sounding
    in a bar, averaged over the bars where the track sounds. MuseGAN also averaged over empty bars
    (counting 0); they are left out here because ``empty_bar_rate`` already measures them. NaN for
    drum tracks and tracks with no notes."""
    notes = _as_notes(piece)
    chroma = notes.track_bar_chroma  # (T, B, 12)
    classes_per_bar = np.count_nonzero(chroma > 0, axis=2)  # (T, B)
    bars_sounding = np.count_nonzero(classes_per_bar, axis=1)  # (T,)
    rate = np.full(len(notes.track_is_drum), np.nan)
    has_notes = bars_sounding > 0
    rate[has_notes] = classes_per_bar[has_notes].sum(axis=1) / bars_sounding[has_notes]
    return rate


def used_pitch_classes_per_bar(piece: Score | PieceNotes) -> float:
    """Mean of ``used_pitch_classes_per_bar_per_track`` over the non-drum tracks with notes."""
    rates = used_pitch_classes_per_bar_per_track(piece)
    return float(np.nanmean(rates)) if np.isfinite(rates).any() else math.nan


def qualified_note_rate(piece: Score | PieceNotes) -> float:
    """MuseGAN's QN: share of the non-drum notes lasting at least a 32nd note (3 steps at 24 per
    quarter, MuseGAN's "three time steps at 96 per bar"), i.e. ``duration * 8 >= ticks_per_quarter``
    on the written duration. NaN without non-drum notes."""
    notes = _as_notes(piece)
    durations = notes.duration[notes.pitched]
    return math.nan if len(durations) == 0 else float((durations * 8 >= notes.ticks_per_quarter).mean())


def _tonal_centroids(notes: PieceNotes) -> tuple[np.ndarray, np.ndarray]:
    """(T, B, 6) tonal centroid of each track's duration-weighted chroma in each bar, and the
    (T, B) mask of the bars where the track sounds (elsewhere the centroid is undefined)."""
    chroma = notes.track_bar_chroma  # (T, B, 12)
    total = chroma.sum(axis=2)  # (T, B)
    sounding = total > 0
    normalised = chroma / np.where(sounding, total, 1.0)[..., None]  # L1-normalised, as Harte et al.
    return normalised @ TONAL_CENTROID_MATRIX.T, sounding


def _pair_tonal_distance(centroids: np.ndarray, sounding: np.ndarray, first: int, second: int) -> float:
    both = sounding[first] & sounding[second]
    if not both.any():
        return math.nan
    return float(np.linalg.norm(centroids[first, both] - centroids[second, both], axis=1).mean())


def tonal_distance(piece: Score | PieceNotes, first_track: int = 0, second_track: int = 1) -> float:
    """MuseGAN's TD between two tracks (indices into ``score.tracks``): in each bar where both
    sound, the Euclidean distance between the 6-D tonal centroids (Harte et al. 2006, radii 1, 1,
    0.5) of their L1-normalised, duration-weighted chroma; averaged over those bars. NaN when either
    track is a drum track or they never sound in the same bar."""
    notes = _as_notes(piece)
    n_tracks = len(notes.track_is_drum)
    for index in (first_track, second_track):
        if not -n_tracks <= index < n_tracks:
            raise IndexError(f"track {index} does not exist: the score has {n_tracks} tracks")
    if notes.track_is_drum[first_track] or notes.track_is_drum[second_track]:
        return math.nan
    centroids, sounding = _tonal_centroids(notes)
    return _pair_tonal_distance(centroids, sounding, first_track, second_track)


def mean_tonal_distance(piece: Score | PieceNotes) -> float:
    """``tonal_distance`` averaged over every pair of non-drum tracks with notes (pairs that never
    share a bar are skipped); NaN with fewer than two such tracks."""
    notes = _as_notes(piece)
    centroids, sounding = _tonal_centroids(notes)
    tracks = np.flatnonzero(sounding.any(axis=1))
    distances = [
        _pair_tonal_distance(centroids, sounding, first, second)
        for position, first in enumerate(tracks)
        for second in tracks[position + 1 :]
    ]
    distances = [distance for distance in distances if not math.isnan(distance)]
    return float(np.mean(distances)) if distances else math.nan


# compute_all's metrics, in report order; each takes a PieceNotes (or a Score) and returns a float.
METRICS = {
    "pitch_range": pitch_range,
    "n_pitches_used": n_pitches_used,
    "n_pitch_classes_used": n_pitch_classes_used,
    "polyphony": polyphony,
    "polyphony_rate": polyphony_rate,
    "pitch_in_scale_rate": pitch_in_scale_rate,
    "scale_consistency": scale_consistency,
    "pitch_entropy": pitch_entropy,
    "pitch_class_entropy": pitch_class_entropy,
    "empty_beat_rate": empty_beat_rate,
    "groove_consistency": groove_consistency,
    "drum_pattern_consistency": drum_pattern_consistency,
    "empty_bar_rate": empty_bar_rate,
    "used_pitch_classes_per_bar": used_pitch_classes_per_bar,
    "qualified_note_rate": qualified_note_rate,
    "drum_in_pattern_rate": drum_in_pattern_rate,
    "tonal_distance": mean_tonal_distance,
}


def compute_all(score: Score | PieceNotes) -> dict[str, float]:
    """Every metric of ``METRICS`` for one piece, reading its notes once. Keys are METRICS' names;
    pitch-in-scale rate uses the estimated key; tonal distance is ``mean_tonal_distance``."""
    notes = _as_notes(score)
    return {name: metric(notes) for name, metric in METRICS.items()}
