"""Cross-check of musefm's symbolic metrics against muspy's implementations (a test-only extra:
skipped where muspy is not installed). Where the two agree by definition the values must be equal;
where they differ by definition the difference is documented in musefm's docstrings and checked
here to be that difference, not an accident."""

from __future__ import annotations

import math

import pytest

from musefm.evaluation.symbolic import compute_all
from tests.conftest import make_score

muspy = pytest.importorskip("muspy")

AGREEING = ("pitch_range", "n_pitches_used", "n_pitch_classes_used", "scale_consistency", "pitch_entropy",
            "pitch_class_entropy")


def both(score, tmp_path):
    path = tmp_path / "piece.mid"
    score.dump_midi(str(path))
    return compute_all(score), muspy.read_midi(str(path))


@pytest.mark.parametrize("chord", [False, True])
@pytest.mark.parametrize("pitches", [(60, 62, 64, 65, 67, 65, 64, 62), (57, 61, 64, 69, 68, 64, 61, 57, 50)])
def test_metrics_defined_alike_give_equal_values(tmp_path, pitches, chord):
    ours, music = both(make_score(pitches=pitches, chord=chord), tmp_path)
    theirs = {name: getattr(muspy, name)(music) for name in AGREEING}
    for name in AGREEING:
        assert math.isclose(ours[name], theirs[name], rel_tol=1e-9, abs_tol=1e-9), (name, ours[name], theirs[name])


def test_polyphony_differs_only_by_its_documented_definition(tmp_path):
    """A monophonic line: both say polyphony 1 (notes sounding at once, averaged over sounding time
    steps) and polyphony rate 0, so the definitions part only on overlapping notes."""
    ours, music = both(make_score(), tmp_path)
    assert ours["polyphony"] == pytest.approx(muspy.polyphony(music)) == pytest.approx(1.0)
    assert ours["polyphony_rate"] == pytest.approx(muspy.polyphony_rate(music)) == pytest.approx(0.0)
