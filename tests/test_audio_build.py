"""Paired audio datasets: rendering with soundfonts, aligned notes, held-out test timbres, resume,
bad files, and the training windows read from them."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from musefm.data.audio_build import AudioBuildConfig, build_audio_dataset, piano_performance
from musefm.data.audio_dataset import TranscriptionWindows, open_audio_dataset, read_segment
from musefm.errors import MusefmError
from tests.conftest import make_score

needs_fluidsynth = pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="fluidsynth is not installed")


def write_pieces(folder, count=6):
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        pitches = [48 + number + step for step in (0, 4, 7, 12, 7, 4)]
        make_score(pitches=pitches, qpm=160.0, chord=number % 2 == 0).dump_midi(str(folder / f"piece{number}.mid"))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    source = write_pieces(root / "midi")
    (source / "broken.mid").write_bytes(b"MThd this is not a MIDI file")
    config = AudioBuildConfig(sources=[f"dir:{source}"], out=str(root / "data"), soundfonts=["timgm6mb"],
                              test_soundfonts=["fluidr3"], valid_fraction=0.0, test_fraction=0.5, workers=1)
    summary = build_audio_dataset(config)
    return root, config, summary


@needs_fluidsynth
def test_build_renders_aligned_pairs_and_rejects_bad_files(built):
    from musefm.audio.io import load_audio
    from musefm.transcription.labels import notes_from_midi
    from musefm.transcription.postprocess import read_notes_csv

    root, config, summary = built
    dataset = open_audio_dataset(config.out)
    assert summary.examples == len(dataset.rows) == 6
    rejected = [json.loads(line) for line in (root / "data" / "rejected.jsonl").read_text().splitlines()]
    assert [row["path"].endswith("broken.mid") for row in rejected] == [True]
    for row in dataset.rows:
        # The held-out timbre: test pieces use the test soundfont only, the others never use it.
        assert (row["soundfont"] == "fluidr3") == (row["split"] == "test")
        notes = read_notes_csv(dataset.path(row["notes"]))
        assert np.allclose(notes, notes_from_midi(dataset.path(row["midi"])), atol=1e-3)
        audio, rate = load_audio(dataset.path(row["audio"]))
        assert rate == 16000 and len(audio) / rate >= notes[:, 1].max() - 0.05
        # Sound where the notes are: the first note's attack is louder than the silence before the end.
        onset = int(notes[0, 0] * rate)
        assert np.abs(audio[onset : onset + 1600]).max() > 0.01
    assert {row["split"] for row in dataset.rows} >= {"train", "test"}


@needs_fluidsynth
def test_build_resumes_without_rendering_again(built):
    root, config, _ = built
    flac = sorted((root / "data" / "audio").glob("*.flac"))
    stamps = [path.stat().st_mtime_ns for path in flac]
    summary = build_audio_dataset(config)
    assert summary.resumed_files == 7 and summary.examples == 6
    assert [path.stat().st_mtime_ns for path in flac] == stamps


def test_build_refuses_unknown_soundfont(tmp_path):
    config = AudioBuildConfig(sources=["dir:x"], out=str(tmp_path / "o"), soundfonts=["no-such-font"])
    with pytest.raises(MusefmError, match="no-such-font"):
        config.validate()


def test_piano_performance_is_one_piano_track_with_varied_dynamics():
    score = make_score(chord=True)
    played = piano_performance(score, np.random.default_rng(0), (40, 100), 10.0, piano=True)
    assert len(played.tracks) == 1 and played.tracks[0].program == 0
    assert played.note_num() == score.note_num()
    velocities = played.tracks[0].notes.numpy()["velocity"]
    assert velocities.min() >= 1 and velocities.max() <= 127 and len(set(velocities.tolist())) > 3


@needs_fluidsynth
def test_training_windows_hold_audio_and_matching_targets(built):
    _, config, _ = built
    dataset = open_audio_dataset(config.out)
    windows = TranscriptionWindows(dataset, "train", segment_seconds=1.0, sample_rate=16000, hop_length=320, seed=1)
    item = windows[0]
    assert item["audio"].shape == (16000,)
    assert item["onset"].shape == item["frame"].shape == (16000 // 320 + 1, 88)
    assert item["onset"].sum() > 0 and (item["frame"] >= item["onset"]).all()
    # The same (seed, epoch, index) gives the same window; another epoch moves it.
    again = TranscriptionWindows(dataset, "train", segment_seconds=1.0, sample_rate=16000, hop_length=320, seed=1)
    assert np.array_equal(item["audio"].numpy(), again[0]["audio"].numpy())
    windows.set_epoch(1)
    assert not np.array_equal(item["audio"].numpy(), windows[0]["audio"].numpy())
    # Weighting harmonically masked notes adds a loss_weight roll over those notes' frames only.
    assert "loss_weight" not in item
    weighted = TranscriptionWindows(dataset, "train", segment_seconds=1.0, sample_rate=16000, hop_length=320, seed=1,
                                    masked_note_weight=3.0)
    for index in range(len(weighted)):
        weights = weighted[index]["loss_weight"].numpy()
        assert weights.shape == item["onset"].shape and set(np.unique(weights).tolist()) <= {1.0, 3.0}
        assert (weighted[index]["frame"].numpy()[weights > 1] == 1).all()


@needs_fluidsynth
def test_mixed_windows_sum_two_pieces_in_one_timbre_and_keep_both_pieces_labels(built):
    from musefm.audio.augment import AudioAugmentConfig, _keep_in_range

    _, config, _ = built
    dataset = open_audio_dataset(config.out)
    off = {f.name: 0.0 for f in dataclasses.fields(AudioAugmentConfig) if f.name.endswith("_probability")}
    window = dict(segment_seconds=1.0, sample_rate=16000, hop_length=320, seed=2, jitter=False)
    plain = TranscriptionWindows(dataset, "train", augment=AudioAugmentConfig(**off), **window)
    mixed = TranscriptionWindows(dataset, "train", augment=AudioAugmentConfig(**{**off, "mix_probability": 1.0}), **window)
    pieces = {plain.rows[number]["piece"] for number, _ in plain.items}
    assert len(pieces) > 1
    grown, plain_items = 0, [plain[index] for index in range(len(plain))]
    for index in range(len(mixed)):
        item, own = mixed[index], plain_items[index]
        assert np.array_equal(item["audio"].numpy(), mixed[index]["audio"].numpy())  # reproducible
        # The mix is this window plus one window of another piece in the same timbre, and its labels
        # are the union of both windows' labels.
        own_piece = plain.rows[plain.items[index][0]]["piece"]
        partners = [other for other in range(len(plain)) if plain.rows[plain.items[other][0]]["piece"] != own_piece
                    and np.allclose(item["audio"].numpy(), _keep_in_range(own["audio"].numpy() + plain_items[other]["audio"].numpy()))]
        assert partners, f"item {index} is not its window plus another piece's"
        partner = plain_items[partners[0]]
        for name in ("onset", "frame"):
            assert np.array_equal(item[name].numpy(), np.maximum(own[name].numpy(), partner[name].numpy()))
        grown += int(item["onset"].sum() > own["onset"].sum())
    assert grown > 0  # the other piece's notes are in the labels, where it has notes of its own
    with pytest.raises(MusefmError, match="mix_probability"):
        AudioAugmentConfig(mix_probability=1.5)


def test_read_segment_pads_past_the_end_and_resamples(tmp_path):
    from musefm.audio.io import save_audio

    tone = np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)  # 1 s at 22.05 kHz
    save_audio(tmp_path / "tone.wav", tone, 22050)
    segment = read_segment(tmp_path / "tone.wav", 0.5, 1.0, 16000)
    assert segment.shape == (16000,)
    assert np.abs(segment[:7000]).max() > 0.5 and np.abs(segment[8500:]).max() == 0.0


def test_maestro_pairs_keep_their_recordings_and_splits(tmp_path):
    """MAESTRO rows are used as they are: their own audio (any rate), MIDI, notes and split; a row
    whose recording is unreadable is rejected and the others go on."""
    from musefm.audio.io import save_audio
    from tests.test_corpus import _maestro_fixture

    root = _maestro_fixture(tmp_path / "maestro", as_json=False)
    rate = 44100
    for name in ("2018/a.wav", "2018/b.wav"):
        save_audio(root / name, 0.1 * np.random.default_rng(0).standard_normal(rate * 2).astype(np.float32), rate)
    (root / "2017/c.wav").write_text("not audio")
    config = AudioBuildConfig(sources=[f"maestro:{root}"], out=str(tmp_path / "data"), workers=1)
    summary = build_audio_dataset(config)
    dataset = open_audio_dataset(tmp_path / "data")
    assert summary.examples == 2 and summary.rejected == 1
    by_piece = {row["piece"]: row for row in dataset.rows}
    assert by_piece["maestro:2018/a"]["split"] == "train" and by_piece["maestro:2018/b"]["split"] == "valid"
    assert by_piece["maestro:2018/a"]["soundfont"] == "recording"
    assert dataset.path(by_piece["maestro:2018/a"]["audio"]) == (root / "2018/a.wav").resolve()
    windows = TranscriptionWindows(dataset, "train", segment_seconds=1.0, sample_rate=16000, hop_length=320)
    assert windows[0]["audio"].shape == (16000,)  # resampled from 44.1 kHz on the fly
    assert windows[0]["onset"].sum() > 0


@needs_fluidsynth
def test_render_command_renders_a_batch_with_a_chosen_program_and_skips_bad_files(tmp_path, capsys):
    from musefm.audio.io import audio_info
    from musefm.cli import main as cli

    source = write_pieces(tmp_path / "midi", 2)
    (source / "broken.mid").write_bytes(b"MThd not MIDI")
    files = sorted(str(path) for path in source.iterdir())
    assert cli(["render", *files, "-o", str(tmp_path / "wav"), "--program", "0", "--soundfont", "timgm6mb",
                "--sample-rate", "16000"]) == 1
    rendered = sorted(path.name for path in (tmp_path / "wav").glob("*.wav"))
    assert rendered == ["piece0.wav", "piece1.wav"]
    assert audio_info(tmp_path / "wav" / "piece0.wav").sample_rate == 16000
    assert "broken.mid" in capsys.readouterr().err
    assert cli(["render", files[0], "-o", str(tmp_path / "wav"), "--program", "200"]) == 2


@needs_fluidsynth
def test_datasets_of_other_soundfonts_train_as_one_and_never_leak_held_out_pieces(built, tmp_path, monkeypatch):
    from musefm.data.audio_dataset import open_audio_datasets

    root, _, _ = built
    source = root / "midi"
    more = AudioBuildConfig(sources=[f"dir:{source}"], out=str(tmp_path / "more"), soundfonts=["musescore"],
                            test_soundfonts=["fluidr3"], valid_fraction=0.0, test_fraction=0.5, workers=1)
    build_audio_dataset(more, stream=open("/dev/null", "w"))
    first, second = open_audio_dataset(root / "data"), open_audio_dataset(tmp_path / "more")
    both = open_audio_datasets(f"{root / 'data'},{tmp_path / 'more'}")
    # Training pieces twice (two timbres); the test split's fluidr3 renders are the same examples: once.
    assert len(both.split("train")) == len(first.split("train")) + len(second.split("train"))
    assert sorted(row["id"] for row in both.split("test")) == sorted(row["id"] for row in first.split("test"))
    assert {row["soundfont"] for row in both.split("train")} == {"timgm6mb", "musescore"}
    for row in both.rows:  # every file still found, wherever the dataset lies
        assert both.path(row["audio"]).is_file() and both.path(row["notes"]).is_file()
    # Given as relative paths (as on a command line), the files are found too.
    monkeypatch.chdir(tmp_path)
    relative = open_audio_datasets(f"{os.path.relpath(root / 'data', tmp_path)},more")
    assert all(relative.path(row["notes"]).is_file() for row in relative.rows)
    windows = TranscriptionWindows(both, "train", segment_seconds=2.0, sample_rate=16000, hop_length=320)
    assert windows[len(windows) - 1]["audio"].shape[0] == 32000

    # A piece held out in one build and trained on in the other is refused.
    leaked = tmp_path / "leaked"
    shutil.copytree(tmp_path / "more", leaked)
    rows = [json.loads(line) for line in (leaked / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        row["split"] = "train" if row["split"] == "test" else row["split"]
    (leaked / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(MusefmError, match="split of"):
        open_audio_datasets([root / "data", leaked])


@needs_fluidsynth
def test_one_work_in_two_encodings_is_rendered_once(tmp_path, monkeypatch):
    """music21 names bwv281.krn and bwv281.mxl by one key: rendering both under one id overwrote the
    first's audio and could put one chorale in two splits."""
    from musefm.data import corpus

    source = write_pieces(tmp_path / "midi", count=2)
    items = corpus.list_items(f"dir:{source}")
    twin = dataclasses.replace(items[1], key=items[0].key)  # another file, the same work
    monkeypatch.setattr(corpus, "list_items", lambda spec: [items[0], twin])
    config = AudioBuildConfig(sources=["dir:x"], out=str(tmp_path / "data"), soundfonts=["timgm6mb"], workers=1)
    build_audio_dataset(config, stream=open("/dev/null", "w"))
    rows = open_audio_dataset(tmp_path / "data").rows
    assert len(rows) == 1 and rows[0]["id"] == f"{items[0].key}@timgm6mb"


