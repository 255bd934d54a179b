"""Transcription scores against hand-computed values, and folder evaluation with bad and lonely files."""

from __future__ import annotations

import json
import warnings

import mir_eval
import numpy as np
import pytest
from PIL import Image

from musefm.errors import MusefmError
from musefm.evaluation.transcription import evaluate_transcription_dirs, frame_roll, score_notes
from musefm.transcription.postprocess import write_midi, write_notes_csv

REFERENCE = np.array([[0.0, 0.5, 60, 40], [0.5, 1.0, 62, 60], [1.0, 1.5, 64, 80], [1.5, 2.0, 65, 100]])


def test_three_of_four_onsets_right():
    estimate = REFERENCE.copy()
    estimate[3, 2] = 66  # wrong pitch
    estimate[:3, 0] += [0.03, -0.04, 0.049]  # onsets within 50 ms
    scores = score_notes(REFERENCE, estimate)
    for metric in ("note", "note_offset", "note_offset_velocity"):
        assert scores[f"{metric}_precision"] == pytest.approx(0.75)
        assert scores[f"{metric}_recall"] == pytest.approx(0.75)
        assert scores[f"{metric}_f1"] == pytest.approx(0.75)
        assert scores[f"{metric}_matched"] == 3
    assert scores["ref_notes"] == scores["est_notes"] == 4


def test_offsets_beyond_tolerance_only_hurt_note_offset():
    estimate = REFERENCE.copy()
    estimate[0, 1] = 0.62  # tolerance max(0.2 * 0.5, 0.05) = 0.1: 0.12 late is wrong
    estimate[1, 1] = 1.09  # 0.09 late is still right
    estimate[2, 1] = 1.2  # 0.3 early is wrong
    scores = score_notes(REFERENCE, estimate)
    assert scores["note_f1"] == 1.0
    assert scores["note_offset_precision"] == scores["note_offset_recall"] == pytest.approx(0.5)
    # An extra onset-wrong note: 4 of 5 estimated notes are right, all 4 references found.
    extra = np.vstack([REFERENCE, [[1.0, 1.2, 70, 64]]])
    scores = score_notes(REFERENCE, extra)
    assert (scores["note_precision"], scores["note_recall"]) == (pytest.approx(0.8), 1.0)
    assert scores["note_f1"] == pytest.approx(2 * 0.8 / 1.8)


def test_velocity():
    reference = REFERENCE.copy()
    reference[:, 3] = [20, 60, 100, 60]  # normalised by mir_eval to 0, 0.5, 1, 0.5
    scaled = reference.copy()
    scaled[:, 3] = reference[:, 3] * 0.5 + 7  # any increasing linear map is rescaled away: all right
    assert score_notes(reference, scaled)["note_offset_velocity_f1"] == pytest.approx(1.0)
    constant = reference.copy()
    constant[:, 3] = 64  # rescaled to the mean, 0.5: only the two mid-loud notes are within 0.1
    scores = score_notes(reference, constant)
    assert scores["note_offset_f1"] == 1.0
    assert scores["note_offset_velocity_precision"] == scores["note_offset_velocity_recall"] == pytest.approx(0.5)


def test_frame_scores_count_sounding_cells():
    reference = np.array([[0.0, 0.1, 60, 80]])  # frames 0..9 at 100 frames/s
    estimate = np.array([[0.05, 0.15, 60, 80], [0.05, 0.1, 72, 80]])  # frames 5..14, and 5..9 on another key
    scores = score_notes(reference, estimate, frame_rate=100.0)
    assert (scores["ref_frames"], scores["est_frames"], scores["frame_matched"]) == (10, 15, 5)
    assert scores["frame_precision"] == pytest.approx(5 / 15) and scores["frame_recall"] == pytest.approx(0.5)
    # Same precision and recall as mir_eval.multipitch on the sampled rolls.
    times = np.arange(20) / 100.0
    hz = [[mir_eval.util.midi_to_hz(np.flatnonzero(row)) for row in frame_roll(notes, 20, 100.0)]
          for notes in (reference, estimate)]
    multipitch = mir_eval.multipitch.evaluate(times, hz[0], times, hz[1])
    assert scores["frame_precision"] == pytest.approx(multipitch["Precision"])
    assert scores["frame_recall"] == pytest.approx(multipitch["Recall"])


