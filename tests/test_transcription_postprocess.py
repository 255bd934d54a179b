"""Activations -> notes decoding on hand-made activations, and notes -> MIDI / CSV round trips."""

from __future__ import annotations

import numpy as np
import pytest

from musefm.errors import BadInputError, MusefmError
from musefm.transcription.labels import MIN_MIDI, NUM_KEYS, notes_from_midi, notes_to_targets
from musefm.transcription.postprocess import (CONTEXT_FRAMES, DecodeConfig, NoteDecoder, activations_to_notes,
                                              notes_to_score, read_notes_csv, write_midi, write_notes_csv)

RATE = 100.0
C4, E4 = 60 - MIN_MIDI, 64 - MIN_MIDI


def empty(frames=60):
    return np.zeros((frames, NUM_KEYS), np.float32), np.zeros((frames, NUM_KEYS), np.float32)


def test_single_note_from_an_onset_blob():
    onset, frame = empty()
    onset[10:13, C4] = [0.6, 0.9, 0.7]  # a three-frame onset blob is one note
    frame[10:30, C4] = 0.8
    notes = activations_to_notes(onset, frame, RATE)
    assert notes.dtype == np.float64
    np.testing.assert_allclose(notes, [[0.10, 0.30, 60, 64]])


def test_restrike_ends_the_previous_note():
    onset, frame = empty()
    frame[10:50, C4] = 0.9  # the key sounds throughout, struck again at frame 30
    onset[[10, 30], C4] = 0.9
    np.testing.assert_allclose(activations_to_notes(onset, frame, RATE), [[0.10, 0.30, 60, 64], [0.30, 0.50, 60, 64]])


def test_two_simultaneous_pitches_sorted_by_onset_then_pitch():
    onset, frame = empty()
    onset[20, [E4, C4]] = 1.0
    frame[20:25, C4] = 1.0
    frame[20:40, E4] = 1.0
    onset[5, E4] = 1.0
    frame[5:8, E4] = 1.0
    np.testing.assert_allclose(activations_to_notes(onset, frame, RATE),
                               [[0.05, 0.08, 64, 64], [0.20, 0.25, 60, 64], [0.20, 0.40, 64, 64]])


def test_frames_without_an_onset_start_nothing():
    onset, frame = empty()
    frame[10:30, C4] = 0.9  # sounding but never struck
    frame[10:30, E4] = 0.9
    onset[10, E4] = 0.45  # struck too softly to count
    assert activations_to_notes(onset, frame, RATE).shape == (0, 4)
    lower = activations_to_notes(onset, frame, RATE, config=DecodeConfig(onset_threshold=0.4))
    np.testing.assert_allclose(lower, [[0.10, 0.30, 64, 64]])


def test_a_weak_onset_where_the_frame_rises_starts_a_note_only_when_enabled():
    onset, frame = empty()
    frame[20:40, C4] = 0.9  # sounds from frame 20; the onset head only half hears it, at frame 21
    onset[19:23, C4] = [0.05, 0.12, 0.2, 0.1]
    frame[10:50, E4] = 0.9  # held from frame 10 (a real onset); a weak bump inside it is no new note
    onset[10, E4] = 0.9
    onset[30, E4] = 0.2
    onset[45, C4] = 0.25  # a weak onset where the frame does not rise (C4 fell silent at 40): nothing
    strict = activations_to_notes(onset, frame, RATE)
    np.testing.assert_allclose(strict, [[0.10, 0.50, 64, 64]])
    lenient = activations_to_notes(onset, frame, RATE, config=DecodeConfig(frame_onset_threshold=0.15))
    np.testing.assert_allclose(lenient, [[0.10, 0.50, 64, 64], [0.21, 0.40, 60, 64]])
    # A peak under the weak threshold, or one more than FRAME_ONSET_FRAMES frames from the rise, is not enough.
    assert len(activations_to_notes(onset, frame, RATE, config=DecodeConfig(frame_onset_threshold=0.25))) == 1
    onset[19:23, C4] = 0.0
    onset[17, C4] = 0.2
    assert len(activations_to_notes(onset, frame, RATE, config=DecodeConfig(frame_onset_threshold=0.15))) == 1
    with pytest.raises(MusefmError, match="frame_onset_threshold"):
        DecodeConfig(frame_onset_threshold=1.5)


