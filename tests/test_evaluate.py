"""musefm evaluate: sets read with rejections, metric comparison, pictures, memorization, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from symusic import KeySignature, Note, Score, Tempo, TimeSignature, Track

from musefm.data.build import BuildConfig, build_dataset
from musefm.errors import MusefmError
from musefm.evaluation import report
from musefm.evaluation.symbolic import METRICS
from musefm.recipes.evaluate import EvaluateConfig, as_source_spec, main

TPQ = 480


def melody_score(seed: int, notes: int = 28, chord_every: int = 0) -> Score:
    """A seeded random-walk melody in C major with varied durations (so no two pieces share a
    melody n-gram by chance), optionally with a held chord under every ``chord_every``-th note."""
    rng = np.random.default_rng(seed)
    scale = np.array([0, 2, 4, 5, 7, 9, 11])
    degree = int(rng.integers(7, 14))
    score = Score(TPQ)
    score.tempos.append(Tempo(0, 100.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.key_signatures.append(KeySignature(0, 0, 0))
    melody = Track(name="melody", program=0, is_drum=False)
    chords = Track(name="chords", program=0, is_drum=False)
    time = 0
    for index in range(notes):
        degree = int(np.clip(degree + rng.choice([-3, -2, -1, 1, 2, 4]), 0, 20))
        pitch = 48 + 12 * (degree // 7) + int(scale[degree % 7])
        duration = int(rng.choice([TPQ // 2, TPQ, TPQ, 2 * TPQ]))
        melody.notes.append(Note(time, duration, pitch, 80))
        if chord_every and index % chord_every == 0:
            for chord_pitch in (pitch - 12, pitch - 8):
                chords.notes.append(Note(time, duration, chord_pitch, 60))
        time += duration
    score.tracks.append(melody)
    if chords.notes:
        score.tracks.append(chords)
    return score


def write_set(folder: Path, scores: dict[str, Score]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, score in scores.items():
        score.dump_midi(str(folder / f"{name}.mid"))
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One full evaluation with memorization: 6 reference pieces (also the training set), 4
    generated ones of which gen_copy is ref_2 copied, plus a corrupt generated file."""
    root = tmp_path_factory.mktemp("evaluate")
    reference = {f"ref_{k}": melody_score(seed=k, chord_every=3 if k % 2 else 0) for k in range(6)}
    reference_dir = write_set(root / "reference", reference)
    generated_dir = write_set(root / "generated", {
        "gen_a": melody_score(seed=101),
        "gen_b": melody_score(seed=102, chord_every=2),
        "gen_c": melody_score(seed=103, notes=20),
        "gen_copy": reference["ref_2"],
    })
    (generated_dir / "broken.mid").write_bytes(b"MThd this is not a MIDI file")
    train = root / "dataset"
    build_dataset(BuildConfig(sources=[f"dir:{reference_dir}"], out=str(train), workers=1,
                              valid_fraction=0.0, test_fraction=0.0))
    config = EvaluateConfig(generated=str(generated_dir), reference=f"dir:{reference_dir}", train=str(train),
                            out=str(root / "report"))
    return {"results": main(config), "config": config, "root": root, "reference_dir": reference_dir,
            "generated_dir": generated_dir, "train": train}


