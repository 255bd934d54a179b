"""Copy detection against a training-set n-gram index."""

from __future__ import annotations

import math

import numpy as np
import pytest
from symusic import Note, Score, Track

from musefm.evaluation.memorization import ARRAYS_FILE, SETTINGS_FILE, MemorizationIndex, melody_tokens

TRAINING_DURATIONS = (0.5, 1.0, 1.5, 2.0)  # quarters; generated filler uses 0.75, never seen in training


def score_from(pitches, durations, tpq=480, bass=False) -> Score:
    """One melody of consecutive notes (durations in quarters), optionally over a lower voice."""
    score = Score(tpq)
    track = Track(name="melody", program=0)
    onset = 0
    for pitch, duration in zip(pitches, durations):
        track.notes.append(Note(onset, int(duration * tpq), int(pitch), 80))
        onset += int(duration * tpq)
    score.tracks.append(track)
    if bass:
        lower = Track(name="bass", program=32)
        for time in range(0, onset, 2 * tpq):
            lower.notes.append(Note(time, 2 * tpq, 36, 70))  # below the melody: not in the skyline
        score.tracks.append(lower)
    return score


@pytest.fixture(scope="module")
def training():
    rng = np.random.default_rng(7)
    melodies = [(rng.integers(60, 73, size=40), rng.choice(TRAINING_DURATIONS, size=40)) for _ in range(6)]
    scores = [score_from(pitches, durations) for pitches, durations in melodies]
    index = MemorizationIndex().fit(scores, ids=[f"piece{k}" for k in range(6)])
    return index, melodies


def test_tokens_are_intervals_and_durations_of_the_top_line():
    # The bass enters at beat 2 under the held D: accompaniment, not melody.
    score = score_from((60, 64, 62), (1.0, 0.5, 2.0), bass=True)
    # (interval + 128) * 256 + twelfths of a quarter
    assert melody_tokens(score).tolist() == [(4 + 128) * 256 + 6, (-2 + 128) * 256 + 24]
    assert melody_tokens(score.shift_pitch(7)).tolist() == melody_tokens(score).tolist()


def test_a_training_piece_is_fully_copied(training):
    index, _ = training
    melodies = training[1]
    report = index.check(score_from(*melodies[2]))
    assert report == {"longest_copied_notes": 40, "copied_ngram_share": 1.0, "source_id": "piece2", "flagged": True}


def test_a_transposed_copy_at_another_resolution_is_detected(training):
    index, melodies = training
    pitches, durations = melodies[4]
    report = index.check(score_from(pitches - 5, durations, tpq=960, bass=True))
    assert report["longest_copied_notes"] == 40
    assert report["copied_ngram_share"] == 1.0
    assert report["source_id"] == "piece4"
    assert report["flagged"]


def test_a_new_random_piece_shares_almost_nothing(training):
    index, _ = training
    rng = np.random.default_rng(123)
    report = index.check(score_from(rng.integers(60, 73, size=40), rng.choice(TRAINING_DURATIONS, size=40)))
    assert report["copied_ngram_share"] < 0.05
    assert report["longest_copied_notes"] == 0
    assert report["source_id"] is None
    assert not report["flagged"]


def test_a_copied_middle_passage_reports_its_length(training):
    index, melodies = training
    rng = np.random.default_rng(5)
    pitches, durations = melodies[1]
    # Filler two octaves up with an unseen duration: no token touching it can match training.
    filler = lambda: (rng.integers(84, 97, size=10), np.full(10, 0.75))  # noqa: E731
    before, after = filler(), filler()
    generated = score_from(
        np.concatenate([before[0], pitches[20:32] - 2, after[0]]),
        np.concatenate([before[1], durations[20:32], after[1]]),
    )
    report = index.check(generated)
    assert report["longest_copied_notes"] == 12
    assert report["source_id"] == "piece1"
    # 32 notes, 31 tokens, 24 8-grams; the 11 copied tokens hold 11 - 8 + 1 = 4 of them.
    assert report["copied_ngram_share"] == pytest.approx(4 / 24)
    assert not report["flagged"]  # 12 < 16 notes and 1/6 < 1/2


def test_too_short_or_empty_pieces_give_defined_values(training):
    index, _ = training
    for score in (score_from((60, 62, 64), (1.0, 1.0, 1.0)), Score(480)):
        report = index.check(score)
        assert report["longest_copied_notes"] == 0 and report["source_id"] is None and not report["flagged"]
        assert math.isnan(report["copied_ngram_share"])
    with pytest.raises(RuntimeError, match="fit"):
        MemorizationIndex().check(score_from((60, 62), (1.0, 1.0)))


def test_save_and_load_round_trip_without_pickle(training, tmp_path):
    index, melodies = training
    index.save(tmp_path / "index")
    index.save(tmp_path / "index")  # replacing an existing index works too
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == sorted([ARRAYS_FILE, SETTINGS_FILE])
    assert [path.name for path in tmp_path.iterdir()] == ["index"]  # no staging left behind
    loaded = MemorizationIndex.load(tmp_path / "index")
    assert loaded.ids_ == index.ids_ and loaded.ngram_length == 8
    np.testing.assert_array_equal(loaded.ngram_hashes_, index.ngram_hashes_)
    pitches, durations = melodies[3]
    assert loaded.check(score_from(pitches + 3, durations)) == index.check(score_from(pitches + 3, durations))
