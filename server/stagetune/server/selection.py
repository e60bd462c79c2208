"""Choosing a stage's winner among its study's trials: the knee of the Pareto front, the
best value of one metric under extra limits, or the trial a person approves.

Only COMPLETE, feasible trials are candidates: a trial that broke one of the study's
constraints is ``infeasible`` and never promoted, whatever the rule.
"""

from __future__ import annotations

from stagetune.contract.errors import FailedPrecondition, InvalidArgument
from stagetune.contract.pipeline import Selection
from stagetune.contract.spec import StudySpec
from stagetune.objectives.catalog import METRICS
from stagetune.objectives.pareto import knee_point
from stagetune.server.front import ranked
from stagetune.server.records import TrialRecord

__all__ = ["select_trial", "approvable", "direction_of"]


def direction_of(spec: StudySpec, metric: str) -> str:
    """Which way ``metric`` is better: the study's, when it is one of its objectives;
    else the metric catalog's."""
    for o in spec.objectives:
        if o.metric == metric:
            return o.direction
    return METRICS[metric].direction


def _candidates(trials: list[TrialRecord]) -> list[TrialRecord]:
    return [t for t in trials if t.state == "complete" and t.values]


def select_trial(
    spec: StudySpec, trials: list[TrialRecord], select: Selection
) -> tuple[TrialRecord | None, str]:
    """The winner under ``select`` (not ``manual``) and how it was chosen; (None, why)
    when no trial qualifies."""
    candidates = _candidates(trials)
    if not candidates:
        return None, "no trial completed feasibly"
    if select.rule == "knee":
        # Ordered as GetParetoFront orders it, so this knee is the one `stagetune pareto` shows.
        front = sorted(
            (t for t in ranked(spec, candidates) if t.pareto_rank == 1), key=lambda t: t.values
        )
        chosen = front[knee_point([t.values for t in front], spec.directions)]
        return chosen, f"the knee of a front of {len(front)}"
    if select.rule != "best":
        raise ValueError(f"selection {select.rule!r} is a person's choice")
    metric = select.metric
    eligible = []
    for t in candidates:
        value = t.metrics.get(metric)
        if value is None:
            continue
        if any(
            t.metrics.get(c.metric) is None or c.excess(t.metrics[c.metric]) > 0
            for c in select.limits
        ):
            continue
        eligible.append((value, t))
    if not eligible:
        limits = " under " + ", ".join(c.describe() for c in select.limits) if select.limits else ""
        return None, f"no feasible trial reported {metric}{limits}"
    sign = 1.0 if direction_of(spec, metric) == "minimize" else -1.0
    value, chosen = min(eligible, key=lambda vt: (sign * vt[0], vt[1].trial_id))
    return chosen, f"best {metric} = {value:.6g} of {len(eligible)} eligible"


def approvable(study_name: str, trial: TrialRecord) -> None:
    """Refuse a trial a person may not promote: one of another study, or one that did not
    complete feasibly."""
    if trial.study_name != study_name:
        raise InvalidArgument(
            "trial_id", f"trial {trial.trial_id} is not a trial of study {study_name}"
        )
    if trial.state != "complete" or not trial.values:
        raise FailedPrecondition(
            f"trial {trial.trial_id} is {trial.state}: only a complete, feasible trial "
            "can be promoted"
        )
