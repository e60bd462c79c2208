"""The trials' half of the study store (``StudyStore`` is a ``TrialStore``): a trial's
record, the study-wide trial queries the service and the policy need, and every write to
a trial, each typed.

Split from server/storage.py by job, not by object: both halves share one Optuna
storage, one error policy and the per-process caches ``StudyStore`` sets up.
"""

from __future__ import annotations

import abc
import itertools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from stagetune.contract.errors import NotFound
from stagetune.contract.spec import ParamValue, StudySpec
from stagetune.server import attributes as at
from stagetune.server import optuna_rdb as rdb
from stagetune.server.database import storage_errors
from stagetune.server.records import (
    RequestAnswer,
    RungReport,
    TrialLease,
    TrialOutcome,
    TrialRecord,
    TrialStateName,
)

__all__ = ["TrialStore", "trial_state", "STATE_NAME"]

STATE_NAME: dict[TrialState, TrialStateName] = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "stopped",
    TrialState.FAIL: "failed",
}
_END_STATE = {
    "complete": TrialState.COMPLETE,
    "stopped": TrialState.PRUNED,
    "failed": TrialState.FAIL,
}


def _now() -> datetime:
    return datetime.now(UTC)


def trial_state(t: FrozenTrial) -> TrialStateName:
    """The trial's state name: an infeasible trial is COMPLETE, PRUNED or FAIL in Optuna,
    marked by an attribute."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and t.user_attrs.get(
        at.INFEASIBLE
    ):
        return "infeasible"
    return STATE_NAME[t.state]


@dataclass
class _RungReports:
    """One rung of one study as last read: its reports, the infeasible trials, and the
    highest attribute row id read; and, per set of metric names asked for, the reports
    that carry them all as one matrix, extended as reports arrive."""

    reports: dict[int, dict[str, float]] = field(default_factory=dict)  # in the order read
    excluded: set[int] = field(default_factory=set)
    last_row: int = 0
    matrices: dict[tuple[str, ...], _RungMatrix] = field(default_factory=dict)

    def add(self, rows: list[tuple[int, int, str, Any]]) -> None:
        for row, trial_id, key, value in rows:
            if key == at.INFEASIBLE:
                self.excluded.add(trial_id)
            else:
                if trial_id in self.reports:  # rewritten: the matrices are rebuilt
                    self.matrices.clear()
                self.reports[trial_id] = dict(value.get("metrics", {}))
            self.last_row = max(self.last_row, row)

    def rows(self) -> int:
        return len(self.reports) + len(self.excluded)

    def rivals(
        self, names: tuple[str, ...], without: int
    ) -> tuple[list[int], npt.NDArray[np.float64]]:
        """(trial ids, their ``names`` values as rows) of the feasible reports that carry
        every one of ``names``, trial ``without`` left out, in trial id order."""
        matrix = self.matrices.setdefault(names, _RungMatrix(len(names)))
        matrix.extend(self.reports, names)
        ids, values = matrix.ids, matrix.values
        keep = ids != without
        if self.excluded:
            keep &= ~np.isin(ids, np.fromiter(self.excluded, dtype=np.int64))
        ids, values = ids[keep], values[keep]
        order = np.argsort(ids, kind="stable")
        return ids[order].tolist(), values[order]


class _RungMatrix:
    """The reports of a rung that carry a given set of metrics, as arrays grown in place:
    a decision at 10,000 reports reads them without a Python loop over every report."""

    def __init__(self, width: int) -> None:
        self.consumed = 0  # how many of the rung's reports, in the order read, looked at
        self.ids = np.empty(0, dtype=np.int64)
        self.values = np.empty((0, width), dtype=np.float64)

    def extend(self, reports: dict[int, dict[str, float]], names: tuple[str, ...]) -> None:
        """Add the reports read since the last call (a dict keeps the order read)."""
        later = itertools.islice(reports, self.consumed, None)
        new = [i for i in later if all(n in reports[i] for n in names)]
        self.consumed = len(reports)
        if new:
            rows = np.array([[reports[i][n] for n in names] for i in new], dtype=np.float64)
            self.ids = np.concatenate([self.ids, np.array(new, dtype=np.int64)])
            self.values = np.concatenate([self.values, rows.reshape(len(new), len(names))])


class TrialStore(abc.ABC):
    """Trials of every study, read and written as records (see ``StudyStore``)."""

    optuna_storage: RDBStorage
    _trial_study: dict[int, str]  # study name by trial id: trials never move
    _rungs: dict[tuple[int, int], _RungReports]  # by (study id, step): rung_rivals' cache
    _rungs_lock: threading.Lock

    @abc.abstractmethod
    def _study_id(self, name: str) -> int:
        """The study's id; ``NotFound`` when there is no such study."""

    # ------------------------------------------------------------ trials: reads

    def _trial_record(self, study_name: str, t: FrozenTrial) -> TrialRecord:
        ua = t.user_attrs
        return TrialRecord(
            trial_id=rdb.trial_id(t),
            number=t.number,
            study_name=study_name,
            state=trial_state(t),
            params=dict(t.params),
            attempt=int(ua.get(at.ATTEMPT, 1)),
            metrics=dict(ua.get(at.METRICS, {})),
            values=tuple(t.values) if t.state == TrialState.COMPLETE and t.values else (),
            rungs=tuple(at.rung_records(ua)),
            worker_id=ua.get(at.WORKER, ""),
            start=t.datetime_start.astimezone(UTC) if t.datetime_start else None,
            end=t.datetime_complete.astimezone(UTC) if t.datetime_complete else None,
            lease_expires=at.timestamp(ua.get(at.LEASE)) if t.state == TrialState.RUNNING else None,
            reason=ua.get(at.REASON, ""),
            mlflow_run_id=ua.get(at.RUN_ID, ""),
        )

    @storage_errors
    def trials(
        self, study_name: str, states: Iterable[TrialStateName] | None = None
    ) -> list[TrialRecord]:
        wanted = set(states or ())
        # An infeasible trial is COMPLETE, PRUNED or FAIL in Optuna, marked by an attribute.
        names = wanted | ({"complete", "stopped", "failed"} if "infeasible" in wanted else set())
        optuna_states = tuple(s for s, n in STATE_NAME.items() if n in names) if wanted else None
        records = [
            self._trial_record(study_name, t) for t in self.optuna_trials(study_name, optuna_states)
        ]
        return [r for r in records if r.state in wanted] if wanted else records

    @storage_errors
    def optuna_trials(
        self, study_name: str, states: tuple[TrialState, ...] | None = None
    ) -> list[FrozenTrial]:
        """The study's trials as Optuna holds them (for the Optuna policy's samplers)."""
        study_id = self._study_id(study_name)
        return self.optuna_storage.get_all_trials(study_id, deepcopy=False, states=states)

    @storage_errors
    def trial(self, trial_id: int) -> TrialRecord:
        try:
            t = rdb.get_trial(self.optuna_storage, trial_id)
        except KeyError:
            raise NotFound(f"trial {trial_id} not found") from None
        return self._trial_record(str(t.user_attrs.get(at.STUDY, "")), t)

    @storage_errors
    def study_of(self, trial_id: int) -> str:
        """The name of the trial's study (trials never move: remembered once read)."""
        found = self._trial_study.get(trial_id)
        if found is None:
            value = rdb.trial_attr(self.optuna_storage, trial_id, at.STUDY)
            if value is None:
                raise NotFound(f"trial {trial_id} not found")
            found = str(value)
            if len(self._trial_study) > 100_000:
                self._trial_study.clear()
            self._trial_study[trial_id] = found
        return found

    @storage_errors
    def held_trial(self, name: str, worker_id: str) -> int | None:
        """The id of a running trial of the study that ``worker_id`` holds, if any."""
        return rdb.running_trial_with_attr(
            self.optuna_storage, self._study_id(name), at.WORKER, worker_id
        )

    @storage_errors
    def count_complete(self, name: str) -> int:
        """How many trials of the study are COMPLETE (feasible or not)."""
        return rdb.count_in_state(self.optuna_storage, self._study_id(name), TrialState.COMPLETE)

    @storage_errors
    def complete_values(self, name: str) -> list[tuple[int, tuple[float, ...]]]:
        """(trial id, objective values) of every COMPLETE trial that is not infeasible,
        read with two light queries (the Pareto front needs nothing else)."""
        study_id = self._study_id(name)
        values = rdb.complete_values(self.optuna_storage, study_id)
        excluded = rdb.trials_with_attr(self.optuna_storage, study_id, at.INFEASIBLE)
        return [(i, v) for i, v in sorted(values.items()) if i not in excluded]

    @storage_errors
    def rung_rivals(
        self, name: str, step: int, metrics: Sequence[str], without: int
    ) -> tuple[list[int], npt.NDArray[np.float64]]:
        """What MO-ASHA ranks a rung report against: (trial ids, values as rows) of the
        study's trials that reported every one of ``metrics`` at ``step``, infeasible
        ones and trial ``without`` excluded, in trial id order."""
        with self._rungs_lock:
            return self._rung(name, step).rivals(tuple(metrics), without)

    def _rung(self, name: str, step: int) -> _RungReports:
        """The rung as it stands, read incrementally (under ``_rungs_lock``): the rows
        added since the last read (by row id), then a count of them all; when the count
        disagrees (a row another writer committed out of id order), everything is read
        again. At 10,000 reports a decision reads a few rows and counts, instead of
        decoding every report."""
        keys = [at.rung_key(step), at.INFEASIBLE]
        storage, study = self.optuna_storage, self._study_id(name)
        seen = self._rungs.setdefault((study, step), _RungReports())
        seen.add(rdb.trial_attrs_after(storage, study, keys, seen.last_row))
        if rdb.count_trial_attrs(storage, study, keys) != seen.rows():
            seen = self._rungs[study, step] = _RungReports()
            seen.add(rdb.trial_attrs_after(storage, study, keys, 0))
        return seen

    @storage_errors
    def device_seconds(self, name: str, rung_steps: Iterable[int]) -> float:
        """The device-seconds the study's trials reported, summed (``attributes.
        device_seconds`` per trial), in one query: ``rung_steps`` are the study's rungs."""
        keys = [at.METRICS, *(at.rung_key(s) for s in rung_steps)]
        rows = rdb.trial_attrs_in_study(self.optuna_storage, self._study_id(name), keys)
        finals: dict[int, dict[str, Any]] = {}
        rungs: dict[int, list[dict[str, Any]]] = {}
        for trial_id, key, value in rows:
            if key == at.METRICS:
                finals[trial_id] = value
            else:
                rungs.setdefault(trial_id, []).append(value)
        return sum(at.device_seconds(finals.get(i), rungs.get(i, [])) for i in {*finals, *rungs})

    @storage_errors
    def request(self, trial_id: int, request_id: str) -> RequestAnswer | None:
        """What was recorded for this idempotency key of the trial, if anything."""
        value = rdb.trial_attr(self.optuna_storage, trial_id, at.REQUEST_PREFIX + request_id)
        return at.request_answer(request_id, value)

    # ------------------------------------------------------------ trials: writes

    @storage_errors
    def create_running_trial(
        self,
        spec: StudySpec,
        params: dict[str, ParamValue],
        lease: TrialLease,
        system_attrs: dict[str, Any] | None = None,
    ) -> TrialRecord:
        """Insert a RUNNING first attempt with these params, held under ``lease``, in one
        transaction (``system_attrs``: what a sampler noted when it proposed them)."""
        user_attrs = {at.STUDY: spec.name, at.ATTEMPT: 1, **at.lease_attrs(lease)}
        dists = at.distributions_of(spec)
        started = _now()
        trial_id, number = rdb.insert_running_trial(
            self.optuna_storage,
            self._study_id(spec.name),
            params,
            dists,
            user_attrs,
            system_attrs or {},
            started,
        )
        self._trial_study[trial_id] = spec.name
        return TrialRecord(
            trial_id=trial_id,
            number=number,
            study_name=spec.name,
            state="running",
            params=dict(params),
            attempt=1,
            worker_id=lease.worker_id,
            start=started,
            lease_expires=at.timestamp(lease.expires),
        )

    @storage_errors
    def hold_queued(self, trial_id: int, study_name: str, lease: TrialLease) -> TrialRecord:
        """A queued trial just started: record its holder (and, for a seed queued without
        them, its study and first attempt)."""
        existing = rdb.get_trial(self.optuna_storage, trial_id).user_attrs
        attrs: dict[str, Any] = {at.STUDY: study_name}
        if at.ATTEMPT not in existing:
            attrs[at.ATTEMPT] = 1
        rdb.set_trial_attrs(self.optuna_storage, trial_id, {**attrs, **at.lease_attrs(lease)})
        return self.trial(trial_id)

    @storage_errors
    def renew_lease(self, trial_id: int, expires: float) -> None:
        rdb.set_trial_attrs(self.optuna_storage, trial_id, {at.LEASE: expires})

    @storage_errors
    def record_report(
        self,
        trial_id: int,
        lease_expires: float,
        rung: RungReport | None,
        request: RequestAnswer | None,
    ) -> None:
        """A rung report's writes in one transaction: the renewed lease, the rung (None:
        already recorded) and the answer to the request. The rung's primary metric (the
        first objective's), when reported, is also the trial's Optuna intermediate value at
        that step (Optuna keeps one value per step), so optuna-dashboard shows the rungs;
        the whole report is the user attribute."""
        attrs: dict[str, Any] = {at.LEASE: lease_expires}
        intermediate = None
        if rung is not None:
            attrs[at.rung_key(rung.step)] = at.rung_value(rung.metrics, _now())
            if rung.primary in rung.metrics:
                intermediate = (rung.step, rung.metrics[rung.primary])
        if request is not None:
            attrs |= at.request_attrs(request)
        rdb.set_trial_attrs(self.optuna_storage, trial_id, attrs, intermediate)

    @storage_errors
    def record_request(self, trial_id: int, request: RequestAnswer) -> None:
        rdb.set_trial_attrs(self.optuna_storage, trial_id, at.request_attrs(request))

    @storage_errors
    def set_run_id(self, trial_id: int, run_id: str) -> bool:
        """Record the trial's MLflow run id, unless the trial already finished (Optuna
        freezes finished trials); returns whether it was written."""
        try:
            rdb.set_trial_attrs(self.optuna_storage, trial_id, {at.RUN_ID: run_id})
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    @storage_errors
    def finish_trial(self, trial_id: int, outcome: TrialOutcome) -> None:
        """End a running trial: its outcome, values and state in one transaction, so a
        crash leaves all of it or none."""
        rdb.finish_trial(
            self.optuna_storage,
            trial_id,
            _END_STATE[outcome.state],
            outcome.values if outcome.state == "complete" else (),
            at.outcome_attrs(outcome),
            _now(),
        )