def test_onset_alone_keeps_the_note_alive_and_notes_reach_the_end():
    onset, frame = empty(frames=40)
    onset[10:12, C4] = 0.9  # no frame activation at all: the note lasts while the onset is high
    onset[35, E4] = 0.9
    frame[35:, E4] = 0.9  # still sounding on the last frame: ends at T / rate
    np.testing.assert_allclose(activations_to_notes(onset, frame, RATE), [[0.10, 0.12, 60, 64], [0.35, 0.40, 64, 64]])


def test_velocity_mapping():
    onset, frame = empty()
    velocity = np.zeros_like(onset)
    for key, value in zip(range(4), [0.8, 0.0, 1.0, 0.5]):
        onset[10, key] = frame[10:20, key] = 1.0
        velocity[10, key] = value
    velocity[11, 0] = 0.1  # only the onset frame counts
    notes = activations_to_notes(onset, frame, RATE, velocity=velocity)
    np.testing.assert_allclose(notes[:, 3], [102, 1, 127, 64])  # 101.6 -> 102; 0 -> clipped to 1; 63.5 -> 64


def test_offset_activation_ends_notes_only_when_enabled():
    onset, frame = empty()
    offset = np.zeros_like(onset)
    onset[10, C4] = 1.0
    frame[10:40, C4] = 1.0
    offset[25, C4] = 0.9
    offset[30, C4] = 0.3  # below threshold
    np.testing.assert_allclose(activations_to_notes(onset, frame, RATE, offset=offset)[:, :2], [[0.10, 0.40]])
    config = DecodeConfig(offset_threshold=0.5)
    np.testing.assert_allclose(activations_to_notes(onset, frame, RATE, offset=offset, config=config)[:, :2],
                               [[0.10, 0.25]])


def test_min_note_seconds_and_bad_inputs():
    onset, frame = empty()
    onset[10, C4] = onset[20, E4] = 1.0
    frame[20:30, E4] = 1.0  # C4 lasts one frame (10 ms), E4 ten (100 ms)
    notes = activations_to_notes(onset, frame, RATE, config=DecodeConfig(min_note_seconds=0.05))
    np.testing.assert_allclose(notes[:, 2], [64])
    with pytest.raises(ValueError):
        activations_to_notes(onset, frame[:, :80], RATE)
    with pytest.raises(MusefmError, match="onset_threshold"):
        DecodeConfig(onset_threshold=1.5)
    assert activations_to_notes(*empty(frames=0), RATE).shape == (0, 4)


