"""Shared fixtures: small music files of every supported format, made here (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from symusic import Note, Score, Tempo, TimeSignature, Track, KeySignature

ABC_TWO_TUNES = """X:1
T:Tune one
M:4/4
L:1/8
K:G
GABc d2 B2|c2 A2 G4|]

X:2
T:Tune two
M:3/4
L:1/4
K:Dm
D F A|d2 A|F E D|]
"""

KERN = """**kern
*M3/4
*k[f#]
=1
4d
4f#
4a
=2
2.d'
==
*-
"""


def make_score(pitches=(60, 62, 64, 65, 67, 65, 64, 62), tpq=480, qpm=100.0, program=0, velocity=80,
               numerator=4, denominator=4, chord=False) -> Score:
    """A small one- or two-track score: a melody (and a chordal second track when ``chord``)."""
    score = Score(tpq)
    score.tempos.append(Tempo(0, qpm))
    score.time_signatures.append(TimeSignature(0, numerator, denominator))
    score.key_signatures.append(KeySignature(0, 0, 0))
    melody = Track(name="melody", program=program, is_drum=False)
    for index, pitch in enumerate(pitches):
        melody.notes.append(Note(index * tpq, tpq, pitch, velocity))
    score.tracks.append(melody)
    if chord:
        bass = Track(name="bass", program=32, is_drum=False)
        for index in range(0, len(pitches), 4):
            for pitch in (36, 43):
                bass.notes.append(Note(index * tpq, 4 * tpq, pitch, 70))
        score.tracks.append(bass)
    return score


def write_musicxml(path: Path) -> None:
    from music21 import meter, note, stream, key

    part = stream.Part()
    part.append(meter.TimeSignature("4/4"))
    part.append(key.Key("F"))
    for name in ("F4", "G4", "A4", "B-4", "C5", "A4", "F4", "C4"):
        part.append(note.Note(name, quarterLength=1))
    score = stream.Score([part])
    score.write("musicxml", fp=str(path))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One music21 conversion cache for the whole session (music21 parsing is slow)."""
    path = tmp_path_factory.mktemp("musefm-cache")
    os.environ["MUSEFM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def good_files(tmp_path_factory) -> Path:
    """A folder with one readable file of every supported format (7 pieces in all)."""
    root = tmp_path_factory.mktemp("good")
    (root / "midi").mkdir()
    make_score().dump_midi(str(root / "midi" / "scale.mid"))
    make_score(pitches=(57, 60, 64, 69, 64, 60, 57, 45), chord=True, qpm=132.0).dump_midi(str(root / "midi" / "duo.MIDI"))
    (root / "notation").mkdir()
    write_musicxml(root / "notation" / "melody.musicxml")
    (root / "notation" / "tunes.abc").write_text(ABC_TWO_TUNES)
    (root / "notation" / "kern.krn").write_text(KERN)
    (root / "notes.txt").write_text("not music, ignored by suffix")
    return root


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> Path:
    """A folder of every kind of bad input, with the reason each must be rejected for."""
    root = tmp_path_factory.mktemp("bad")
    good = make_score().dumps_midi()
    (root / "empty.mid").write_bytes(b"")
    (root / "random.mid").write_bytes(os.urandom(2000))
    (root / "truncated.mid").write_bytes(good[: len(good) // 2])
    (root / "broken.musicxml").write_text("<?xml version='1.0'?><score-partwise><part-list><score-part id='P1'>")
    (root / "broken.krn").write_text("**kern\n4c\t4d\n*-\n")  # more fields than spines
    (root / "broken.abc").write_text("X:1\nT:nothing here\nK:G\n")
    Score(480).dump_midi(str(root / "silent.mid"))
    fast = make_score(qpm=5000.0)
    fast.dump_midi(str(root / "absurd_tempo.mid"))
    long = make_score()
    long.tracks[0].notes.append(Note(0, 2_000_000_000, 60, 80))
    long.dump_midi(str(root / "absurd_duration.mid"))
    return root


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to the thrashing of busy shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
