import numpy as np
import pytest

from musefm.data.music import estimate_key, key_from_signature, key_index, parse_key, transpose_key


def test_key_from_signature_hand_cases():
    assert key_from_signature(0, "major") == "C major"
    assert key_from_signature(0, "minor") == "A minor"
    assert key_from_signature(3, "major") == "A major"
    assert key_from_signature(-2, "major") == "Bb major"
    assert key_from_signature(-3, "minor") == "C minor"


def test_transpose_key_moves_and_wraps():
    assert transpose_key("G major", 2) == "A major"
    assert transpose_key("B minor", 1) == "C minor"
    assert transpose_key("C major", -1) == "B major"
    assert transpose_key(None, 3) is None
    assert key_index(transpose_key("E minor", 12)) == key_index("E minor")


def test_parse_key_enharmonics():
    assert parse_key("Db major") == parse_key("C# major") == (1, "major")
    assert key_index("A minor") == 9 + 12
    assert key_index(None) == -1
    with pytest.raises(ValueError):
        parse_key("C lydian")


def test_estimate_key_on_scales():
    c_major = np.array([60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60])
    assert estimate_key(c_major, np.ones(len(c_major))) == "C major"
    # A harmonic minor with tonic weight: the relative-minor decision from a 0-sharp signature.
    a_minor = np.array([57, 59, 60, 62, 64, 65, 68, 69, 64, 57, 57, 69])
    assert estimate_key(a_minor, np.ones(len(a_minor)), sharps=0) == "A minor"
    assert estimate_key(np.array([]), np.array([])) is None
