"""Multi-objective math over objective vectors: dominance, ranks, crowding, hypervolume, knee.

Every function takes points as `n` rows of `m` objective values plus `m` directions, in the
units the metrics are reported in (see `objectives.catalog`). Internally each point is
turned into pure minimisation by negating its maximised columns, so "better" always means
"smaller" below this line; results (ranks, distances, volumes, indices) are invariant to
that transformation, and references are given and returned in the original units.

Input rules, enforced by every function with a `ValueError` that names the problem: each
point has exactly `len(directions)` values, `directions` is non-empty and holds only
"minimize"/"maximize", and no value is NaN. Infinite values are allowed where they have a
meaning (dominance, ranks, hypervolume: an infinitely bad point is dominated by every finite
one and lies beyond any reference); crowding distance and the knee point need finite values.

Hypervolume and non-dominated sorting are delegated to moocore (C implementations,
O(n log n) in 2-D and 3-D), which is much faster than Optuna's pure-Python hypervolume.
"""

from __future__ import annotations

from collections.abc import Sequence

import moocore
import numpy as np
import numpy.typing as npt

from stagetune.objectives.catalog import Direction

_Array = npt.NDArray[np.float64]
Points = Sequence[Sequence[float]] | _Array  # one row per point

_DIRECTION_SIGNS: dict[str, float] = {"minimize": 1.0, "maximize": -1.0}


def _signs(directions: Sequence[Direction]) -> _Array:
    if len(directions) == 0:
        raise ValueError("directions: need at least one objective")
    unknown = [d for d in directions if d not in _DIRECTION_SIGNS]
    if unknown:
        raise ValueError(f"directions: {unknown!r} not in ('minimize', 'maximize')")
    return np.array([_DIRECTION_SIGNS[d] for d in directions], dtype=np.float64)


def _no_nan(values: _Array, name: str) -> None:
    if np.isnan(values).any():
        raise ValueError(f"{name}: NaN objective values are not comparable")


def _finite(values: _Array, name: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: values must be finite")


def _as_min_matrix(points: Points, directions: Sequence[Direction]) -> _Array:
    """Points as an (n, m) float array in minimisation form, after validating its shape."""
    signs = _signs(directions)
    m = len(signs)
    if len(points) == 0:
        return np.empty((0, m), dtype=np.float64)
    if isinstance(points, np.ndarray) and points.ndim == 2:  # one shape check, not n
        if points.shape[1] != m:
            raise ValueError(f"points[0]: has {points.shape[1]} values, directions has {m}")
    else:
        for i, p in enumerate(points):
            if len(p) != m:
                raise ValueError(f"points[{i}]: has {len(p)} values, directions has {m}")
    arr = np.asarray(points, dtype=np.float64).reshape(len(points), m)
    _no_nan(arr, "points")
    return arr * signs


def _as_min_vector(point: Sequence[float], signs: _Array, name: str) -> _Array:
    if len(point) != len(signs):
        raise ValueError(f"{name}: has {len(point)} values, directions has {len(signs)}")
    vec = np.asarray(point, dtype=np.float64).reshape(len(signs))
    _no_nan(vec, name)
    return vec * signs


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Direction]) -> bool:
    """Whether `a` Pareto-dominates `b`: at least as good in every objective, better in one.

    Equal points do not dominate each other.
    """
    signs = _signs(directions)
    va = _as_min_vector(a, signs, "a")
    vb = _as_min_vector(b, signs, "b")
    return bool(np.all(va <= vb) and np.any(va < vb))


def dominated_by(
    point: Sequence[float], points: Points, directions: Sequence[Direction]
) -> list[int]:
    """Indices of the ``points`` that Pareto-dominate ``point`` (``dominates`` over all of
    them at once)."""
    arr = _as_min_matrix(points, directions)
    vec = _as_min_vector(point, _signs(directions), "point")
    mask = np.all(arr <= vec, axis=1) & np.any(arr < vec, axis=1)
    return [int(i) for i in np.flatnonzero(mask)]


def non_dominated_ranks(points: Points, directions: Sequence[Direction]) -> list[int]:
    """1-based non-dominated sorting rank of each point (1 = the Pareto front).

    Rank k holds the points not dominated by any point of rank >= k once ranks 1..k-1 are
    removed (NSGA-II fronts). Equal points share a rank. Empty input gives `[]`.
    Uses moocore's non-dominated sort (O(n log n) for 2 objectives).
    """
    arr = _as_min_matrix(points, directions)
    if len(arr) == 0:
        return []
    ranks = moocore.pareto_rank(np.ascontiguousarray(arr))
    ranked: list[int] = (np.asarray(ranks, dtype=np.int64) + 1).tolist()
    return ranked


