"""Pareto math on hand-worked cases (every expected value is derived in a comment)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from stagetune.objectives.catalog import Direction
from stagetune.objectives.pareto import (
    crowding_distance,
    default_reference,
    dominates,
    hypervolume,
    hypervolume_contributions,
    knee_point,
    non_dominated_ranks,
)

MIN2: list[Direction] = ["minimize", "minimize"]
MAX2: list[Direction] = ["maximize", "maximize"]
MIN_MAX: list[Direction] = ["minimize", "maximize"]
MIN3: list[Direction] = ["minimize"] * 3


# --- dominance -------------------------------------------------------------------------


def test_dominates_when_no_worse_anywhere_and_better_somewhere() -> None:
    assert dominates([1, 2], [1, 3], MIN2)
    assert dominates([1, 2], [2, 3], MIN2)
    assert not dominates([1, 3], [1, 2], MIN2)
    assert not dominates([1, 3], [2, 2], MIN2)  # trade-off: neither dominates
    assert not dominates([2, 2], [1, 3], MIN2)


def test_equal_points_do_not_dominate_each_other() -> None:
    assert not dominates([1.5, 2.0], [1.5, 2.0], MIN2)
    assert not dominates([1.5, 2.0], [1.5, 2.0], MAX2)


def test_dominance_follows_maximise_directions() -> None:
    assert dominates([2, 3], [1, 3], MAX2)
    assert not dominates([1, 3], [2, 3], MAX2)
    # minimise the first, maximise the second: (1, 5) beats (2, 4) in both.
    assert dominates([1, 5], [2, 4], MIN_MAX)
    assert not dominates([1, 4], [2, 5], MIN_MAX)


# --- non-dominated ranks ---------------------------------------------------------------

# Minimising both: A, B, C (and G, a copy of B) form front 1; D is dominated by B and E by C,
# but D and E trade off, so they form front 2; F is dominated by D and E: front 3.
A, B, C, D, E, F, G = (1, 5), (2, 3), (4, 1), (3, 4), (5, 2), (6, 6), (2, 3)
THREE_FRONTS = [A, B, C, D, E, F, G]


def test_ranks_of_three_fronts_with_a_duplicate() -> None:
    assert non_dominated_ranks(THREE_FRONTS, MIN2) == [1, 1, 1, 2, 2, 3, 1]


def test_maximising_a_column_reorders_the_fronts() -> None:
    # Minimise x, maximise y. Front 1: A (1, 5) beats all but F, whose y = 6 is best.
    # Front 2: B = G (2, 3) and D (3, 4) trade off; both beat C and E.
    # Front 3: C (4, 1) and E (5, 2) trade off.
    assert non_dominated_ranks(THREE_FRONTS, MIN_MAX) == [1, 2, 3, 2, 3, 1, 2]


def test_ranks_of_a_single_objective_are_dense_value_ranks() -> None:
    assert non_dominated_ranks([[3], [1], [2], [1]], ["minimize"]) == [3, 1, 2, 1]
    assert non_dominated_ranks([[3], [1], [2], [1]], ["maximize"]) == [1, 3, 2, 3]


def test_ranks_of_empty_input_and_infinite_values() -> None:
    assert non_dominated_ranks([], MIN2) == []
    # A diverged trial (infinite perplexity) is dominated by any finite trade-off.
    assert non_dominated_ranks([[1, math.inf], [2, 1], [math.inf, math.inf]], MIN2) == [1, 1, 2]


def _ranks_by_peeling(points: np.ndarray) -> list[int]:
    ranks = [0] * len(points)
    remaining = set(range(len(points)))
    rank = 0
    while remaining:
        rank += 1
        front = {
            i
            for i in remaining
            if not any(
                np.all(points[j] <= points[i]) and np.any(points[j] < points[i]) for j in remaining
            )
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
    return ranks


def test_ranks_agree_with_front_peeling_on_random_3d_points() -> None:
    rng = np.random.default_rng(0)
    points = rng.integers(0, 6, size=(60, 3)).astype(float)  # many ties and duplicates
    assert non_dominated_ranks(points.tolist(), MIN3) == _ranks_by_peeling(points)


# --- crowding distance -----------------------------------------------------------------


def test_crowding_distance_hand_worked_four_points() -> None:
    # P0 (0, 4), P1 (1, 2), P2 (3, 1), P3 (4, 0); both ranges are 4.
    # x order P0 P1 P2 P3: P1 += (3 - 0)/4 = 0.75, P2 += (4 - 1)/4 = 0.75.
    # y order P3 P2 P1 P0: P2 += (2 - 0)/4 = 0.50, P1 += (4 - 1)/4 = 0.75.
    # P0 and P3 are boundaries: inf. Input order is shuffled to P2, P0, P3, P1.
    points = [(3, 1), (0, 4), (4, 0), (1, 2)]
    assert crowding_distance(points, MIN2) == [1.25, math.inf, math.inf, 1.5]
    # Negating a maximised column changes nothing.
    flipped = [(x, -y) for x, y in points]
    assert crowding_distance(flipped, MIN_MAX) == [1.25, math.inf, math.inf, 1.5]


def test_crowding_distance_skips_constant_objectives_and_small_sets() -> None:
    # y is constant: only x counts; the middle point gets (3 - 1)/(3 - 1) = 1.
    assert crowding_distance([(1, 5), (2, 5), (3, 5)], MIN2) == [math.inf, 1.0, math.inf]
    assert crowding_distance([(1, 5), (2, 4)], MIN2) == [math.inf, math.inf]
    assert crowding_distance([], MIN2) == []


def test_crowding_distance_rejects_infinite_values() -> None:
    with pytest.raises(ValueError, match="finite"):
        crowding_distance([(1, 2), (2, 1), (math.inf, 0)], MIN2)


# --- hypervolume -----------------------------------------------------------------------


def test_hypervolume_2d_staircase() -> None:
    # Union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4]: columns 1x1 + 1x2 + 1x3 = 6.
    assert hypervolume([(1, 3), (2, 2), (3, 1)], (4, 4), MIN2) == pytest.approx(6.0)


def test_hypervolume_ignores_points_beyond_or_on_the_reference() -> None:
    staircase = [(1, 3), (2, 2), (3, 1)]
    # (5, 0) is beyond the reference in x; (4, 0.5) lies on it: neither adds volume.
    assert hypervolume([*staircase, (5, 0), (4, 0.5)], (4, 4), MIN2) == pytest.approx(6.0)
    assert hypervolume([(5, 0), (0, 9)], (4, 4), MIN2) == 0.0
    assert hypervolume([], (4, 4), MIN2) == 0.0


def test_hypervolume_3d_unit_cube_cases() -> None:
    cube = MIN3
    assert hypervolume([(0, 0, 0)], (1, 1, 1), cube) == pytest.approx(1.0)
    # 1x1x0.5 box plus 0.5x0.5x1 box, overlapping in a 0.5^3 cube: 0.5 + 0.25 - 0.125.
    boxes = [(0, 0, 0.5), (0.5, 0.5, 0)]
    assert hypervolume(boxes, (1, 1, 1), cube) == pytest.approx(0.625)
    # A dominated point inside the cube changes nothing.
    assert hypervolume([*boxes, (0.6, 0.6, 0.6)], (1, 1, 1), cube) == pytest.approx(0.625)


def test_hypervolume_with_maximised_objectives() -> None:
    # Maximise both, reference at the origin: the mirror of the staircase above, 3 + 2 + 1.
    assert hypervolume([(3, 1), (2, 2), (1, 3)], (0, 0), MAX2) == pytest.approx(6.0)
    # Minimise x, maximise y, reference (5, 0): boxes 4x3 and 3x4 overlapping in 3x3.
    assert hypervolume([(1, 3), (2, 4)], (5, 0), MIN_MAX) == pytest.approx(15.0)
    # A point below the reference of a maximised objective is beyond it.
    assert hypervolume([(1, -1)], (5, 0), MIN_MAX) == 0.0


def test_hypervolume_of_one_objective_is_the_best_gap() -> None:
    assert hypervolume([[2], [3]], [5], ["minimize"]) == pytest.approx(3.0)


# --- hypervolume contributions ---------------------------------------------------------


def test_contributions_hand_worked() -> None:
    # Reference (4, 4). Exclusive boxes: A (1, 3): [1,2]x[3,4] = 1; B (2, 1.5):
    # [2,3]x[1.5,3] = 1.5; C (3, 1): [3,4]x[1,1.5] = 0.5; (5, 0) is beyond the reference.
    points = [(1, 3), (2, 1.5), (3, 1), (5, 0)]
    assert hypervolume_contributions(points, (4, 4), MIN2) == pytest.approx([1, 1.5, 0.5, 0])


def test_contributions_of_duplicates_and_of_a_point_dominated_once() -> None:
    # Duplicates: removing either leaves the volume unchanged, so both contribute 0.
    assert hypervolume_contributions([(1, 3), (1, 3), (3, 1)], (4, 4), MIN2) == pytest.approx(
        [0, 0, 2]
    )
    # (2.5, 2) is dominated by B alone and still covers [2.5,3]x[2,3] of B's box if B goes:
    # B's exclusive contribution drops from 1.5 to 1.0; the dominated point contributes 0.
    points = [(1, 3), (2, 1.5), (3, 1), (2.5, 2)]
    assert hypervolume_contributions(points, (4, 4), MIN2) == pytest.approx([1, 1, 0.5, 0])


def test_contributions_with_maximised_objectives_and_one_objective() -> None:
    mirrored = [(-1, -3), (-2, -1.5), (-3, -1)]
    assert hypervolume_contributions(mirrored, (-4, -4), MAX2) == pytest.approx([1, 1.5, 0.5])
    # One objective: only the unique best point contributes, up to the next value.
    assert hypervolume_contributions([[2], [3], [7]], [5], ["minimize"]) == pytest.approx([1, 0, 0])
    assert hypervolume_contributions([], (4, 4), MIN2) == []


def test_contributions_match_the_definition_on_random_points() -> None:
    rng = np.random.default_rng(1)
    points = rng.random((12, 3)).tolist()
    ref, dirs = (1.0, 1.0, 1.0), MIN3
    total = hypervolume(points, ref, dirs)
    expected = [
        total - hypervolume(points[:i] + points[i + 1 :], ref, dirs) for i in range(len(points))
    ]
    actual = hypervolume_contributions(points, ref, dirs)
    assert actual == pytest.approx(expected, abs=1e-12)


# --- reference and knee ----------------------------------------------------------------


def test_default_reference_doubles_the_distance_from_zero() -> None:
    assert default_reference([2.0, 0.5], MIN_MAX) == [4.0, 0.0]
    assert default_reference([-3.0, -1.0], MIN_MAX) == [0.0, -2.0]
    assert default_reference([0.0, 0.0], MIN_MAX) == [1e-9, -1e-9]


def test_point_has_positive_hypervolume_against_its_default_reference() -> None:
    for point in itertools.product([-2.0, 0.0, 3.0], repeat=2):
        ref = default_reference(point, MIN_MAX)
        assert hypervolume([point], ref, MIN_MAX) > 0.0


def test_knee_point_of_a_convex_front() -> None:
    # Normalised by the range 10: (0, 1), (.1, .4), (.2, .2), (.4, .1), (1, 0);
    # distances to the ideal (0, 0): 1, .41, .28, .41, 1 -> index 2.
    front = [(0, 10), (1, 4), (2, 2), (4, 1), (10, 0)]
    assert knee_point(front, MIN2) == 2
    assert knee_point([(x, -y) for x, y in front], MIN_MAX) == 2


def test_knee_point_ignores_constant_objectives_and_rejects_empty_input() -> None:
    assert knee_point([(3, 5), (1, 5), (2, 5)], MIN2) == 1
    assert knee_point([(1, 1)], MIN2) == 0
    with pytest.raises(ValueError, match="empty"):
        knee_point([], MIN2)


# --- validation ------------------------------------------------------------------------


def test_arity_mismatches_raise_value_errors_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="b: has 1 values, directions has 2"):
        dominates([1, 2], [1], MIN2)
    with pytest.raises(ValueError, match=r"points\[1\]: has 3 values"):
        non_dominated_ranks([(1, 2), (1, 2, 3)], MIN2)
    with pytest.raises(ValueError, match="reference: has 3 values"):
        hypervolume([(1, 2)], (4, 4, 4), MIN2)
    with pytest.raises(ValueError, match="point: has 1 values"):
        default_reference([1.0], MIN2)
    with pytest.raises(ValueError, match=r"points\[0\]"):
        knee_point([(1, 2, 3)], MIN2)
    with pytest.raises(ValueError, match=r"points\[0\]"):
        crowding_distance([(1,)], MIN2)
    with pytest.raises(ValueError, match="reference"):
        hypervolume_contributions([(1, 2)], (4,), MIN2)


def test_bad_directions_and_nan_values_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="directions"):
        non_dominated_ranks([(1, 2)], ["minimize", "max"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one objective"):
        hypervolume([], [], [])
    with pytest.raises(ValueError, match="NaN"):
        non_dominated_ranks([(1, math.nan)], MIN2)
    with pytest.raises(ValueError, match="finite"):
        hypervolume([(1, 2)], (4, math.inf), MIN2)
