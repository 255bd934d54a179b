import json
from pathlib import Path

import pytest

from musefm.data import convert, corpus
from musefm.errors import MusefmError
from tests.conftest import make_score


def _load_all(spec, cache_dir):
    pieces, rejections = [], []
    for item in corpus.list_items(spec):
        for result in corpus.load_item(item, cache_dir):
            (pieces if isinstance(result, corpus.Piece) else rejections).append(result)
    return pieces, rejections


def test_dir_source_reads_every_format(good_files, cache_dir):
    pieces, rejections = _load_all(f"dir:{good_files}", cache_dir)
    assert not rejections
    ids = sorted(p.meta.id for p in pieces)
    assert ids == sorted([
        "dir:midi/duo.MIDI", "dir:midi/scale.mid", "dir:notation/kern.krn", "dir:notation/melody.musicxml",
        "dir:notation/tunes.abc#1", "dir:notation/tunes.abc#2",
    ])
    by_id = {p.meta.id: p for p in pieces}
    assert by_id["dir:notation/tunes.abc#1"].meta.title == "Tune one"
    assert by_id["dir:notation/tunes.abc#2"].meta.key == "D minor"
    assert by_id["dir:notation/tunes.abc#2"].meta.time_signature == "3/4"
    assert by_id["dir:notation/melody.musicxml"].meta.key == "F major"
    assert by_id["dir:notation/kern.krn"].meta.time_signature == "3/4"
    assert by_id["dir:midi/scale.mid"].meta.collection == "midi"
    # The musicxml melody: 8 quarter notes, F4 first.
    melody = by_id["dir:notation/melody.musicxml"].score
    notes = melody.tracks[0].notes
    assert [n.pitch for n in notes][:3] == [65, 67, 69] and notes[1].time - notes[0].time == melody.tpq


def test_music21_conversion_is_cached(good_files, tmp_path, monkeypatch):
    path = good_files / "notation" / "tunes.abc"
    first = convert.load_notation_cached(path, tmp_path)

    def no_parsing(_path):
        raise AssertionError("music21 parsed again")

    monkeypatch.setattr(convert, "_parse_notation", no_parsing)
    second = convert.load_notation_cached(path, tmp_path)
    assert [s.note_num() for s, _ in second] == [s.note_num() for s, _ in first]
    assert [i.title for _, i in second] == ["Tune one", "Tune two"]


def test_music21_corpus_source(cache_dir):
    items = corpus.list_items("music21:bach")
    assert len(items) > 350 and all(i.collection == "bach" for i in items)
    piece = corpus.load_piece("music21:bach/bwv66.6", cache_dir)
    assert piece.meta.composer == "J. S. Bach" and piece.meta.key == "F# minor"
    assert piece.meta.id == "music21:bach/bwv66.6" and "music21" in piece.meta.license
    assert len(piece.score.tracks) == 4 and piece.score.note_num() > 100
    # The pickup bar is padded: the first note starts on beat 4 of a 4/4 bar.
    first = min(t.notes[0].time for t in piece.score.tracks)
    assert first == 3 * piece.score.tpq


def test_music21_all_lists_every_collection():
    collections = {item.collection for item in corpus.list_items("music21:all")}
    assert {"bach", "essenFolksong", "oneills1850", "palestrina", "ryansMammoth"} <= collections


@pytest.mark.parametrize("spec, message", [
    ("music21:nope", "unknown music21 collection"),
    ("music21:bach/bwv0", "no work"),
    ("ftp:x", "unknown source"),
    ("dir:/no/such/dir", "not a directory"),
    ("maestro:/no/such/dir", "not a directory"),
])
def test_bad_specs(spec, message):
    with pytest.raises(MusefmError, match=message):
        corpus.list_items(spec)


