"""Set-against-set comparison (Yang & Lerch 2020): distances, kernel densities, OA and KL."""

from __future__ import annotations

import math

import numpy as np
import pytest

from musefm.evaluation.distributions import (
    compare_metric,
    compare_sets,
    inter_set_distances,
    intra_set_distances,
    kde_density,
    overlap_area_and_kl,
    scott_bandwidth,
)


def test_intra_and_inter_set_distances_by_hand():
    assert intra_set_distances([1.0, 2.0, 4.0]).tolist() == [1.0, 3.0, 2.0]  # pairs (0,1) (0,2) (1,2)
    assert inter_set_distances([1.0, 2.0, 4.0], [0.0, 5.0]).tolist() == [1.0, 4.0, 2.0, 3.0, 4.0, 1.0]
    assert intra_set_distances([3.0]).tolist() == []


def test_scott_bandwidth_and_kde_by_hand():
    # std(ddof=1) of 0..3 is sqrt(5/3); Scott's factor 4^(-1/5).
    assert scott_bandwidth([0.0, 1.0, 2.0, 3.0]) == pytest.approx(math.sqrt(5 / 3) * 4**-0.2)
    assert scott_bandwidth([2.0]) == 0.0
    # One sample: the density is the normal density around it.
    assert kde_density([1.0], [1.0, 3.0], bandwidth=2.0) == pytest.approx(
        [1 / (2 * math.sqrt(2 * math.pi)), math.exp(-0.5) / (2 * math.sqrt(2 * math.pi))]
    )
    grid = np.linspace(-20, 25, 4501)  # 9 bandwidths past the samples
    density = kde_density([0.0, 1.0, 5.0], grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        kde_density([1.0, 1.0], grid)  # no spread: Scott's bandwidth is 0


def test_identical_sets_overlap_almost_fully():
    values = np.random.default_rng(0).normal(size=120)
    result = compare_metric(values, values)
    # The inter-set distances also hold the 120 zero self-pairs, so not exactly 1 and 0.
    assert result["oa"] > 0.97
    assert result["kl"] < 0.01
    assert result["generated_mean"] == result["reference_mean"] == pytest.approx(values.mean())
    assert overlap_area_and_kl([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert overlap_area_and_kl([0.0, 0.0], [0.0]) == (1.0, 0.0)  # a constant metric in both sets


def test_shifted_sets_overlap_little():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=120)
    close = compare_metric(rng.normal(size=120), reference)
    shifted = compare_metric(rng.normal(size=120) + 6.0, reference)
    assert close["oa"] > 0.9
    assert shifted["oa"] < 0.05
    assert shifted["kl"] > 3.0
    assert math.isfinite(shifted["kl"])


def test_compare_sets_skips_and_counts_nans():
    reference = [{"pitch_range": 12.0, "polyphony": 1.0}, {"pitch_range": 7.0, "polyphony": 2.0},
                 {"pitch_range": 9.0, "polyphony": math.nan}]
    generated = [{"pitch_range": 8.0, "polyphony": math.nan}, {"pitch_range": math.nan}]
    result = compare_sets(generated, reference)
    assert list(result) == ["pitch_range", "polyphony"]
    assert result["pitch_range"]["reference_mean"] == pytest.approx(28 / 3)
    assert result["pitch_range"]["generated_mean"] == 8.0
    assert (result["pitch_range"]["generated_count"], result["pitch_range"]["generated_nan"]) == (1, 1)
    assert 0.0 <= result["pitch_range"]["oa"] <= 1.0 and result["pitch_range"]["kl"] >= 0.0
    polyphony = result["polyphony"]
    # No generated value (one NaN, one missing): means and OA/KL are NaN, counts say why.
    assert (polyphony["generated_count"], polyphony["generated_nan"]) == (0, 2)
    assert (polyphony["reference_count"], polyphony["reference_nan"]) == (2, 1)
    assert math.isnan(polyphony["oa"]) and math.isnan(polyphony["kl"]) and math.isnan(polyphony["generated_mean"])


def test_empty_sets_are_named():
    with pytest.raises(ValueError, match="the generated set is empty"):
        compare_sets([], [{"pitch_range": 1.0}])
    with pytest.raises(ValueError, match="the reference set is empty"):
        compare_sets([{"pitch_range": 1.0}], [])
    with pytest.raises(ValueError, match="generated and reference sets are empty"):
        compare_sets([], [])
