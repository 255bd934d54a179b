"""musefm's fast REMI encoder must give exactly MidiTok's ids."""

import numpy as np
import pytest
from symusic import Note, Score, Tempo, TimeSignature, Track

from musefm.data import corpus
from musefm.data.fast_remi import encode_remi, supports
from musefm.data.tokenize import make_tokenizer
from tests.conftest import make_score


def _miditok_ids(tokenizer, score):
    return np.asarray(tokenizer.encode(score, encode_ids=False).ids)


def _meter_changes_score() -> Score:
    """Meter and tempo changes, an empty bar, drums, three programs and a chord."""
    tpq = 480
    score = Score(tpq)
    score.time_signatures.extend([TimeSignature(0, 4, 4), TimeSignature(8 * tpq, 3, 4), TimeSignature(14 * tpq, 6, 8)])
    score.tempos.extend([Tempo(0, 120.0), Tempo(5 * tpq, 90.0), Tempo(14 * tpq, 140.0)])
    piano, strings, drums = Track(program=0), Track(program=48), Track(program=0, is_drum=True)
    for beat in range(0, 24):
        if 8 <= beat < 11:  # one silent 3/4 bar
            continue
        piano.notes.append(Note(beat * tpq, tpq // 2 + 40 * (beat % 3), 60 + beat % 12, 60 + beat))
        drums.notes.append(Note(beat * tpq, tpq // 4, 36 + beat % 3, 100))
    for chord_pitch in (48, 52, 55):
        strings.notes.append(Note(2 * tpq, 6 * tpq, chord_pitch, 70))
    strings.notes.append(Note(15 * tpq + 120, 3 * tpq, 67, 90))  # off the beat in 6/8
    score.tracks.extend([piano, strings, drums])
    return score


def test_supported_settings():
    assert supports(make_tokenizer("remi"))
    assert not supports(make_tokenizer("tsd")) and not supports(make_tokenizer("octuple"))
    assert not supports(make_tokenizer("remi", use_rests=True))
    assert not supports(make_tokenizer("remi", use_programs=False))


def test_equal_on_hand_made_scores():
    tokenizer = make_tokenizer("remi")
    for score in (_meter_changes_score(), make_score(), make_score(chord=True, qpm=71.3, numerator=6, denominator=8)):
        ids = encode_remi(tokenizer, score)
        assert ids is not None
        np.testing.assert_array_equal(ids, _miditok_ids(tokenizer, score))


def test_equal_on_fixtures_and_corpus(good_files, cache_dir):
    tokenizer = make_tokenizer("remi")
    pieces = list(corpus.iter_pieces(f"dir:{good_files}", cache_dir))
    pieces += list(corpus.iter_pieces("music21:oneills1850/0001-0050", cache_dir))[:25]
    pieces += [corpus.load_piece(f"music21:bach/{name}", cache_dir) for name in ("bwv66.6", "bwv1.6", "bwv10.7")]
    for piece in pieces:
        np.testing.assert_array_equal(encode_remi(tokenizer, piece.score), _miditok_ids(tokenizer, piece.score),
                                      err_msg=piece.meta.id)


@pytest.mark.parametrize("settings", [dict(num_velocities=8), dict(beat_res={(0, 4): 4, (4, 8): 2}),
                                      dict(use_tempos=False), dict(use_time_signatures=False)])
def test_equal_under_other_settings(settings):
    tokenizer = make_tokenizer("remi", **settings)
    assert supports(tokenizer)
    score = _meter_changes_score()
    np.testing.assert_array_equal(encode_remi(tokenizer, score), _miditok_ids(tokenizer, score))