def crowding_distance(points: Points, directions: Sequence[Direction]) -> list[float]:
    """NSGA-II crowding distance of each point within the given set (usually one front).

    For each objective the points are sorted by value; the first and last get `inf`, and
    each interior point adds the gap between its two neighbours divided by that
    objective's range. An objective with zero range adds nothing (and marks no boundary).
    Sets of one or two points are all boundary: every distance is `inf`. Ties are ordered
    by input index, so of two equal extreme points only one is the boundary.
    Values must be finite.
    """
    arr = _as_min_matrix(points, directions)
    _finite(arr, "points")
    n, m = arr.shape
    if n <= 2:
        return [float("inf")] * n
    distance = np.zeros(n, dtype=np.float64)
    for j in range(m):
        order = np.argsort(arr[:, j], kind="stable")
        column = arr[order, j]
        span = column[-1] - column[0]
        if span == 0.0:
            continue
        distance[order[1:-1]] += (column[2:] - column[:-2]) / span
        distance[order[0]] = distance[order[-1]] = np.inf
    return [float(d) for d in distance]


def hypervolume(
    points: Points, reference: Sequence[float], directions: Sequence[Direction]
) -> float:
    """Volume of objective space dominated by `points` and bounded by `reference`.

    `reference` is in the original units (for a maximised objective it lies below the
    values that count). A point not strictly better than the reference in every objective
    contributes nothing and is dropped; an empty set (or one wholly beyond the reference)
    has hypervolume 0.0. Dominated points are harmless. At most 31 objectives (moocore).
    """
    signs = _signs(directions)
    arr = _as_min_matrix(points, directions)
    ref = _as_min_vector(reference, signs, "reference")
    _finite(ref, "reference")
    inside = arr[np.all(arr < ref, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(moocore.hypervolume(np.ascontiguousarray(inside), ref=ref))


def hypervolume_contributions(
    points: Points, reference: Sequence[float], directions: Sequence[Direction]
) -> list[float]:
    """Exclusive hypervolume contribution of each point: `HV(X) - HV(X without it)`.

    Points beyond the reference, dominated points and duplicated points contribute 0.0. A
    point dominated by exactly one other point lowers that point's contribution, as the
    definition says (moocore with `ignore_dominated=False`, which recomputes the volume once
    per point: O(n^2 log n) in 2-D and 3-D, fine for study-sized sets). Used to order the
    members of one front, e.g. to break ties between equally ranked trials.
    """
    signs = _signs(directions)
    arr = _as_min_matrix(points, directions)
    ref = _as_min_vector(reference, signs, "reference")
    _finite(ref, "reference")
    contributions = np.zeros(len(arr), dtype=np.float64)
    inside = np.all(arr < ref, axis=1)
    if not inside.any():
        return [float(c) for c in contributions]
    kept = arr[inside]
    if kept.shape[1] == 1:
        # moocore needs >= 2 columns; a constant extra column leaves every volume unchanged.
        kept = np.hstack([kept, np.zeros_like(kept)])
        ref = np.append(ref, 1.0)
    contributions[inside] = moocore.hv_contributions(
        np.ascontiguousarray(kept), ref=ref, ignore_dominated=False
    )
    return [float(c) for c in contributions]


def default_reference(point: Sequence[float], directions: Sequence[Direction]) -> list[float]:
    """A hypervolume reference derived from one objective vector, in the original units.

    Minimised objective: `v + max(|v|, 1e-9)` (2v for positive v); maximised objective:
    `v - max(|v|, 1e-9)` (0 for positive v). The result is strictly worse than `point` in
    every objective, so that point has a positive hypervolume.

    Why: a study's hypervolume is logged against completed-trial count, and values computed
    with different references cannot be compared. Freezing the reference at the first
    completed trial (rather than recomputing it from the current worst point, the nadir,
    which moves as trials arrive) keeps that curve monotone and comparable over time; the
    margin of one |v| leaves room for later trials somewhat worse than the first one.
    """
    signs = _signs(directions)
    vec = _as_min_vector(point, signs, "point")
    _finite(vec, "point")
    ref_min = vec + np.maximum(np.abs(vec), 1e-9)
    return [float(r) for r in ref_min * signs]


def knee_point(points: Points, directions: Sequence[Direction]) -> int:
    """Index of the point closest to the ideal point: the balanced choice on a front.

    Each objective is min-max normalised over the given points to [0, 1] (0 = best),
    a constant objective becomes 0 everywhere, and the point with the smallest Euclidean
    norm (distance to the ideal point, all zeros) wins; ties go to the lowest index.
    Callers pass only front members: with dominated points included the "knee" can be a
    dominated point. Values must be finite.

    Raises:
        ValueError: no points, or invalid input (see module docstring).
    """
    arr = _as_min_matrix(points, directions)
    if len(arr) == 0:
        raise ValueError("points: knee point of an empty set")
    _finite(arr, "points")
    low = arr.min(axis=0)
    span = arr.max(axis=0) - low
    scale = np.where(span > 0.0, span, 1.0)
    normalised = np.where(span > 0.0, (arr - low) / scale, 0.0)
    return int(np.argmin(np.linalg.norm(normalised, axis=1)))
