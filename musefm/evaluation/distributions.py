"""Comparing a generated set of pieces with a reference set, metric by metric (Yang & Lerch 2020).

For one metric, with values x_i on the generated pieces and y_j on the reference pieces:

- intra-set distances of a set: |v_i - v_j| over its unordered pairs i < j (Yang & Lerch's
  leave-one-out loop visits each pair twice, which gives the same distribution);
- inter-set distances: |x_i - y_j| over every generated-reference pair;
- each distance sample is smoothed by a Gaussian kernel density estimate with Scott's bandwidth,
  h = std(ddof=1) * n^(-1/5), as ``scipy.stats.gaussian_kde`` (scipy is not a dependency);
- OA, the overlapped area: the integral of min(p, q) where p is the reference's intra-set density
  and q the inter-set density. 1 means a generated piece lies as close to the reference pieces as
  they lie to each other; near 0 means the generated set sits elsewhere.
- KL = KL(p || q), the integral of p log(p / q), in nats.

Both integrals are sums over one shared grid of evaluation points reaching 4 bandwidths past the
data on both sides (Yang & Lerch integrate between the smallest and largest data value only, which
cuts off the tails: two identical densities would not reach OA = 1). The densities are evaluated
from the samples binned linearly onto the grid, whose spacing is at most a third of the narrower
bandwidth, and each is normalised to a probability mass over the grid, so OA lies in [0, 1]. They
are kept as logarithms, so KL stays finite where one density underflows.
"""

from __future__ import annotations

import math

import numpy as np

# Grid points: enough to resolve both kernels, bounded so that one metric costs milliseconds.
_MIN_GRID_POINTS, _MAX_GRID_POINTS = 256, 2048
# Distance samples whose values are all equal (a metric constant over a set) have no spread, so
# Scott's bandwidth is 0; such a kernel is widened to this share of the pooled spread of both
# samples, a narrow peak that can still be integrated.
_BANDWIDTH_FLOOR_SHARE = 0.01
_ROWS_PER_CHUNK = 256  # grid rows per block of the (rows x bins) kernel matrix


def intra_set_distances(values) -> np.ndarray:
    """|v_i - v_j| for every unordered pair i < j, in row-major order of (i, j). Shape (n(n-1)/2,)."""
    values = np.asarray(values, dtype=np.float64)
    first, second = np.triu_indices(len(values), k=1)
    return np.abs(values[first] - values[second])


def inter_set_distances(values, other_values) -> np.ndarray:
    """|a_i - b_j| for every i of ``values`` and j of ``other_values``, i-major. Shape (n * m,)."""
    values, other_values = np.asarray(values, dtype=np.float64), np.asarray(other_values, dtype=np.float64)
    return np.abs(values[:, None] - other_values[None, :]).ravel()


def scott_bandwidth(samples) -> float:
    """Scott's rule for one dimension: sample standard deviation (ddof=1) x n^(-1/5); 0 with fewer
    than two samples or no spread."""
    samples = np.asarray(samples, dtype=np.float64)
    if len(samples) < 2:
        return 0.0
    return float(samples.std(ddof=1) * len(samples) ** -0.2)


