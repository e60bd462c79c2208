"""MO-ASHA rung decisions on hand-worked fronts (server/asha.py)."""

from __future__ import annotations

import random

from stagetune.objectives.catalog import Direction
from stagetune.objectives.pareto import crowding_distance, dominates, non_dominated_ranks
from stagetune.server.asha import rung_decision

MIN2 = ["minimize", "minimize"]


def test_every_trial_continues_until_a_rung_has_reduction_factor_reports() -> None:
    d = rung_decision([9.0, 9.0], [[1.0, 1.0]], MIN2, reduction_factor=3)
    assert not d.stop and d.n == 2
    assert d.dominated_by == (0,)


def test_a_dominated_trial_is_stopped_when_the_top_third_is_full() -> None:
    # Front 1: (1,3), (3,1); the new (2,2) is also on front 1, (4,4) is dominated by all.
    others = [[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]]
    d = rung_decision([4.0, 4.0], others, MIN2, reduction_factor=2)
    assert d.stop and d.rank == 2 and d.keep == 2 and d.n == 4
    assert d.dominated_by == (0, 1, 2)


def test_within_a_front_crowding_distance_breaks_the_tie() -> None:
    # All four on one front; (2,2.1) and (2.1,2) are crowded inner points, boundaries are not.
    others = [[1.0, 4.0], [4.0, 1.0], [2.0, 2.1]]
    inner = rung_decision([2.1, 2.0], others, MIN2, reduction_factor=2, keep_front=False)
    assert inner.rank == 1 and inner.stop  # the paper's rule, keep 2: the boundary points win
    others = [[4.0, 1.0], [2.0, 2.1], [2.1, 2.0]]
    boundary = rung_decision([0.5, 5.0], others, MIN2, 2, keep_front=False)
    assert not boundary.stop


def test_a_trial_no_other_dominates_always_continues() -> None:
    # The crowded inner point above: placed below the cut, but nothing beats it, and the
    # final front may well hold it. A dominated trial below the cut still stops.
    others = [[1.0, 4.0], [4.0, 1.0], [2.0, 2.1]]
    inner = rung_decision([2.1, 2.0], others, MIN2, reduction_factor=2)
    assert inner.rank == 1 and inner.position >= inner.keep and not inner.stop
    assert rung_decision([3.0, 4.5], others, MIN2, reduction_factor=2).stop


def test_no_trial_stops_until_the_rung_has_min_reports() -> None:
    others = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    held = rung_decision([9.0, 9.0], others, MIN2, reduction_factor=2, min_reports=5)
    assert not held.stop and held.n == 4 and held.dominated_by == (0, 1, 2)
    # The fifth report: enough evidence, and the worst of five is stopped.
    decided = rung_decision([9.0, 9.0], [*others, [4.0, 4.0]], MIN2, 2, min_reports=5)
    assert decided.stop and decided.keep == 3
    # Below reduction_factor, min_reports changes nothing: two of two always continue.
    assert not rung_decision([9.0, 9.0], [[1.0, 1.0]], MIN2, 3, min_reports=1).stop


def test_a_single_objective_is_plain_asha() -> None:
    others = [[3.0], [1.0], [2.0]]
    assert not rung_decision([0.5], others, ["minimize"], 3).stop  # best of 4, keep 2
    assert rung_decision([2.5], others, ["minimize"], 3).stop  # third of 4
    assert not rung_decision([2.5], others, ["maximize"], 3).stop  # flipped: second of 4


def test_exact_ties_do_not_let_a_trial_jump_ahead_of_earlier_ones() -> None:
    others = [[1.0, 1.0], [1.0, 1.0]]
    d = rung_decision([1.0, 1.0], others, MIN2, reduction_factor=2, keep_front=False)
    assert d.stop and d.position == 2
    # An equal point does not dominate: with the front kept, the third twin continues.
    assert not rung_decision([1.0, 1.0], others, MIN2, reduction_factor=2).stop


def _reference(
    own: list[float], others: list[list[float]], directions: list[Direction]
) -> tuple[int, tuple[int, ...]]:
    """MO-ASHA written out from its definition: sort every vector, front by front, each front
    by crowding distance (wider first, ties in input order), and find the trial's place."""
    points = [*others, own]
    ranks = non_dominated_ranks(points, directions)
    order: list[int] = []
    for front in sorted(set(ranks)):
        members = [i for i, r in enumerate(ranks) if r == front]
        spread = crowding_distance([points[i] for i in members], directions)
        order += [m for _, m in sorted(zip(spread, members, strict=True), key=lambda p: -p[0])]
    beaten = tuple(i for i, p in enumerate(others) if dominates(p, own, directions))
    return order.index(len(others)), beaten


def test_the_decision_matches_the_definition_on_random_rungs_with_ties() -> None:
    rng = random.Random(5)
    for case in range(300):
        m = rng.choice([1, 2, 3])
        directions: list[Direction] = [rng.choice(["minimize", "maximize"]) for _ in range(m)]
        # A coarse grid makes ties and equal points common.
        others = [[float(rng.randint(0, 6)) for _ in range(m)] for _ in range(rng.randint(0, 40))]
        own = [float(rng.randint(0, 6)) for _ in range(m)]
        d = rung_decision(own, others, directions, reduction_factor=3)
        paper = rung_decision(own, others, directions, reduction_factor=3, keep_front=False)
        position, beaten = _reference(own, others, directions)
        assert d.dominated_by == beaten, case
        if d.n >= 3:
            assert d.position == position, case
            assert paper.stop == (position >= d.keep), case
            assert d.stop == (position >= d.keep and bool(beaten)), case
