"""Per-piece symbolic metrics against values worked out by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from symusic import Note, Score, TimeSignature, Track

from musefm.evaluation import symbolic
from musefm.evaluation.symbolic import METRICS, PieceNotes, compute_all

C_MAJOR_SCALE = (60, 62, 64, 65, 67, 69, 71, 72)
PITCH_METRICS = (
    "pitch_range", "n_pitches_used", "n_pitch_classes_used", "polyphony", "polyphony_rate",
    "pitch_in_scale_rate", "scale_consistency", "pitch_entropy", "pitch_class_entropy",
    "used_pitch_classes_per_bar", "qualified_note_rate", "tonal_distance",
)


def build_score(*parts, tpq=480, time_signatures=((0, 4, 4),)) -> Score:
    """A score from parts ``(notes, is_drum)``; notes are (onset, duration, pitch) in quarter notes
    and time signatures (onset in quarters, numerator, denominator)."""
    score = Score(tpq)
    for onset, numerator, denominator in time_signatures:
        score.time_signatures.append(TimeSignature(int(Fraction(onset) * tpq), numerator, denominator))
    for index, (notes, is_drum) in enumerate(parts):
        track = Track(name=f"part{index}", program=0, is_drum=is_drum)
        for onset, duration, pitch in notes:
            track.notes.append(Note(int(Fraction(onset) * tpq), int(Fraction(duration) * tpq), pitch, 80))
        score.tracks.append(track)
    return score


def melody(pitches, duration=1):
    return [(index * Fraction(duration), duration, pitch) for index, pitch in enumerate(pitches)], False


def test_c_major_scale_of_quarter_notes():
    values = compute_all(build_score(melody(C_MAJOR_SCALE)))
    assert values["pitch_range"] == 12
    assert values["n_pitches_used"] == 8
    assert values["n_pitch_classes_used"] == 7
    assert values["polyphony"] == 1.0
    assert values["polyphony_rate"] == 0.0
    assert values["pitch_in_scale_rate"] == 1.0  # estimated key: C major (or A minor, same notes)
    assert values["scale_consistency"] == 1.0
    assert values["pitch_entropy"] == pytest.approx(3.0)  # 8 pitches once each: log2 8
    # C twice, six classes once: -(2/8 log2 2/8 + 6 * 1/8 log2 1/8) = 0.5 + 2.25
    assert values["pitch_class_entropy"] == pytest.approx(2.75)
    assert values["empty_beat_rate"] == 0.0
    assert values["groove_consistency"] == 1.0  # both bars: onsets on the four beats
    assert values["empty_bar_rate"] == 0.0
    assert values["used_pitch_classes_per_bar"] == 4.0  # C D E F | G A B C
    assert values["qualified_note_rate"] == 1.0
    for name in ("drum_pattern_consistency", "drum_in_pattern_rate", "tonal_distance"):
        assert math.isnan(values[name])
    assert list(values) == list(METRICS)


def test_polyphony_counts_notes_at_onsets_and_rate_counts_distinct_pitches():
    # C D E F quarters over a half-note G3: onsets at beats 0..3 hear 2, 2, 1, 1 notes.
    score = build_score(melody((60, 62, 64, 65)), ([(0, 2, 55)], False))
    assert symbolic.polyphony(score) == 1.5
    assert symbolic.polyphony_rate(score) == 0.5  # two pitches in 2 of the 4 sounding beats
    unison = build_score(([(0, 4, 60)], False), ([(0, 4, 60)], False))
    assert symbolic.polyphony(unison) == 2.0  # two notes sound ...
    assert symbolic.polyphony_rate(unison) == 0.0  # ... but only one pitch


def test_pitch_in_scale_rate_with_given_and_estimated_keys():
    score = build_score(melody(C_MAJOR_SCALE + (66,)))  # one F#
    assert symbolic.pitch_in_scale_rate(score, "C major") == pytest.approx(8 / 9)
    assert symbolic.pitch_in_scale_rate(score, "A minor") == pytest.approx(8 / 9)  # natural minor
    # D major (D E F# G A B C#): C, F, C are out.
    assert symbolic.pitch_in_scale_rate(score, "D major") == pytest.approx(6 / 9)
    assert symbolic.scale_consistency(score) == pytest.approx(8 / 9)  # C major or G major, 8 of 9


def test_entropies():
    score = build_score(melody((60, 72, 62, 64)))
    assert symbolic.pitch_entropy(score) == pytest.approx(2.0)  # four pitches once each
    assert symbolic.pitch_class_entropy(score) == pytest.approx(1.5)  # C 1/2, D 1/4, E 1/4


def test_empty_beat_rate_counts_held_notes_and_compound_beats():
    assert symbolic.empty_beat_rate(build_score(([(0, 1, 60), (1, 1, 62), (3, 1, 64)], False))) == 0.25
    # A half note fills beats 0 and 1; beat 2 is silent.
    assert symbolic.empty_beat_rate(build_score(([(0, 2, 60), (3, 1, 64)], False))) == 0.25
    # 6/8 beats are dotted quarters: [0, 1.5) and [4.5, 6) filled, [1.5, 3) and [3, 4.5) empty.
    compound = build_score(([(0, 1.5, 60), (4.5, 1.5, 62)], False), time_signatures=((0, 6, 8),))
    assert symbolic.empty_beat_rate(compound) == 0.5


def test_groove_consistency_hamming_between_bars():
    quarters = [(beat, 1, 60) for beat in range(4)]
    whole = build_score((quarters + [(4, 4, 60)], False))
    assert symbolic.groove_consistency(whole) == pytest.approx(1 - 3 / 96)  # 3 onsets differ
    eighths = [(4 + beat, 1, 60) for beat in range(4)] + [(8 + Fraction(k, 2), Fraction(1, 2), 60) for k in range(8)]
    # Bars 1-2 agree; bars 2-3 differ at the 4 off-beat 8ths: mean (0 + 4/96) / 2.
    assert symbolic.groove_consistency(build_score((quarters + eighths, False))) == pytest.approx(1 - 1 / 48)
    assert math.isnan(symbolic.groove_consistency(build_score(melody((60, 62)))))  # one bar


def test_musegan_bar_metrics_and_tonal_distance():
    upper = [(0, 4, 60), (4, 4, 64), (4, 4, 67), (8, 4, 60), (8, 4, 64), (8, 4, 67)]
    lower = [(0, 4, 55)]  # G3 in bar 1 only
    score = build_score((upper, False), (lower, False))
    assert symbolic.empty_bar_rate_per_track(score) == pytest.approx([0.0, 2 / 3])
    assert symbolic.empty_bar_rate(score) == pytest.approx(1 / 3)
    assert symbolic.used_pitch_classes_per_bar_per_track(score) == pytest.approx([2.0, 1.0])  # (1+2+3)/3, 1
    assert symbolic.used_pitch_classes_per_bar(score) == pytest.approx(1.5)
    # Only bar 1 has both: C against G. Their centroids (0, 1, 0, 1, 0, 1/2) and
    # (1/2, sqrt3/2, 1, 0, sqrt3/4, -1/4) are sqrt(4.75 - sqrt3) apart.
    expected = math.sqrt(4.75 - math.sqrt(3))
    assert symbolic.tonal_distance(score, 0, 1) == pytest.approx(expected)
    assert compute_all(score)["tonal_distance"] == pytest.approx(expected)
    same_chord = build_score(([(0, 4, 60), (0, 4, 64)], False), ([(0, 4, 52), (0, 4, 48)], False))
    assert symbolic.tonal_distance(same_chord) == pytest.approx(0.0, abs=1e-12)
    with_drums = build_score((upper, False), ([(0, 1, 36)], True))
    assert math.isnan(symbolic.tonal_distance(with_drums, 0, 1))
    with pytest.raises(IndexError, match="2 tracks"):
        symbolic.tonal_distance(with_drums, 0, 2)


def test_qualified_note_rate_threshold_is_a_32nd_note():
    notes = [(beat, 1, 60) for beat in range(4)] + [(4, Fraction(1, 16), 62), (5, Fraction(1, 8), 64)]
    assert symbolic.qualified_note_rate(build_score((notes, False))) == pytest.approx(5 / 6)  # the 64th fails


def test_drum_pattern_metrics():
    step = Fraction(1, 24)
    on_grid = [(Fraction(k, 4), Fraction(1, 4), 36) for k in (0, 2, 4, 6)]  # 16th positions 0, 12, 24, 36
    one_step_late = [(Fraction(1, 4) + step, Fraction(1, 4), 38)]  # step 7
    shifted_bar = [(4 + Fraction(k, 4) + step, Fraction(1, 4), 42) for k in (0, 2, 4, 6)]  # steps 1, 13, ...
    score = build_score((on_grid + one_step_late + shifted_bar, True))
    assert symbolic.drum_pattern_consistency(score) == pytest.approx(4 / 9)
    # Bar 1: (4 x 1 + 0.3) / 5 on the unshifted grid; bar 2: 4 / 4 on the grid shifted by one step.
    assert symbolic.drum_in_pattern_rate(score) == pytest.approx((0.86 + 1.0) / 2)


def test_drum_only_piece_has_nan_pitch_metrics():
    drums = [(Fraction(k, 2), Fraction(1, 4), 36 + k % 3) for k in range(16)]  # 8th notes, 2 bars
    values = compute_all(build_score((drums, True)))
    for name in PITCH_METRICS:
        assert math.isnan(values[name]), name
    assert values["drum_pattern_consistency"] == 1.0
    assert values["drum_in_pattern_rate"] == 1.0
    assert values["empty_bar_rate"] == 0.0
    assert values["groove_consistency"] == 1.0
    assert values["empty_beat_rate"] == 0.0


def test_piece_without_notes_is_nan_everywhere():
    empty = Score(480)
    empty.tracks.append(Track(name="silent", program=0))
    assert all(math.isnan(value) for value in compute_all(empty).values())
    assert all(math.isnan(value) for value in compute_all(Score(480)).values())
    assert np.isnan(symbolic.empty_bar_rate_per_track(empty)).all()


def test_metrical_grid_matches_symusic_bars_and_beats():
    notes = [(Fraction(k, 2), Fraction(1, 2), 60) for k in range(40)]
    # The 6/8 at quarter 6 cuts the 3/4 bar after two quarters; 6/8 beats are dotted quarters.
    score = build_score((notes, False), time_signatures=((0, 4, 4), (4, 3, 4), (6, 6, 8), (12, 2, 2)))
    grid = PieceNotes.from_score(score)
    assert grid.bar_start.tolist() == score.get_downbeats().tolist()
    assert grid.beat_start.tolist() == score.get_beats().tolist()
    assert np.diff(grid.bar_start).tolist() == [1920, 960, 1440, 1440, 1920]
    assert np.diff(grid.beat_start[6:10]).tolist() == [720, 720, 720]


def rich_piece(tpq: int) -> Score:
    triplets = [(Fraction(k, 3), Fraction(1, 3), 67 + k % 5) for k in range(6)]
    lead = triplets + [(2 + Fraction(k, 2), Fraction(1, 2), 60 + 2 * k) for k in range(10)] + [(7, 3, 66)]
    bass = [(0, 2, 43), (2, 2, 38), (4, 3, 41), (8, 2, 36)]
    drums = [(Fraction(k, 4), Fraction(1, 8), 36 + k % 4) for k in range(0, 40, 3)] + [(Fraction(1, 24), Fraction(1, 8), 42)]
    return build_score((lead, False), (bass, False), (drums, True), tpq=tpq, time_signatures=((0, 4, 4), (4, 3, 4)))


def test_same_music_at_another_resolution_gives_the_same_values():
    reference = compute_all(rich_piece(480))
    assert all(math.isfinite(value) for value in reference.values())
    for tpq in (960, 384):
        values = compute_all(rich_piece(tpq))
        assert values == pytest.approx(reference, rel=1e-12, abs=1e-12), tpq


def test_odd_pieces_never_crash_and_rates_stay_in_range():
    """Seeded odd inputs: coarse resolutions, stray time signatures (1/64, 11/32, mid-bar changes),
    zero-length notes, drum and empty tracks."""
    rates = ("polyphony_rate", "pitch_in_scale_rate", "scale_consistency", "empty_beat_rate", "groove_consistency",
             "drum_pattern_consistency", "empty_bar_rate", "qualified_note_rate", "drum_in_pattern_rate")
    rng = np.random.default_rng(0)
    finite_seen = dict.fromkeys(METRICS, 0)
    for _ in range(150):
        tpq = int(rng.choice([1, 3, 96, 100, 480]))
        score = Score(tpq)
        for _ in range(rng.integers(0, 4)):
            score.time_signatures.append(
                TimeSignature(int(rng.integers(0, 20 * tpq)), int(rng.integers(1, 13)), int(rng.choice([1, 2, 4, 8, 32, 64])))
            )
        for _ in range(rng.integers(0, 4)):
            track = Track(name="part", program=0, is_drum=bool(rng.random() < 0.3))
            for _ in range(rng.integers(0, 30)):
                onset, duration = int(rng.integers(0, 40 * tpq)), int(rng.integers(0, 4 * tpq))
                track.notes.append(Note(onset, duration, int(rng.integers(0, 128)), 80))
            score.tracks.append(track)
        values = compute_all(score)
        for name in rates:
            assert math.isnan(values[name]) or 0.0 <= values[name] <= 1.0, name
        assert math.isnan(values["polyphony"]) or values["polyphony"] >= 1.0
        for name, value in values.items():
            finite_seen[name] += math.isfinite(value)
    assert all(count > 10 for count in finite_seen.values()), finite_seen
