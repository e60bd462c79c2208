"""Each study's Pareto front after every completion: its hypervolume in the store, its
members' ranks and plot handed to the tracker.

A completion adds one point to a front this process keeps per study, instead of reading
every trial again; the front is read from the store on first use, after a restart, and
whenever another server replica sharing the database completed trials meanwhile. The
hypervolume's reference point is fixed by the first completion (or the spec's objective
references) and never moves, so hypervolumes of one study compare over time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stagetune.contract.spec import StudySpec
from stagetune.objectives.pareto import default_reference, hypervolume, non_dominated_ranks
from stagetune.server.records import StudyHead, TrialRecord
from stagetune.server.storage import StudyStore
from stagetune.server.tracking import Tracker

__all__ = ["StudyFronts", "ranked"]


def ranked(spec: StudySpec, trials: list[TrialRecord]) -> list[TrialRecord]:
    """``trials`` with the Pareto rank of each complete one among the complete ones."""
    complete = [t for t in trials if t.state == "complete" and t.values]
    if not complete:
        return trials
    ranks = non_dominated_ranks([t.values for t in complete], spec.directions)
    rank_of = {t.trial_id: r for t, r in zip(complete, ranks, strict=True)}
    return [dataclasses.replace(t, pareto_rank=rank_of.get(t.trial_id, 0)) for t in trials]


@dataclass
class _Front:
    """A study's feasible COMPLETE objective values as this process last knew them."""

    complete: int  # COMPLETE trials (feasible or not) the cache accounts for
    values: dict[int, tuple[float, ...]]  # by trial id, feasible ones only
    hypervolume: float | None = None  # as this process last stored it


class StudyFronts:
    """The fronts of every study. Each call must hold the study's per-study lock."""

    def __init__(self, store: StudyStore, tracker: Tracker) -> None:
        self._store = store
        self._tracker = tracker
        self._fronts: dict[str, _Front] = {}

    def completed(self, study: StudyHead, trial_id: int, values: tuple[float, ...] | None) -> None:
        """Trial ``trial_id`` just completed with ``values`` (None: infeasible)."""
        name = study.spec.name
        # Replicas sharing PostgreSQL update the front one at a time: the last to write
        # has counted every completion committed before it.
        with self._store.exclusive(name):
            self._write(study, self._front(name, trial_id, values))

    def refresh(self, trial: TrialRecord) -> None:
        """A retried completion: the first call may have failed after storing the result
        but before the front was updated. Read the front again (only retries pay)."""
        if trial.state in ("complete", "infeasible"):
            self._fronts.pop(trial.study_name, None)
            self.completed(self._store.study_head(trial.study_name), trial.trial_id, None)

    def _front(self, name: str, trial_id: int, values: tuple[float, ...] | None) -> _Front:
        """The study's feasible COMPLETE values, just after trial ``trial_id`` completed
        with ``values``. When the database holds exactly one COMPLETE trial more than the
        cache accounts for, that is this one and it is added; otherwise (first use, a
        restart, another replica's completions) the values are read again."""
        complete = self._store.count_complete(name)  # before the values: never undercount
        front = self._fronts.get(name)
        if front is not None and front.complete + 1 == complete:
            front.complete = complete
            if values is not None:
                front.values[trial_id] = values
            return front
        front = _Front(complete, dict(self._store.complete_values(name)))
        self._fronts[name] = front
        return front

    def _write(self, study: StudyHead, front: _Front) -> None:
        spec = study.spec
        if not front.values:
            return
        rows = sorted(front.values.items())
        values = [v for _, v in rows]
        # Frozen once set; if not set when the caller read it, another replica may have.
        reference = study.reference or self._store.study_head(spec.name).reference
        if reference is None:
            derived = default_reference(values[0], spec.directions)
            reference = tuple(
                o.reference if o.reference is not None else d
                for o, d in zip(spec.objectives, derived, strict=True)
            )
            self._store.set_reference(spec.name, reference)
        ranks = non_dominated_ranks(values, spec.directions)
        hv = hypervolume(
            [v for v, r in zip(values, ranks, strict=True) if r == 1], reference, spec.directions
        )
        if hv != front.hypervolume:  # a dominated newcomer leaves it as it was
            self._store.set_hypervolume(spec.name, hv)
            front.hypervolume = hv

        snapshot = {trial_id for trial_id, _ in rows}
        counted = front.complete

        def load_trials() -> list[TrialRecord] | None:
            # The trials complete *now*, read later on the tracker's thread: a trial that
            # completes meanwhile is left to its own update (its child run may not exist
            # yet). By then this view may be old: another completion, here or on another
            # replica, has its own update with a newer view, which writes the front; this
            # one must not overwrite it (None).
            if self._store.count_complete(spec.name) != counted:
                return None
            complete = self._store.trials(spec.name, ["complete"])
            return ranked(spec, [t for t in complete if t.trial_id in snapshot])

        self._tracker.front_changed(spec, load_trials, hv, len(rows))