def test_note_errors_put_each_miss_and_false_note_in_its_class():
    from musefm.evaluation.transcription import note_errors

    reference = np.array([
        [0.0, 1.0, 48, 100],  # C3, found
        [0.0, 1.0, 60, 40],   # C4 an octave above it, at once: missed "on a partial"
        [0.0, 1.0, 55, 80],   # G3, doubled by the next: one found, one missed "doubled unison"
        [0.02, 1.0, 55, 80],
        [2.0, 3.0, 50, 80],   # D3 alone: missed "other"
        [4.0, 6.0, 62, 80],   # D4, found, then split by a false re-strike at 5.0: "same key"
    ])
    estimate = np.array([
        [0.01, 1.0, 48, 90], [0.0, 1.0, 55, 80], [4.0, 5.0, 62, 80],
        [5.0, 6.0, 62, 60],   # false: same key as the sounding D4
        [0.03, 0.5, 67, 50],  # false: G4, the twelfth above C3 (its 3rd partial)
        [3.5, 3.8, 70, 50],   # false: nothing sounds
    ])
    errors = note_errors(reference, estimate)
    assert sorted(errors["missed"]) == [("doubled unison", 55), ("on a partial", 60), ("other", 50)]
    assert sorted(errors["false"]) == [("on a partial", 67), ("other", 70), ("same key", 62)]
    assert note_errors(reference, estimate[:0])["missed"] == [
        ("other", 48), ("on a partial", 60), ("doubled unison", 55), ("doubled unison", 55),
        ("other", 50), ("other", 62)]  # nothing found: C3 has no note below it
    assert note_errors(reference[:0], estimate[:1]) == {"missed": [], "false": [("other", 48)]}


def test_empty_inputs():
    nothing = np.zeros((0, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mir_eval's empty-input warnings are not reached
        both = score_notes(nothing, nothing)
        missed = score_notes(REFERENCE, nothing)
        invented = score_notes(nothing, REFERENCE)
    for metric in ("note", "note_offset", "note_offset_velocity", "frame"):
        assert both[f"{metric}_precision"] == both[f"{metric}_recall"] == both[f"{metric}_f1"] == 1.0
        for scores in (missed, invented):
            assert scores[f"{metric}_precision"] == scores[f"{metric}_recall"] == scores[f"{metric}_f1"] == 0.0
    zero_length = np.array([[0.5, 0.5, 60, 80]])  # mir_eval rejects these; they are left out
    assert score_notes(zero_length, zero_length)["note_f1"] == 1.0


def test_evaluate_folders(tmp_path):
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    wrong_pitch = REFERENCE.copy()
    wrong_pitch[3, 2] = 66
    write_midi(REFERENCE, references / "perfect.mid")
    write_notes_csv(REFERENCE, predictions / "perfect.csv")
    write_midi(wrong_pitch, predictions / "perfect.mid")  # MIDI is preferred over CSV
    write_midi(REFERENCE, references / "sub" / "good.midi")
    write_midi(REFERENCE, predictions / "good.mid")
    write_midi(REFERENCE, references / "broken.mid")
    (predictions / "broken.mid").write_bytes(b"MThd\x00\x00garbage")
    write_midi(REFERENCE, predictions / "only_pred.mid")
    write_notes_csv(REFERENCE, references / "only_ref.csv")
    (references / "notes.txt").write_text("not a note file")

    report = evaluate_transcription_dirs(predictions, references)
    assert [scores["name"] for scores in report.files] == ["good", "perfect"]
    assert report.files[1]["pred"].endswith("perfect.mid")
    assert report.mean["note_f1"] == pytest.approx((1.0 + 0.75) / 2)
    assert report.micro["note_f1"] == pytest.approx(7 / 8)
    assert report.mean["frame_f1"] < 1.0 and report.micro["note_offset_velocity_recall"] == pytest.approx(7 / 8)
    assert [name.split("/")[-1] for name in report.unmatched_pred] == ["only_pred.mid"]
    assert [name.split("/")[-1] for name in report.unmatched_ref] == ["only_ref.csv"]
    assert len(report.rejected) == 1 and report.rejected[0]["path"].endswith("pred/broken.mid")

    out = report.write(tmp_path / "report")
    saved = json.loads((out / "report.json").read_text())
    assert saved["files_scored"] == 2 and saved["mean"]["note_f1"] == pytest.approx(0.875)
    assert saved["settings"]["onset_tolerance"] == 0.05
    markdown = (out / "report.md").read_text()
    assert "| note (onset) | " in markdown and "only_ref.csv" in markdown and "broken.mid" in markdown
    assert json.loads((out / "rejected.jsonl").read_text())["path"].endswith("broken.mid")
    assert sorted(saved["pictures"]) == ["pianoroll_good.png", "pianoroll_perfect.png"]
    with Image.open(out / "pianoroll_good.png") as picture:
        assert picture.size[0] > 100
    assert not [path for path in out.iterdir() if path.suffix == ".tmp"]


def test_evaluate_folders_edge_cases(tmp_path):
    with pytest.raises(MusefmError):
        evaluate_transcription_dirs(tmp_path / "missing", tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    report = evaluate_transcription_dirs(tmp_path / "a", tmp_path / "b")
    assert report.files == [] and report.mean["note_f1"] is None
    assert "no file could be scored" in report.to_markdown()
    json.loads(report.to_json())