@needs_fluidsynth
def test_unseen_timbre_validation_renders_each_valid_piece_once_per_program_and_reuses_them(tmp_path):
    from musefm.recipes.train_transcriber import unseen_timbre_examples
    from musefm.transcription.postprocess import read_notes_csv

    config = AudioBuildConfig(sources=[f"dir:{write_pieces(tmp_path / 'midi', count=4)}"], out=str(tmp_path / "data"),
                              soundfonts=["timgm6mb", "fluidr3"], valid_fraction=0.5, test_fraction=0.0, workers=1)
    build_audio_dataset(config)
    dataset = open_audio_dataset(tmp_path / "data")
    valid = {row["piece"]: row for row in dataset.split("valid")}
    assert len(dataset.split("valid")) == 2 * len(valid) > 0  # each valid piece in both soundfonts
    groups = unseen_timbre_examples(dataset, ["fluidr3"], [2, 3], tmp_path / "unseen")
    assert sorted(groups) == ["fluidr3-program2", "fluidr3-program3"]
    for examples in groups.values():
        assert len(examples) == len(valid)  # one render per piece, not per soundfont
        for (wav, notes), row in zip(examples, valid.values()):
            assert wav.is_file() and wav.stem == os.path.splitext(os.path.basename(row["midi"]))[0]
            np.testing.assert_array_equal(notes, read_notes_csv(dataset.path(row["notes"])))
    rendered = {wav: wav.stat().st_mtime_ns for examples in groups.values() for wav, _ in examples}
    unseen_timbre_examples(dataset, ["fluidr3"], [2, 3], tmp_path / "unseen")
    assert {wav: wav.stat().st_mtime_ns for wav in rendered} == rendered  # kept, not rendered again