def _maestro_fixture(root: Path, as_json: bool) -> Path:
    rows = [
        ("Frédéric Chopin", "Ballade No. 1", "train", "2018/a.midi", "2018/a.wav"),
        ("J. S. Bach", "Prelude in C", "validation", "2018/b.midi", "2018/b.wav"),
        ("Franz Liszt", "Etude", "test", "2017/c.midi", "2017/c.wav"),
    ]
    for index, (_, _, _, midi, _) in enumerate(rows):
        (root / midi).parent.mkdir(parents=True, exist_ok=True)
        make_score(pitches=tuple(60 + index + k for k in range(8))).dump_midi(str(root / midi))
    columns = ["canonical_composer", "canonical_title", "split", "midi_filename", "audio_filename"]
    if as_json:
        table = {c: {str(i): row[j] for i, row in enumerate(rows)} for j, c in enumerate(columns)}
        (root / "maestro-v3.0.0.json").write_text(json.dumps(table))
    else:
        lines = [",".join(columns)] + [",".join(f'"{v}"' for v in row) for row in rows]
        (root / "maestro-v3.0.0.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("as_json", [False, True])
def test_maestro_source(tmp_path, as_json):
    root = _maestro_fixture(tmp_path, as_json)
    pieces, rejections = _load_all(f"maestro:{root}", None)
    assert not rejections
    meta = {p.meta.id: p.meta for p in pieces}
    assert meta["maestro:2018/a"].split == "train" and meta["maestro:2018/b"].split == "valid"
    assert meta["maestro:2017/c"].split == "test"
    assert meta["maestro:2018/a"].composer == "Frédéric Chopin" and meta["maestro:2018/b"].title == "Prelude in C"
    assert meta["maestro:2018/a"].audio_path.endswith("2018/a.wav") and "CC BY-NC-SA" in meta["maestro:2018/a"].license


def test_maestro_without_metadata(tmp_path):
    with pytest.raises(MusefmError, match="MAESTRO"):
        corpus.list_items(f"maestro:{tmp_path}")


def test_bad_files_are_rejected_with_reasons(bad_files):
    expected = {
        "empty.mid": "empty file", "random.mid": "not a readable MIDI file", "truncated.mid": "not a readable MIDI file",
        "broken.musicxml": "music21 cannot parse it", "broken.krn": "music21 cannot parse it",
        "broken.abc": "no notes", "silent.mid": "no notes", "absurd_tempo.mid": "absurd tempo",
        "absurd_duration.mid": "absurd duration",
    }
    pieces, rejections = _load_all(f"dir:{bad_files}", None)
    assert not pieces
    reasons = {Path(r.path).name: r.reason for r in rejections}
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])


def test_ties_are_merged_like_a_reader_hears_them():
    from music21 import chord, note, stream, tie

    part = stream.Part()
    held = note.Note("C4", quarterLength=1)
    held.tie = tie.Tie("start")
    middle = note.Note("C4", quarterLength=1)
    middle.tie = tie.Tie("continue")
    end = note.Note("C4", quarterLength=1)
    end.tie = tie.Tie("stop")
    unmarked_start = note.Note("E4", quarterLength=1)
    unmarked_start.tie = tie.Tie("start")
    unmarked_end = note.Note("E4", quarterLength=2)  # no "stop" written: still the same note
    fresh = note.Note("E4", quarterLength=1)  # not tied: a new note
    tied_chord = chord.Chord(["G4", "B4"], quarterLength=1)
    tied_chord.tie = tie.Tie("start")
    chord_end = chord.Chord(["G4", "B4"], quarterLength=1)
    chord_end.tie = tie.Tie("stop")
    for element in (held, middle, end, unmarked_start, unmarked_end, fresh, tied_chord, chord_end):
        part.append(element)
    notes = convert._merge_ties(part.flatten(), pickup=0)
    tpq = convert.TICKS_PER_QUARTER
    assert [(s // tpq, d // tpq, p) for s, d, p, _ in notes] == [
        (0, 3, 60), (3, 3, 64), (6, 1, 64), (7, 2, 67), (7, 2, 71),
    ]


def test_metadata_is_one_line_and_charts_take_any_label():
    from musefm.viz.charts import bar_chart

    assert corpus._one_line("Philippe de Vitry\n(1291-1361)") == "Philippe de Vitry (1291-1361)"
    assert corpus._one_line(" \n ") is None and corpus._one_line(None) is None
    assert corpus._composer("Bach, Johann\nSebastian", "J. S. Bach") == "J. S. Bach"
    assert bar_chart(["two\nlines", "one"], [2, 3], "labels").size[1] > 0
