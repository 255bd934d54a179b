import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from musefm.cli import main
from musefm.data.build import BuildConfig, build_dataset, read_jsonl, split_of
from musefm.data.dataset import open_dataset
from musefm.data.tokenize import decode, encode, score_notes
from musefm.errors import MusefmError
from tests.conftest import make_score


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, good_files, bad_files):
    """Good files of every format, bad files of every kind, and 12 extra MIDI pieces."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(good_files, root / "good")
    shutil.copytree(bad_files, root / "bad")
    (root / "extra").mkdir()
    for index in range(12):
        pitches = tuple(48 + (index * 7 + k * 3) % 30 for k in range(16))
        make_score(pitches=pitches, qpm=80.0 + index).dump_midi(str(root / "extra" / f"piece{index:02d}.mid"))
    # An exact duplicate of piece00 under another name: it must share piece00's split.
    shutil.copy(root / "extra" / "piece00.mid", root / "extra" / "copy_of_piece00.mid")
    return root


def _build(source, out, **settings):
    config = BuildConfig(sources=[f"dir:{source}"], out=str(out), workers=settings.pop("workers", 1), **settings)
    return build_dataset(config, stream=open("/dev/null", "w"))


def test_build_keeps_good_rejects_bad_and_writes_everything(mixed_dir, tmp_path, cache_dir):
    out = tmp_path / "ds"
    summary = _build(mixed_dir, out, valid_fraction=0.2, test_fraction=0.2)
    assert summary.pieces == 6 + 13 and summary.rejected == 9
    for name in ("dataset.json", "tokenizer.json", "manifest.jsonl", "rejected.jsonl", "card.md", "stats.json"):
        assert (out / name).is_file(), name
    for plot in ("collections", "keys_meters", "pitch", "lengths"):
        assert (out / "card" / f"{plot}.png").stat().st_size > 5000
    rejected = {Path(r["path"]).name: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert set(rejected) == {p.name for p in (mixed_dir / "bad").iterdir()}

    dataset = open_dataset(out)
    manifest = dataset.manifest
    assert sum(len(dataset.rows(s)) for s in ("train", "valid", "test")) == len(manifest)
    assert len({row["id"] for row in manifest}) == len(manifest)
    copies = {row["id"]: row for row in manifest}
    assert copies["dir:extra/piece00.mid"]["split"] == copies["dir:extra/copy_of_piece00.mid"]["split"]
    assert copies["dir:extra/piece00.mid"]["copies"] == 2
    # Stored tokens decode to the notes of the source file.
    row = copies["dir:good/notation/tunes.abc#2"]
    assert row["key"] == "D minor" and row["title"] == "Tune two"
    tokenizer = dataset.tokenizer
    stored = dataset.piece_ids(row)
    assert stored.dtype == np.uint16 and len(stored) == row["length"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pieces"] == len(manifest) and stats["tokens"] == sum(r["length"] for r in manifest)
    assert stats["rejected"] == 9 and "no notes" in stats["rejected_by_reason"]
    card = (out / "card.md").read_text()
    assert "card/keys_meters.png" in card and "Rejected input" in card

    original = make_score(pitches=tuple(48 + (3 * 7 + k * 3) % 30 for k in range(16)), qpm=83.0)
    row3 = copies["dir:extra/piece03.mid"]
    assert score_notes(decode(tokenizer, dataset.piece_ids(row3))) == score_notes(tokenizer.preprocess_score(original))
    np.testing.assert_array_equal(dataset.piece_ids(row3), encode(tokenizer, original))


def test_splits_are_deterministic_and_proportional():
    names = [f"{i:x}" for i in range(4000)]
    splits = [split_of(n, 0.1, 0.05) for n in names]
    assert splits == [split_of(n, 0.1, 0.05) for n in names]
    assert abs(splits.count("valid") / 4000 - 0.1) < 0.02 and abs(splits.count("test") / 4000 - 0.05) < 0.02


def test_parallel_build_equals_serial_build(mixed_dir, tmp_path, cache_dir):
    _build(mixed_dir, tmp_path / "serial", workers=1)
    _build(mixed_dir, tmp_path / "parallel", workers=2, shard_pieces=3)
    serial, parallel = open_dataset(tmp_path / "serial"), open_dataset(tmp_path / "parallel")
    assert [r["id"] for r in serial.manifest] == [r["id"] for r in parallel.manifest]
    for a, b in zip(serial.manifest, parallel.manifest):
        assert a["split"] == b["split"]
        np.testing.assert_array_equal(serial.piece_ids(a), parallel.piece_ids(b))


def test_resume_skips_finished_shards(mixed_dir, tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "ds"
    full = _build(mixed_dir, out, shard_pieces=4)
    # Simulate a build killed after three shards: later shards and the final files are missing.
    shards = sorted((out / "shards").glob("*.json"))
    assert len(shards) > 4
    for path in shards[3:]:
        path.unlink()
        path.with_suffix(".npy").unlink()
    (out / "manifest.jsonl").unlink()
    done_items = sum(len(json.loads(p.read_text())["items"]) for p in shards[:3])

    from musefm.data import build

    processed = []
    original = build.process_item
    monkeypatch.setattr(build, "process_item", lambda item: processed.append(item.key) or original(item))
    resumed = _build(mixed_dir, out, shard_pieces=4)
    assert resumed.resumed_files == done_items and len(processed) == len(set(processed))
    assert resumed.pieces == full.pieces and resumed.rejected == full.rejected and resumed.tokens == full.tokens
    assert not {key for key in processed} & {k for p in shards[:3] for k in json.loads(p.read_text())["items"]}


def test_other_settings_or_foreign_directory_refused(mixed_dir, tmp_path, cache_dir):
    out = tmp_path / "ds"
    _build(mixed_dir, out)
    with pytest.raises(MusefmError, match="other settings"):
        _build(mixed_dir, out, tokenizer="tsd")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(MusefmError, match="holds no musefm dataset"):
        _build(mixed_dir, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    config = BuildConfig(sources=[f"dir:{mixed_dir}"], out=str(out), tokenizer="tsd", workers=1)
    assert build_dataset(config, overwrite=True, stream=open("/dev/null", "w")).pieces == 19


def test_octuple_and_bpe_builds(mixed_dir, tmp_path, cache_dir):
    octuple = _build(mixed_dir / "good", tmp_path / "oct", tokenizer="octuple")
    dataset = open_dataset(tmp_path / "oct")
    assert dataset.info["fields"] == 8 and dataset.piece_ids(dataset.manifest[0]).shape[1] == 8
    assert octuple.pieces == 6
    _build(mixed_dir / "extra", tmp_path / "bpe", bpe_vocab_size=600, valid_fraction=0.0, test_fraction=0.0)
    dataset = open_dataset(tmp_path / "bpe")
    assert dataset.tokenizer.is_trained and dataset.info["bpe_ratio"] > 1.0
    with pytest.raises(MusefmError, match="must exceed"):
        _build(mixed_dir / "extra", tmp_path / "bpe-small", bpe_vocab_size=100)
    assert not (tmp_path / "bpe-small" / "shards").exists() or not any((tmp_path / "bpe-small" / "shards").iterdir())


def test_cli_build_stats_show(mixed_dir, tmp_path, capsys, cache_dir):
    out = tmp_path / "ds"
    assert main(["data", "build", "--source", f"dir:{mixed_dir}", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "kept 19 pieces" in printed and "rejected 9" in printed
    assert main(["data", "stats", str(out)]) == 0
    assert "pieces      19" in capsys.readouterr().out
    png = tmp_path / "roll.png"
    assert main(["data", "show", str(out), "dir:good/notation/tunes.abc#1", "-o", str(png)]) == 0
    assert png.stat().st_size > 5000


def test_cli_source_with_nothing_readable_exits_nonzero(bad_files, tmp_path, capsys):
    code = main(["data", "build", "--source", f"dir:{bad_files}", "--out", str(tmp_path / "x"), "--workers", "1"])
    error = capsys.readouterr().err
    errors = [line for line in error.splitlines() if line.startswith("musefm: error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("musefm: error: nothing could be read")
    assert "rejected.jsonl" in errors[0] and "Traceback" not in error


@pytest.mark.parametrize("argv, message", [
    (["data", "build", "--source", "music21:nope", "--out", "x"], "unknown music21 collection"),
    (["data", "build", "--source", "dir:/nonexistent", "--out", "x"], "not a directory"),
    (["data", "build", "--source", "dir:.", "--out", "x", "nokey=1"], "unknown config key nokey"),
    (["data", "stats", "/nonexistent"], "dataset directory not found"),
    (["data", "stats", "."], "not a musefm dataset"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_cli_debug_shows_traceback(capsys):
    assert main(["--debug", "data", "stats", "/nonexistent"]) == 2
    assert "Traceback" in capsys.readouterr().err