def blobby_activations(generator, frames):
    """Random activations that hold each value for 3 frames, so runs, rises and weak onset peaks
    land on and around every block boundary."""
    held = np.repeat(generator.random((frames // 3 + 1, NUM_KEYS)), 3, axis=0)[:frames] ** generator.uniform(0.5, 4)
    return np.clip(held + 0.05 * generator.random((frames, NUM_KEYS)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("config", [DecodeConfig(onset_threshold=0.6, frame_threshold=0.4, frame_onset_threshold=0.1),
                                    DecodeConfig(onset_threshold=0.5, frame_threshold=0.3, offset_threshold=0.9,
                                                 min_note_seconds=0.03)])
def test_streamed_decoding_equals_decoding_the_whole(config):
    """Blocks of any size, cut anywhere (one frame, empty, near each other), give exactly the notes
    of one call on the whole piece, while the decoder keeps only a few frames between blocks."""
    generator = np.random.default_rng(0)
    for trial in range(40):
        frames = int(generator.integers(1, 400))
        heads = {name: blobby_activations(generator, frames) for name in ("onset", "frame", "velocity", "offset")}
        whole = activations_to_notes(heads["onset"], heads["frame"], RATE, velocity=heads["velocity"],
                                     offset=heads["offset"], config=config)
        edges = [0, *np.sort(generator.integers(0, frames + 1, size=generator.integers(1, 15))), frames]
        decoder = NoteDecoder(RATE, config)
        for low, high in zip(edges[:-1], edges[1:]):
            decoder.push(*(heads[name][low:high] for name in ("onset", "frame")), velocity=heads["velocity"][low:high],
                         offset=heads["offset"][low:high])
            assert len(decoder._pending["onset"]) <= high - low + CONTEXT_FRAMES + 4
        assert np.array_equal(decoder.finish(), whole) and len(whole) > 0, trial
    with pytest.raises(ValueError, match="same heads"):
        decoder = NoteDecoder(RATE)
        decoder.push(*empty(), velocity=empty()[0])
        decoder.push(*empty())


def test_targets_decode_back_to_the_notes():
    notes = np.array([[0.10, 0.45, 60, 100], [0.30, 0.40, 64, 51], [0.45, 0.80, 60, 26], [0.50, 0.90, 21, 127]])
    targets = notes_to_targets(notes, 100, RATE)
    decoded = activations_to_notes(targets["onset"], targets["frame"], RATE, velocity=targets["velocity"],
                                   offset=targets["offset"], config=DecodeConfig(offset_threshold=0.5))
    expected = notes[np.lexsort((notes[:, 2], notes[:, 0]))]
    np.testing.assert_allclose(decoded, expected)


def test_midi_round_trip(tmp_path):
    generator = np.random.default_rng(0)
    onsets = np.sort(generator.uniform(0, 20, 50)).round(3)
    notes = np.stack([onsets, onsets + generator.uniform(0.05, 2, 50).round(3),
                      np.arange(50) + 30.0, generator.integers(1, 128, 50).astype(float)], axis=1)  # (50, 4)
    path = write_midi(notes, tmp_path / "out" / "notes.mid")
    assert [item.name for item in path.parent.iterdir()] == ["notes.mid"]  # no temporary left behind
    again = notes_from_midi(path)
    assert again.shape == notes.shape
    np.testing.assert_allclose(again, notes[np.lexsort((notes[:, 2], notes[:, 0]))], atol=1e-3)
    score = notes_to_score(notes, program=5)
    assert score.tracks[0].program == 5 and score.tracks[0].notes[0].duration >= 1


def test_csv_round_trip_and_bad_csv(tmp_path):
    notes = np.array([[0.123456, 1.5, 60, 80], [2.0, 2.25, 72, 1]])
    path = write_notes_csv(notes, tmp_path / "notes.csv")
    assert path.read_text().splitlines()[0] == "onset,offset,pitch,velocity"
    np.testing.assert_allclose(read_notes_csv(path), notes)
    assert read_notes_csv(write_notes_csv(np.zeros((0, 4)), tmp_path / "empty.csv")).shape == (0, 4)
    cases = {"header.csv": "start,end,pitch,velocity\n0,1,60,80\n", "text.csv": "onset,offset,pitch,velocity\n0,x,60,80\n",
             "short.csv": "onset,offset,pitch,velocity\n0,1,60\n", "order.csv": "onset,offset,pitch,velocity\n1,0.5,60,80\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BadInputError) as caught:
            read_notes_csv(tmp_path / name)
        assert name in str(caught.value)
    with pytest.raises(BadInputError):
        read_notes_csv(tmp_path / "missing.csv")


def test_tuning_keeps_frame_supported_onsets_only_when_they_score_higher(tmp_path):
    import soundfile as sf

    from musefm.models.transcriber import TranscriberConfig
    from musefm.transcription.transcribe import tune_decoding

    class StubModel:  # hand-made activations instead of a network: one sure note, one soft one
        config = TranscriberConfig()

        def __init__(self, soft_onset: float):
            self.soft_onset = soft_onset

        def activations(self, mel):
            onset, frame = empty(frames=len(mel))
            onset[10, C4], frame[10:30, C4] = 0.9, 0.9
            onset[20, E4], frame[20:40, E4] = self.soft_onset, 0.9
            return {"onset": onset, "frame": frame, "velocity": np.full_like(onset, 64 / 127)}

    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(16000), 16000)  # 1 s: 51 frames at 50 frames/s
    rate = TranscriberConfig().frame_rate
    both = np.array([[10 / rate, 30 / rate, 60, 64], [20 / rate, 40 / rate, 64, 64]])
    decode, scores = tune_decoding(StubModel(soft_onset=0.12), [(audio, both)])
    assert (decode.onset_threshold, decode.frame_onset_threshold) == (0.3, 0.05) and scores["note_f1"] == 1.0
    decode, _ = tune_decoding(StubModel(soft_onset=0.12), [(audio, both[:1])])  # the soft "note" is not in the reference
    assert decode.frame_onset_threshold is None