def kde_density(samples, points, bandwidth: float | None = None) -> np.ndarray:
    """Gaussian kernel density estimate of ``samples`` evaluated exactly at ``points``:
    mean over samples of N(point; sample, bandwidth^2). Bandwidth: Scott's rule by default."""
    samples = np.asarray(samples, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    bandwidth = scott_bandwidth(samples) if bandwidth is None else float(bandwidth)
    if len(samples) == 0 or bandwidth <= 0:
        raise ValueError("a kernel density estimate needs samples and a positive bandwidth")
    density = np.zeros(points.shape)
    for start in range(0, len(samples), _ROWS_PER_CHUNK):
        standardised = (points[..., None] - samples[start : start + _ROWS_PER_CHUNK]) / bandwidth
        density += np.exp(-0.5 * standardised**2).sum(axis=-1)
    return density / (len(samples) * bandwidth * math.sqrt(2 * math.pi))


def _logsumexp(values: np.ndarray, axis=None) -> np.ndarray:
    peak = values.max(axis=axis, keepdims=True)
    return (np.log(np.exp(values - peak).sum(axis=axis, keepdims=True)) + peak).squeeze(axis)


def _log_mass_on_grid(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Log of the Gaussian KDE's probability mass at each grid point, normalised over the grid.

    Samples are first split linearly between their two neighbouring grid points (linear binning),
    so the cost is grid x occupied bins, whatever the number of samples.
    """
    spacing = grid[1] - grid[0]
    position = (samples - grid[0]) / spacing
    left = np.clip(np.floor(position).astype(np.int64), 0, len(grid) - 2)
    right_share = np.clip(position - left, 0.0, 1.0)
    weights = np.bincount(left, weights=1.0 - right_share, minlength=len(grid))
    weights += np.bincount(left + 1, weights=right_share, minlength=len(grid))
    occupied = np.flatnonzero(weights > 0)
    log_weights = np.log(weights[occupied])
    log_density = np.empty(len(grid))
    for start in range(0, len(grid), _ROWS_PER_CHUNK):
        rows = grid[start : start + _ROWS_PER_CHUNK, None]  # (R, 1)
        standardised = (rows - grid[None, occupied]) / bandwidth  # (R, occupied)
        log_density[start : start + len(rows)] = _logsumexp(log_weights - 0.5 * standardised**2, axis=1)
    return log_density - _logsumexp(log_density)


def overlap_area_and_kl(reference_intra, inter) -> tuple[float, float]:
    """(OA, KL(p || q)) of p, the KDE of ``reference_intra``, and q, the KDE of ``inter``; see the
    module docstring. Both samples identical and constant: (1, 0)."""
    p_samples, q_samples = np.asarray(reference_intra, np.float64), np.asarray(inter, np.float64)
    if len(p_samples) == 0 or len(q_samples) == 0:
        raise ValueError("overlap_area_and_kl needs at least one distance in each sample")
    pooled = np.concatenate([p_samples, q_samples])
    pooled_spread = pooled.std()
    if pooled_spread == 0:
        return 1.0, 0.0
    floor = _BANDWIDTH_FLOOR_SHARE * pooled_spread
    p_bandwidth, q_bandwidth = max(scott_bandwidth(p_samples), floor), max(scott_bandwidth(q_samples), floor)
    low = pooled.min() - 4 * max(p_bandwidth, q_bandwidth)
    high = pooled.max() + 4 * max(p_bandwidth, q_bandwidth)
    wanted = math.ceil((high - low) / (min(p_bandwidth, q_bandwidth) / 3)) + 1
    grid = np.linspace(low, high, int(np.clip(wanted, _MIN_GRID_POINTS, _MAX_GRID_POINTS)))
    log_p = _log_mass_on_grid(p_samples, grid, p_bandwidth)
    log_q = _log_mass_on_grid(q_samples, grid, q_bandwidth)
    p = np.exp(log_p)
    overlap = float(np.minimum(p, np.exp(log_q)).sum())
    kl = float((p * (log_p - log_q)).sum())
    return min(overlap, 1.0), max(kl, 0.0)


def compare_metric(generated_values, reference_values) -> dict[str, float]:
    """One metric's comparison: OA and KL of the reference intra-set distances against the
    inter-set distances, plus each set's mean, standard deviation (ddof=0), count of finite values
    and count of NaNs (skipped). OA and KL are NaN when the reference has fewer than two finite
    values (no intra-set distance) or the generated set has none."""
    generated = np.asarray(generated_values, dtype=np.float64)
    reference = np.asarray(reference_values, dtype=np.float64)
    generated_finite, reference_finite = generated[np.isfinite(generated)], reference[np.isfinite(reference)]
    result = {"oa": math.nan, "kl": math.nan}
    for name, values, finite in (("generated", generated, generated_finite), ("reference", reference, reference_finite)):
        result[f"{name}_mean"] = float(finite.mean()) if len(finite) else math.nan
        result[f"{name}_std"] = float(finite.std()) if len(finite) else math.nan
        result[f"{name}_count"] = int(len(finite))
        result[f"{name}_nan"] = int(len(values) - len(finite))
    if len(generated_finite) >= 1 and len(reference_finite) >= 2:
        result["oa"], result["kl"] = overlap_area_and_kl(
            intra_set_distances(reference_finite), inter_set_distances(generated_finite, reference_finite)
        )
    return result


def compare_sets(generated: list[dict], reference: list[dict]) -> dict[str, dict[str, float]]:
    """``compare_metric`` for every metric named in either set's dicts (e.g. ``symbolic.compute_all``
    outputs), in order of first appearance. A piece missing a metric counts as NaN for it.

    Raises ValueError naming the set that is empty.
    """
    empty = [name for name, pieces in (("generated", generated), ("reference", reference)) if len(pieces) == 0]
    if empty:
        subject = f"the {empty[0]} set is" if len(empty) == 1 else "the generated and reference sets are"
        raise ValueError(f"cannot compare sets: {subject} empty")
    metrics = list(dict.fromkeys(name for piece in [*reference, *generated] for name in piece))
    return {
        metric: compare_metric(
            [piece.get(metric, math.nan) for piece in generated], [piece.get(metric, math.nan) for piece in reference]
        )
        for metric in metrics
    }
