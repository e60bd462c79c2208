"""Multi-objective asynchronous successive halving, in its stopping form (MO-ASHA).

At each rung a trial is ranked against every trial that reported at the same rung, by
non-dominated sorting of the objective vectors measured so far, ties within a front broken
by crowding distance (Schmucker et al. 2021, "Multi-objective asynchronous successive
halving"). It continues when it is in the top ``ceil(n / reduction_factor)`` of the ``n``
trials at that rung; while fewer than ``min_reports`` trials (at least
``reduction_factor``) have reported there, every trial continues (no evidence yet). With
one objective this is plain ASHA.

Two departures from the paper's rule, both chosen by racing candidates on recorded curves
(``bench/stopping_rules.py``; the README has the table):

- A trial no other trial at the rung dominates always continues (``keep_front``). Early
  ranks are noisy, and the paper's crowding-distance cut stops members of the rung's
  front that the final front would hold: on the dpo table, final hypervolume 0.904 with
  this against 0.837 without.
- ``min_reports`` (a study's ``fidelity.min_reports``) holds every decision until a rung
  has seen that many reports: a trial is not stopped after being compared with one or two
  others.

Pure code over vectors: the policy collects the rung data and applies the decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stagetune.objectives.catalog import Direction
from stagetune.objectives.pareto import crowding_distance, dominated_by, non_dominated_ranks

__all__ = ["RungDecision", "rung_decision"]


@dataclass(frozen=True)
class RungDecision:
    stop: bool
    position: int  # 0-based place of the trial among the n ranked at the rung
    n: int  # trials ranked at the rung, this one included
    keep: int  # how many continue from this rung
    rank: int  # the trial's non-dominated rank (1 = not dominated by any)
    dominated_by: tuple[int, ...]  # indices into ``others`` of vectors that dominate it


def _position(
    points: npt.NDArray[np.float64],
    ranks: npt.NDArray[np.int64],
    me: int,
    directions: Sequence[Direction],
) -> int:
    """Where ``points[me]`` stands, 0-based, in the order best first: by front, then by
    crowding distance within the front (wider first, ties in input order). Only its own
    front's crowding matters, so only that front is sorted: at thousands of reports a rung
    decision stays a few milliseconds."""
    mine = ranks[me]
    ahead = int(np.count_nonzero(ranks < mine))
    members = np.flatnonzero(ranks == mine).tolist()
    spread = crowding_distance(points[members], directions)
    within = [m for _, m in sorted(zip(spread, members, strict=True), key=lambda p: -p[0])]
    return ahead + within.index(me)


def rung_decision(
    own: Sequence[float],
    others: Sequence[Sequence[float]] | npt.NDArray[np.float64],
    directions: Sequence[Direction],
    reduction_factor: float,
    min_reports: int = 0,
    keep_front: bool = True,
) -> RungDecision:
    """Continue or stop ``own`` given the vectors ``others`` reported at the same rung (a
    list of vectors or a matrix, one row each). ``keep_front=False`` is the paper's rule
    (a benchmark races it)."""
    width = len(own)
    points = np.vstack(
        [np.asarray(others, dtype=np.float64).reshape(-1, width), np.asarray([own], float)]
    )
    n = len(points)
    me = n - 1
    ranks = np.asarray(non_dominated_ranks(points, directions), dtype=np.int64)
    beaten_by = tuple(dominated_by(own, points[:me], directions))
    if n < max(reduction_factor, min_reports):
        return RungDecision(False, 0, n, n, int(ranks[me]), beaten_by)
    keep = max(1, math.ceil(n / reduction_factor))
    position = _position(points, ranks, me, directions)
    stop = position >= keep and not (keep_front and not beaten_by)
    return RungDecision(stop, position, n, keep, int(ranks[me]), beaten_by)