def test_report_files_are_written(evaluated):
    out = Path(evaluated["config"].out)
    for name in ("report.md", "report.html", "results.json", "rejected.jsonl", "oa_overview.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == evaluated["results"]
    for name, values in on_disk["metrics"].items():
        if values["histogram"]:
            assert (out / values["histogram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "## Metrics" in markdown and "pitch_entropy" in markdown and "![pitch_range](hist_pitch_range.png)" in markdown
    assert on_disk["summary"]["text"] in markdown
    html = (out / "report.html").read_text()
    assert "<table>" in html and "hist_pitch_range.png" in html and "broken.mid" in html


def test_every_metric_is_compared(evaluated):
    metrics = evaluated["results"]["metrics"]
    assert list(metrics) == list(METRICS)
    compared = 0
    for name, values in metrics.items():
        assert {"oa", "kl", "generated_mean", "generated_std", "reference_mean", "reference_std"} <= set(values)
        if values["reference_count"] >= 2 and values["generated_count"] >= 1:
            assert values["oa"] is not None and 0.0 <= values["oa"] <= 1.0, name
            assert values["kl"] is not None and math.isfinite(values["kl"]), name
            compared += 1
        else:  # degenerate here: drum metrics on pieces without drums
            assert values["oa"] is None, name
    assert compared >= 10
    assert metrics["drum_pattern_consistency"]["oa"] is None and metrics["drum_pattern_consistency"]["histogram"] is None
    summary = evaluated["results"]["summary"]
    assert summary["metrics_compared"] == compared
    assert len(summary["most_different"]) == 3
    lowest = sorted((v["oa"], n) for n, v in metrics.items() if v["oa"] is not None)[0][1]
    assert summary["most_different"][0] == lowest
    assert summary["text"].startswith("mean OA ")


def test_unreadable_file_is_counted_not_fatal(evaluated):
    generated = evaluated["results"]["sets"]["generated"]
    assert generated["pieces"] == 4 and generated["rejected"] == 1
    assert generated["rejections"][0]["path"].endswith("broken.mid")
    assert "MIDI" in generated["rejections"][0]["reason"]
    assert evaluated["results"]["sets"]["reference"] == {
        "spec": f"dir:{evaluated['reference_dir']}", "pieces": 6, "rejected": 0, "rejections": []}
    lines = (Path(evaluated["config"].out) / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["set"] for line in lines] == ["generated"]


def test_copied_piece_is_flagged_with_its_source(evaluated):
    memorization = evaluated["results"]["memorization"]
    by_id = {Path(piece["path"]).stem: piece for piece in memorization["pieces"]}
    assert set(by_id) == {"gen_a", "gen_b", "gen_c", "gen_copy"}
    copy = by_id["gen_copy"]
    assert copy["flagged"] and copy["source_id"] == "dir:ref_2.mid"
    assert copy["longest_copied_notes"] == 28 and copy["copied_ngram_share"] == 1.0
    for name in ("gen_a", "gen_b", "gen_c"):
        assert not by_id[name]["flagged"], name
    assert memorization["flagged"] == [copy["id"]]
    assert memorization["training_pieces"] == 6 and not memorization["reused"] and memorization["saved"]
    assert (evaluated["train"] / "memorization" / "index.json").is_file()
    assert "1 of 4 generated pieces flagged as copied" in evaluated["results"]["summary"]["text"]


def test_second_evaluation_reuses_the_memorization_index(evaluated, tmp_path):
    config = EvaluateConfig(generated=f"dir:{evaluated['generated_dir']}", reference=str(evaluated["reference_dir"]),
                            train=str(evaluated["train"]), out=str(tmp_path / "again"), limit=2)
    results = main(config)
    assert results["memorization"]["reused"]
    assert results["sets"]["generated"]["pieces"] == 2 and results["sets"]["reference"]["pieces"] == 2
    # Another n-gram length makes the cached index stale: it is rebuilt.
    config.ngram_length, config.out = 6, str(tmp_path / "other_n")
    assert not main(config)["memorization"]["reused"]


def test_identical_sets_overlap_almost_fully(evaluated, tmp_path):
    reference_dir = evaluated["reference_dir"]
    results = main(EvaluateConfig(generated=str(reference_dir), reference=str(reference_dir), out=str(tmp_path)))
    assert results["summary"]["mean_oa"] > 0.85
    assert results["memorization"] is None
    for values in results["metrics"].values():
        if values["oa"] is not None:
            assert values["generated_mean"] == pytest.approx(values["reference_mean"])
    assert "Not checked" in (tmp_path / "report.md").read_text()


def test_empty_or_unreadable_generated_set_is_one_clear_error(evaluated, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MusefmError, match=r"no readable pieces in the generated set .*\(0 rejected"):
        main(EvaluateConfig(generated=str(empty), reference=str(evaluated["reference_dir"]), out=str(tmp_path / "a")))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("x", "y", "z"):
        (broken / f"{name}.mid").write_bytes(b"")
    with pytest.raises(MusefmError, match=r"no readable pieces in the generated set .*\(3 rejected, see .*rejected.jsonl\)"):
        main(EvaluateConfig(generated=str(broken), reference=str(evaluated["reference_dir"]), out=str(tmp_path / "b")))
    assert len((tmp_path / "b" / "rejected.jsonl").read_text().splitlines()) == 3


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(MusefmError, match="neither a folder nor a source spec"):
        as_source_spec(str(tmp_path / "missing"))
    assert as_source_spec(str(tmp_path)) == f"dir:{tmp_path}"
    assert as_source_spec("music21:bach") == "music21:bach"
    with pytest.raises(MusefmError, match="--out"):
        main(EvaluateConfig(generated=str(tmp_path), reference=str(tmp_path)))
    with pytest.raises(MusefmError, match="limit"):
        main(EvaluateConfig(generated=str(tmp_path), reference=str(tmp_path), out=str(tmp_path / "o"), limit=-1))


def test_number_formatting_handles_missing_values():
    assert report.format_number(None) == "–"
    assert report.format_number(float("nan")) == "–"
    assert report.format_number(3) == "3"
    assert report.format_number(0.123456) == "0.123"
    assert report.format_number(True) == "yes"


def test_grammar_error_rate_from_generate_records(tmp_path):
    from musefm.recipes.evaluate import grammar_error_rate

    assert grammar_error_rate(tmp_path) is None  # no records: nothing to report
    records = [{"token_ids": list(range(10)), "grammar_errors": 0}, {"token_ids": list(range(30)), "grammar_errors": 3},
               {"settings": {}}]  # the last is not a sample record
    for number, record in enumerate(records):
        (tmp_path / f"sample_{number}.json").write_text(json.dumps(record))
    (tmp_path / "broken.json").write_text("{not json")
    rate = grammar_error_rate(tmp_path)
    assert rate == {"samples": 2, "tokens": 40, "errors": 3, "error_rate": 3 / 40, "samples_with_errors": 1}
