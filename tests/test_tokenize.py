
import numpy as np
import pytest

from musefm.data import corpus
from musefm.data.tokenize import (
    TOKENIZER_CLASSES, apply_bpe, decode, encode, load_tokenizer, make_tokenizer, save_tokenizer, score_notes,
    train_bpe, undo_bpe,
)
from musefm.errors import BadInputError, MusefmError


@pytest.fixture(scope="module")
def fixture_pieces(good_files, cache_dir):
    pieces = list(corpus.iter_pieces(f"dir:{good_files}", cache_dir))
    pieces.append(corpus.load_piece("music21:bach/bwv66.6", cache_dir))
    return pieces


@pytest.mark.parametrize("name", sorted(TOKENIZER_CLASSES))
def test_every_fixture_round_trips(name, fixture_pieces):
    tokenizer = make_tokenizer(name)
    for piece in fixture_pieces:
        ids = encode(tokenizer, piece.score, piece.meta.id)
        assert ids.ndim == (2 if name == "octuple" else 1)
        expected = score_notes(tokenizer.preprocess_score(piece.score.copy()))
        assert score_notes(decode(tokenizer, ids)) == expected, piece.meta.id
        assert len(expected) == piece.score.note_num()  # nothing dropped by preprocessing


@pytest.mark.parametrize("name", sorted(TOKENIZER_CLASSES))
def test_save_load_gives_an_equal_tokenizer(name, tmp_path, fixture_pieces):
    tokenizer = make_tokenizer(name, num_velocities=16)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tokenizer) and loaded.vocab == tokenizer.vocab
    score = fixture_pieces[-1].score
    np.testing.assert_array_equal(encode(loaded, score), encode(tokenizer, score))


def test_bpe_training_merges_and_round_trips(tmp_path, fixture_pieces):
    tokenizer = make_tokenizer("remi")
    sequences = [encode(tokenizer, p.score) for p in fixture_pieces]
    base_size = tokenizer.vocab_size
    train_bpe(tokenizer, sequences, base_size + 40)
    assert tokenizer.is_trained and tokenizer.vocab_size > base_size
    for ids in sequences:
        merged = apply_bpe(tokenizer, ids)
        assert len(merged) < len(ids)
        np.testing.assert_array_equal(undo_bpe(tokenizer, merged), ids)
    save_tokenizer(tokenizer, tmp_path / "bpe.json")
    reloaded = load_tokenizer(tmp_path / "bpe.json")
    np.testing.assert_array_equal(apply_bpe(reloaded, sequences[0]), apply_bpe(tokenizer, sequences[0]))


def test_bpe_errors():
    with pytest.raises(MusefmError, match="Octuple"):
        train_bpe(make_tokenizer("octuple"), [], 1000)
    with pytest.raises(MusefmError, match="exceed"):
        train_bpe(make_tokenizer("remi"), [], 10)


def test_out_of_range_score_is_rejected():
    from tests.conftest import make_score

    with pytest.raises(BadInputError, match="pitch range"):
        encode(make_tokenizer("remi"), make_score(pitches=(5, 6, 7, 8)), "low.mid")


def test_unknown_tokenizer_and_bad_file(tmp_path):
    with pytest.raises(MusefmError, match="unknown tokenizer"):
        make_tokenizer("cpword")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(MusefmError, match="not a MidiTok tokenizer"):
        load_tokenizer(tmp_path / "t.json")
