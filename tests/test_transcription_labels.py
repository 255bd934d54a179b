"""Training targets from notes and notes from MIDI (sustain pedal as in MAESTRO), on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
from symusic import ControlChange, Note, Score, Tempo, Track

from musefm.errors import BadInputError
from musefm.transcription.labels import (MIN_MIDI, NUM_KEYS, harmonically_masked, masked_note_weights, notes_from_midi,
                                        notes_from_score, notes_to_targets)

RATE = 100.0
C4 = 60 - MIN_MIDI  # key column of middle C


def active(roll, key=C4):
    return np.flatnonzero(roll[:, key]).tolist()


def test_single_note_targets():
    targets = notes_to_targets(np.array([[0.1, 0.35, 60, 127]]), num_frames=50, frame_rate=RATE)
    assert set(targets) == {"onset", "frame", "offset", "velocity"}
    for roll in targets.values():
        assert roll.shape == (50, NUM_KEYS) and roll.dtype == np.float32
    assert active(targets["onset"]) == [10]
    assert active(targets["frame"]) == list(range(10, 35))
    assert active(targets["offset"]) == [35]
    assert targets["velocity"][10, C4] == pytest.approx(1.0)
    assert targets["velocity"].sum() == pytest.approx(1.0)  # only at the onset frame
    assert targets["frame"].sum() == 25  # nothing on other keys


def test_label_widths_and_minimum_length():
    targets = notes_to_targets(np.array([[0.1, 0.3, 60, 64], [0.2, 0.2, 72, 64]]), 40, RATE,
                               onset_frames=2, offset_frames=3)
    assert active(targets["onset"]) == [10, 11]
    assert active(targets["offset"]) == [30, 31, 32]
    assert targets["velocity"][10:12, C4] == pytest.approx([64 / 127] * 2)
    zero_length = 72 - MIN_MIDI
    assert active(targets["frame"], zero_length) == [20]  # at least one frame
    assert active(targets["onset"], zero_length) == [20]  # onset label never outlasts the note
    assert active(targets["offset"], zero_length) == [21, 22, 23]


def test_restrike_later_onset_wins():
    # The second strike comes before the first note is released: one continuous frame run, two onsets,
    # and the first note's offset is not labelled in the middle of the second note.
    notes = np.array([[0.1, 0.5, 60, 100], [0.3, 0.6, 60, 50]])
    targets = notes_to_targets(notes[::-1], 80, RATE)  # input order does not matter
    assert active(targets["onset"]) == [10, 30]
    assert active(targets["frame"]) == list(range(10, 60))
    assert active(targets["offset"]) == [60]
    assert targets["velocity"][[10, 30], C4] == pytest.approx([100 / 127, 50 / 127])


def test_harmonically_masked_notes_are_softer_ones_on_a_louder_notes_partials():
    notes = np.array([[0.0, 2.0, 48, 90],  # C3, loud and held
                      [0.0, 1.0, 60, 50],  # C4, its octave, softer: masked
                      [0.5, 1.5, 67, 40],  # G4, its twelfth, starting while C3 sounds: masked
                      [0.2, 1.0, 52, 30],  # E3, a third above: no partial of C3 lands there
                      [0.0, 1.0, 72, 100],  # C5, two octaves up but louder than C3
                      [2.5, 3.0, 60, 20],  # C4 again after C3 ended
                      [0.02, 0.5, 36, 95]])  # C2 starting 20 ms after C3 (within tolerance): C3 is on its octave
    assert harmonically_masked(notes).tolist() == [True, True, True, False, False, False, False]
    assert harmonically_masked(notes, tolerance=0.0).tolist() == [False, True, True, False, False, False, False]
    assert harmonically_masked(np.zeros((0, 4))).shape == (0,)


def test_masked_note_weights_weigh_only_the_sounding_frames_of_masked_notes():
    notes = np.array([[0.0, 0.5, 48, 90], [0.1, 0.3, 60, 50], [0.1, 0.3, 64, 50]])  # C3; C4 masked, E4 not
    sounding = notes_to_targets(notes, 60, RATE)["frame"]
    weights = masked_note_weights(notes, sounding, RATE, 3.0)
    assert weights.shape == (60, NUM_KEYS) and weights.dtype == np.float32
    assert np.flatnonzero(weights[:, C4] == 3.0).tolist() == list(range(10, 30))  # onset frame to offset
    assert (weights == 3.0).sum() == 20 and set(np.unique(weights).tolist()) == {1.0, 3.0}
    assert (masked_note_weights(notes, sounding, RATE, 1.0) == 1.0).all()


def test_out_of_range_pitches_and_clipping():
    notes = np.array([[0.0, 0.2, 20, 80], [0.0, 0.2, 109, 80],  # not piano keys
                      [-0.05, 0.05, 60, 80],  # starts before the excerpt: frames, no onset
                      [0.15, 0.5, 62, 80],  # runs past the end: no offset
                      [0.3, 0.4, 64, 80]])  # starts after the end: ignored
    targets = notes_to_targets(notes, 20, RATE)
    assert targets["frame"][:, [0, NUM_KEYS - 1]].sum() == 0
    assert active(targets["frame"]) == [0, 1, 2, 3, 4] and active(targets["onset"]) == []
    assert active(targets["offset"]) == [5]
    assert active(targets["frame"], 62 - MIN_MIDI) == list(range(15, 20))
    assert active(targets["offset"], 62 - MIN_MIDI) == []
    assert targets["frame"][:, 64 - MIN_MIDI].sum() == 0
    assert notes_to_targets(np.zeros((0, 4)), 5, RATE)["frame"].shape == (5, NUM_KEYS)


SECOND = 960  # ticks per second at 480 ticks per quarter and 120 bpm


def make_score(notes, pedal=(), drum_notes=()):
    """A 120 bpm score from (onset s, offset s, pitch, velocity) and (time s, CC64 value) pairs."""
    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    track = Track("piano", 0, False)
    for onset, offset, pitch, velocity in notes:
        track.notes.append(Note(round(onset * SECOND), round((offset - onset) * SECOND), pitch, velocity))
    for time, value in pedal:
        track.controls.append(ControlChange(round(time * SECOND), 64, value))
    score.tracks.append(track)
    drums = Track("drums", 0, True)
    for onset, offset, pitch, velocity in drum_notes:
        drums.notes.append(Note(round(onset * SECOND), round((offset - onset) * SECOND), pitch, velocity))
    score.tracks.append(drums)
    return score


def test_notes_from_score_merges_sorts_and_drops_drums():
    score = make_score([(0.5, 1.0, 64, 90), (0.0, 0.25, 67, 70), (0.5, 0.75, 60, 80)], drum_notes=[(0.0, 0.1, 36, 100)])
    second_track = Track("left hand", 32, False)
    second_track.notes.append(Note(0, 480, 48, 60))
    score.tracks.append(second_track)
    notes = notes_from_score(score)
    assert notes.dtype == np.float64 and notes.shape == (4, 4)
    expected = [[0.0, 0.5, 48, 60], [0.0, 0.25, 67, 70], [0.5, 0.75, 60, 80], [0.5, 1.0, 64, 90]]  # onset, pitch
    np.testing.assert_allclose(notes, expected, atol=1e-6)


def test_sustain_pedal_extends_notes_like_maestro():
    notes = [(0.0, 1.0, 60, 80),  # released under the pedal: lasts until the pedal lifts at 2.0
             (0.2, 0.4, 64, 80),  # released before the pedal goes down: unchanged
             (1.0, 2.5, 62, 80),  # key still held when the pedal lifts: unchanged
             (0.6, 0.8, 67, 80), (1.2, 1.3, 67, 90)]  # re-struck under the pedal: first ends at 1.2
    score = make_score(notes, pedal=[(0.5, 127), (1.5, 100), (2.0, 0)])
    expected = [[0.0, 2.0, 60, 80], [0.2, 0.4, 64, 80], [0.6, 1.2, 67, 80], [1.0, 2.5, 62, 80], [1.2, 2.0, 67, 90]]
    np.testing.assert_allclose(notes_from_score(score), expected, atol=1e-6)
    np.testing.assert_allclose(notes_from_score(score, apply_sustain=False),
                               sorted([list(note) for note in notes], key=lambda n: (n[0], n[2])), atol=1e-6)


def test_pedal_value_below_64_is_up_and_unreleased_pedal_lasts_to_the_end():
    score = make_score([(0.0, 0.5, 60, 80), (1.0, 3.0, 72, 80)], pedal=[(0.25, 63)])
    np.testing.assert_allclose(notes_from_score(score)[:, 1], [0.5, 3.0], atol=1e-6)
    score = make_score([(0.0, 0.5, 60, 80), (1.0, 3.0, 72, 80)], pedal=[(0.25, 64)])
    np.testing.assert_allclose(notes_from_score(score)[:, 1], [3.0, 3.0], atol=1e-6)


def test_notes_from_midi_file_and_bad_files(tmp_path):
    path = tmp_path / "piece.mid"
    make_score([(0.0, 1.0, 60, 80)], pedal=[(0.5, 127), (1.5, 0)]).dump_midi(str(path))
    np.testing.assert_allclose(notes_from_midi(path), [[0.0, 1.5, 60, 80]], atol=1e-6)
    corrupt = tmp_path / "corrupt.mid"
    corrupt.write_bytes(b"MThd this is not a MIDI file")
    for bad in (corrupt, tmp_path / "missing.mid"):
        with pytest.raises(BadInputError) as caught:
            notes_from_midi(bad)
        assert caught.value.path == str(bad) and "\n" not in str(caught.value)
