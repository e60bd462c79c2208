"""The study service: one method per use case, per-study locks, idempotent completion.

Sits between the servicer (wire) and the policy/storage/tracking layers; never sees a
proto and never imports Optuna or MLflow. Every state change goes to the store first; the
tracker is told afterwards and its failures never reach the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from stagetune.contract.errors import FailedPrecondition, InvalidArgument, NotFound
from stagetune.contract.redact import redact_text
from stagetune.contract.spec import ParamValue, StudySpec, check_bounded, check_count, validate_spec
from stagetune.objectives.pareto import (
    default_reference,
    hypervolume,
    knee_point,
    non_dominated_ranks,
)
from stagetune.server import storage as st
from stagetune.server.policy import OptunaPolicy
from stagetune.server.records import StudyHead, StudyRecord, TrialRecord, TrialStateName
from stagetune.server.storage import StudyStore
from stagetune.server.tracking import NullTracker, Tracker
from stagetune.server.warmstart import dedupe, fit_to_space, stage_defaults

__all__ = ["StudyService", "Acquired", "NoWork", "ParetoView", "FailureKindName"]

_log = logging.getLogger(__name__)
_EPOCH = datetime.fromtimestamp(0, UTC)

FailureKindName = Literal["crash", "out_of_memory", "interrupted"]


@dataclass(frozen=True)
class Acquired:
    trial: TrialRecord
    spec: StudySpec
    rung_steps: list[int]
    lease_seconds: float


@dataclass(frozen=True)
class NoWork:
    retry_after: float
    reason: str


@dataclass(frozen=True)
class ParetoView:
    spec: StudySpec
    front: list[TrialRecord]
    hypervolume: float
    knee_trial_id: int


def _fingerprint(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_request_id(request_id: str) -> None:
    if len(request_id) > 128:
        raise InvalidArgument("request_id", "must be at most 128 characters")


MAX_METRICS = 256  # per report: names are stored with every trial


def _finite_metrics(metrics: dict[str, float], where: str = "metrics") -> None:
    check_count(len(metrics), MAX_METRICS, where)
    for key, value in metrics.items():
        if not key or len(key) > 128:
            raise InvalidArgument(where, "metric names must be 1 to 128 characters")
        check_bounded(value, f"{where}.{key}")


@dataclass
class _FrontCache:
    """A study's feasible COMPLETE objective values as this process last knew them."""

    complete: int  # COMPLETE trials (feasible or not) the cache accounts for
    values: dict[int, tuple[float, ...]]  # by trial id, feasible ones only
    hypervolume: float | None = None  # as this process last stored it


class StudyService:
    """Use cases of teams (studies) and workers (trials)."""

    def __init__(
        self,
        store: StudyStore,
        policy: OptunaPolicy,
        tracker: Tracker | None = None,
        *,
        lease_seconds: float = 120.0,
        retry_after: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy
        self.tracker: Tracker = tracker or NullTracker()
        self.lease_seconds = lease_seconds
        self.retry_after = retry_after
        self._clock = clock
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._fronts: dict[str, _FrontCache] = {}  # by study name, read under its lock

    def close(self) -> None:
        """Stop background work (the suggestion pool); called once the server drained."""
        self.policy.close()

    def _lock(self, study_name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(study_name, threading.RLock())

    def _lease_until(self) -> float:
        return self._clock() + self.lease_seconds

    # ------------------------------------------------------------ studies

    def create_study(
        self, spec: StudySpec, attrs: dict[str, Any] | None = None
    ) -> tuple[StudyRecord, bool]:
        """Create a study (``attrs``: stored with it, e.g. its owning team)."""
        validate_spec(spec)  # raises before anything is written
        seeds = self._warm_start_seeds(spec)  # so do unknown or mismatched source studies
        record, created = self.store.create_study(spec, attrs)
        if created and seeds:
            with self._lock(spec.name):
                for source, params in seeds:
                    self.policy.seed(spec, params, source)
            record = self.store.get_study(spec.name)
        if created or not record.mlflow_run_id:
            experiment_id, run_id = self.tracker.study_created(spec)
            if run_id:
                self.store.set_study_tracking(spec.name, experiment_id, run_id)
                record = dataclasses.replace(
                    record, mlflow_experiment_id=experiment_id, mlflow_run_id=run_id
                )
        return record, created

    def _warm_start_seeds(self, spec: StudySpec) -> list[tuple[str, dict[str, ParamValue]]]:
        """Seeds for a new study, checked before it is created: defaults first, then each
        source study's Pareto set, cut to this search space, at most max_trials."""
        seeds: list[tuple[str, dict[str, ParamValue]]] = []
        if spec.warm_start.defaults:
            for params in stage_defaults(spec.stage):
                seeds.append((f"defaults:{spec.stage}", fit_to_space(spec, params)))
        for i, name in enumerate(spec.warm_start.studies):
            where = f"warm_start.studies[{i}]"
            try:
                source = self.store.get_study(name)
            except NotFound:
                raise InvalidArgument(where, f"no study named {name!r}") from None
            if source.spec.stage != spec.stage:
                raise InvalidArgument(
                    where, f"{name!r} tunes stage {source.spec.stage}, not {spec.stage}"
                )
            ranked = self._ranked(source.spec, self.store.trials(name, ["complete"]))
            for t in ranked:
                if t.pareto_rank == 1:
                    seeds.append((f"study:{name}#{t.number}", fit_to_space(spec, t.params)))
        return dedupe(seeds)[: spec.budget.max_trials]

    def get_study(self, name: str) -> StudyRecord:
        return self.store.get_study(name)

    def list_studies(self) -> list[StudyRecord]:
        return self.store.list_studies()

    def stop_study(self, name: str) -> StudyRecord:
        with self._lock(name):
            record = self.store.get_study(name)
            if record.state == "running":
                self.store.set_study_state(name, "stopped")
            return self.store.get_study(name)

    def list_trials(
        self, name: str, states: Iterable[TrialStateName] | None = None
    ) -> list[TrialRecord]:
        spec = self.store.get_study(name).spec
        trials = self.store.trials(name)
        ranked = self._ranked(spec, trials)
        wanted = set(states or ())
        return [t for t in ranked if not wanted or t.state in wanted]

    def _ranked(self, spec: StudySpec, trials: list[TrialRecord]) -> list[TrialRecord]:
        complete = [t for t in trials if t.state == "complete" and t.values]
        if not complete:
            return trials
        ranks = non_dominated_ranks([t.values for t in complete], spec.directions)
        rank_of = {t.trial_id: r for t, r in zip(complete, ranks, strict=True)}
        return [dataclasses.replace(t, pareto_rank=rank_of.get(t.trial_id, 0)) for t in trials]

    def pareto_front(self, name: str) -> ParetoView:
        record = self.store.get_study(name)
        ranked = self._ranked(record.spec, self.store.trials(name, ["complete"]))
        front = sorted((t for t in ranked if t.pareto_rank == 1), key=lambda t: t.values)
        knee = 0
        if front:
            knee = front[knee_point([t.values for t in front], record.spec.directions)].trial_id
        return ParetoView(record.spec, front, record.hypervolume, knee)

    # ------------------------------------------------------------ workers

    def acquire(
        self, worker_id: str, study_name: str = "", among: Collection[str] | None = None
    ) -> Acquired | NoWork:
        """Hand out a trial: the one this worker still holds, else a queued retry, else the
        next ready suggestion. Reads no trial table: two count queries and one insert.
        Without ``study_name``: from any running study, or only those named in ``among``."""
        if not worker_id:
            raise InvalidArgument("worker_id", "is required")
        if study_name:
            heads = [(self.store.study_head(study_name), _EPOCH)]
        else:
            heads = [
                (h, c)
                for h, c in self.store.study_heads()
                if h.state == "running" and (among is None or h.spec.name in among)
            ]
        # A worker that asks again while it still holds a trial gets that trial back.
        for head, _ in heads:
            held = self.store.held_trial(head.spec.name, worker_id)
            if held is not None:
                self.store.set_trial_attrs(held, {st.LEASE: self._lease_until()})
                return self._acquired(head.spec, self.store.trial(held))
        # Fewest running trials first, so concurrent studies share the workers.
        ranked = heads
        if len(heads) > 1:
            running = {h.spec.name: self.store.counts(h.spec.name).running for h, _ in heads}
            ranked = sorted(heads, key=lambda hc: (running[hc[0].spec.name], hc[1]))
        why = ""
        for head, _ in ranked:
            name = head.spec.name
            if head.state != "running":
                why = head.state
                continue
            with self._lock(name), self.store.exclusive(name):
                fresh = self.store.study_head(name)
                counts = self.store.counts(name)
                if fresh.state != "running":
                    why = fresh.state
                    continue
                if counts.waiting == 0 and not self.policy.can_ask_new(
                    fresh.spec, counts.budget_used
                ):
                    why = "done" if counts.running == 0 else "its budget is handed out"
                    continue
                attrs = {st.WORKER: worker_id, st.LEASE: self._lease_until()}
                trial = self.policy.ask(fresh.spec, attrs, queued=counts.waiting > 0)
            self.tracker.trial_started(
                fresh.spec, trial, functools.partial(self._record_run_id, trial.trial_id)
            )
            return self._acquired(fresh.spec, trial)
        if study_name:
            reason = f"study {study_name!r} has no trial to hand out ({why})"
        else:
            reason = "no running study has a trial to hand out"
        return NoWork(self.retry_after, reason)

    def _record_run_id(self, trial_id: int, run_id: str) -> None:
        # Runs on the tracker thread once MLflow has made the run; the acquire did not wait.
        # A trial that finished first keeps no run id: its run is found by its
        # stagetune.trial_id tag. Under the study's lock: a completion under way finishes
        # first, so its answer (and any retry's) never gains a run id half-way.
        if run_id:
            with self._lock(self.store.study_of(trial_id)):
                self.store.annotate_trial(trial_id, {st.RUN_ID: run_id})

    def _acquired(self, spec: StudySpec, trial: TrialRecord) -> Acquired:
        return Acquired(trial, spec, spec.fidelity.rungs(), self.lease_seconds)

    def _held(
        self, trial_id: int, worker_id: str, trial: TrialRecord | None = None
    ) -> tuple[StudyHead, TrialRecord]:
        """The trial and its study, if ``worker_id`` holds it and it is still running
        (``trial``: the trial as just read under the study's lock, if it was)."""
        if not worker_id:
            raise InvalidArgument("worker_id", "is required")
        if trial is None:
            trial = self.store.trial(trial_id)
        if not trial.study_name:
            raise NotFound(f"trial {trial_id} not found")
        study = self.store.study_head(trial.study_name)
        if trial.state != "running":
            raise FailedPrecondition(f"trial {trial_id} is {trial.state}, not running")
        if trial.worker_id != worker_id:
            raise FailedPrecondition(f"trial {trial_id} is held by another worker")
        return study, trial

    def _repeat(self, trial_id: int, request_id: str, payload: str) -> dict[str, object] | None:
        """The first answer to this idempotency key, or None when it is new; the same key
        with a different payload is refused."""
        seen = self.store.request(trial_id, request_id)
        if seen is None:
            return None
        if seen.get("payload") != payload:
            raise InvalidArgument("request_id", "was already used with a different payload")
        answer = seen.get("answer")
        return dict(answer) if isinstance(answer, dict) else {}

    def report_progress(
        self,
        trial_id: int,
        worker_id: str,
        step: int,
        metrics: dict[str, float],
        request_id: str = "",
    ) -> tuple[bool, str, datetime]:
        """Record a rung report; returns (stop?, reason, lease expiry)."""
        if step <= 0:
            raise InvalidArgument("step", "must be > 0")
        _finite_metrics(metrics)
        _check_request_id(request_id)
        payload = _fingerprint({"worker": worker_id, "step": step, "metrics": metrics})
        with self._lock(self.store.study_of(trial_id)):
            if request_id:
                first = self._repeat(trial_id, request_id, payload)
                if first is not None:  # a retry: the first answer, nothing changes
                    current = self.store.trial(trial_id)
                    if first.get("stop") and current.state == "running":
                        # The server died between answering STOP and recording it.
                        head = self.store.study_head(current.study_name)
                        infeasible = str(first.get("infeasible", ""))
                        self._stop(head, current, str(first["reason"]), infeasible, step)
                    lease_at = current.lease_expires or datetime.now(UTC)
                    return bool(first["stop"]), str(first["reason"]), lease_at
            study, trial = self._held(trial_id, worker_id)
            lease = self._lease_until()
            self.store.set_trial_attrs(trial_id, {st.LEASE: lease})
            # A repeated report of a step keeps the first metrics (the first answer counts).
            if not any(r.step == step for r in trial.rungs):
                self.store.record_rung(trial_id, step, metrics)
                self.tracker.trial_progress(trial, step, metrics)
            violation = study.spec.violated(metrics)
            if study.state != "running" and study.state != "done":
                stop, reason = True, f"study {study.spec.name} was stopped"
            elif violation:  # hard constraints first, at any rung: no point going on
                stop, reason = True, f"infeasible at rung {step}: {violation}"
            else:
                stop, reason = self.policy.decide(study.spec, trial, step, metrics)
            if request_id:
                answer = {"stop": stop, "reason": reason, "infeasible": violation}
                key = st.REQUEST_PREFIX + request_id
                self.store.set_trial_attrs(trial_id, {key: {"payload": payload, "answer": answer}})
            if stop:
                self._stop(study, trial, reason, violation, step)
        return stop, reason, datetime.fromtimestamp(lease, UTC)

    def _stop(
        self, study: StudyHead, trial: TrialRecord, reason: str, violation: str, step: int
    ) -> None:
        attrs: dict[str, object] = {st.REASON: reason}
        if violation:
            attrs[st.INFEASIBLE] = violation
        self.policy.tell_stopped(study.spec, trial, attrs)
        final = self.store.trial(trial.trial_id)
        self.tracker.trial_finished(study.spec, final, step)

    def heartbeat(self, trial_id: int, worker_id: str) -> tuple[datetime, bool]:
        with self._lock(self.store.study_of(trial_id)):
            study, trial = self._held(trial_id, worker_id)
            lease = self._lease_until()
            self.store.set_trial_attrs(trial_id, {st.LEASE: lease})
        return datetime.fromtimestamp(lease, UTC), study.state == "stopped"

    def complete(
        self, trial_id: int, worker_id: str, metrics: dict[str, float], request_id: str = ""
    ) -> TrialRecord:
        """Record the final metrics. Repeating the same call returns the same trial."""
        _finite_metrics(metrics)
        _check_request_id(request_id)
        payload = _fingerprint({"worker": worker_id, "metrics": metrics})
        with self._lock(self.store.study_of(trial_id)):
            trial = self.store.trial(trial_id)
            repeated = bool(request_id) and self._repeat(trial_id, request_id, payload) is not None
            if repeated and trial.state != "running":
                self._refresh_front(trial)
                return trial
            # (repeated and still running: the server died half-way through; finish it now.)
            if trial.state == "complete" and trial.worker_id == worker_id:
                if trial.metrics == metrics:
                    self._refresh_front(trial)
                    return trial  # a retry of a call that already took effect
                raise FailedPrecondition(f"trial {trial_id} already completed with other metrics")
            study, trial = self._held(trial_id, worker_id, trial)
            spec = study.spec
            missing = [m for m in spec.metric_names if m not in metrics]
            if missing:
                raise InvalidArgument(f"metrics.{missing[0]}", "objective metric missing")
            values = [metrics[m] for m in spec.metric_names]
            attrs: dict[str, object] = {st.METRICS: metrics}
            if request_id:
                attrs[st.REQUEST_PREFIX + request_id] = {"payload": payload, "answer": {}}
            violation = spec.violated(metrics)
            if violation:  # measured only at the end (e.g. decode latency): off the front
                attrs[st.INFEASIBLE] = violation
                attrs[st.REASON] = f"infeasible at the full budget: {violation}"
            self.policy.tell_complete(spec, trial, values, attrs)
            trial = self.store.trial(trial_id)  # as stored: a repeated call returns the same
            self.tracker.trial_finished(spec, trial, spec.fidelity.max_steps)
            self._update_front(study, trial_id, None if violation else tuple(values))
        return trial

    def _refresh_front(self, trial: TrialRecord) -> None:
        """A retried completion: the first call may have failed after storing the result
        but before the front was updated. Read the front again (only retries pay)."""
        if trial.state in ("complete", "infeasible"):
            self._fronts.pop(trial.study_name, None)
            self._update_front(self.store.study_head(trial.study_name), trial.trial_id, None)

    def _front(self, name: str, trial_id: int, values: tuple[float, ...] | None) -> _FrontCache:
        """The study's feasible COMPLETE values, just after trial ``trial_id`` completed
        with ``values`` (None: infeasible). Called under the study's lock, once per
        completion: when the database holds exactly one COMPLETE trial more than the
        cache accounts for, that is this one and it is added; otherwise (first use, a
        restart, another replica's completions) the values are read again."""
        complete = self.store.count_complete(name)  # before the values: never undercount
        front = self._fronts.get(name)
        if front is not None and front.complete + 1 == complete:
            front.complete = complete
            if values is not None:
                front.values[trial_id] = values
            return front
        front = _FrontCache(complete, dict(self.store.complete_values(name)))
        self._fronts[name] = front
        return front

    def _update_front(
        self, study: StudyHead, trial_id: int, completed: tuple[float, ...] | None
    ) -> None:
        """Hypervolume of the study's front after a completion, from the objective values
        alone; the tracker reads the full trials itself, only if it needs them."""
        spec = study.spec
        # Replicas sharing PostgreSQL update the front one at a time: the last to write
        # has counted every completion committed before it.
        with self.store.exclusive(spec.name):
            self._write_front(study, self._front(spec.name, trial_id, completed))

    def _write_front(self, study: StudyHead, front: _FrontCache) -> None:
        spec = study.spec
        if not front.values:
            return
        rows = sorted(front.values.items())
        values = [v for _, v in rows]
        # Frozen once set; if not set when the caller read it, another replica may have.
        reference = study.reference or self.store.study_head(spec.name).reference
        if reference is not None and not all(map(math.isfinite, reference)):
            reference = None  # stored before values were bounded: derive a usable one
        if reference is None:
            derived = default_reference(values[0], spec.directions)
            reference = tuple(
                o.reference if o.reference is not None else d
                for o, d in zip(spec.objectives, derived, strict=True)
            )
            self.store.set_reference(spec.name, reference)
        ranks = non_dominated_ranks(values, spec.directions)
        hv = hypervolume(
            [v for v, r in zip(values, ranks, strict=True) if r == 1], reference, spec.directions
        )
        if hv != front.hypervolume:  # a dominated newcomer leaves it as it was
            self.store.set_hypervolume(spec.name, hv)
            front.hypervolume = hv

        snapshot = {trial_id for trial_id, _ in rows}

        def load_trials() -> list[TrialRecord]:
            # The trials complete *now*, read later on the tracker's thread: a trial that
            # completes meanwhile is left to its own update (its child run may not exist yet).
            complete = self.store.trials(spec.name, ["complete"])
            return self._ranked(spec, [t for t in complete if t.trial_id in snapshot])

        self.tracker.front_changed(spec, load_trials, hv, len(rows))

    def fail(
        self,
        trial_id: int,
        worker_id: str,
        kind: FailureKindName,
        reason: str,
        request_id: str = "",
    ) -> tuple[TrialRecord, bool]:
        """Fail an attempt. An interruption queues the same params again (within retries)."""
        _check_request_id(request_id)
        payload = _fingerprint({"worker": worker_id, "kind": kind, "reason": reason})
        with self._lock(self.store.study_of(trial_id)):
            trial = self.store.trial(trial_id)
            if request_id:
                first = self._repeat(trial_id, request_id, payload)
                if first is not None and trial.state != "running":
                    return trial, bool(first.get("requeued", False))
            if trial.state == "failed" and trial.worker_id == worker_id:
                return trial, False  # a retry of a call that already took effect
            study, trial = self._held(trial_id, worker_id, trial)
            label = {
                "crash": "crashed",
                "out_of_memory": "out of memory",
                "interrupted": "interrupted",
            }
            return self._fail_locked(
                study,
                trial,
                f"{label[kind]}: {reason}".strip(),
                requeue=kind == "interrupted",
                infeasible=kind == "out_of_memory",
                request=(request_id, payload) if request_id else None,
            )

    def _fail_locked(
        self,
        study: StudyHead | StudyRecord,
        trial: TrialRecord,
        reason: str,
        *,
        requeue: bool,
        infeasible: bool = False,
        request: tuple[str, str] | None = None,
    ) -> tuple[TrialRecord, bool]:
        """Fail an attempt. Out of memory is a fact about the params, not bad luck: the
        trial is marked infeasible and never retried. ``request``: (idempotency key,
        payload fingerprint) to record with the answer."""
        spec = study.spec
        requeued = requeue and study.state == "running" and trial.attempt <= spec.budget.max_retries
        attrs: dict[str, object] = {st.REASON: redact_text(reason)[:8000]}
        if infeasible:
            attrs[st.INFEASIBLE] = "out of memory"
        if request is not None:
            key, payload = request
            attrs[st.REQUEST_PREFIX + key] = {"payload": payload, "answer": {"requeued": requeued}}
        self.policy.tell_failed(spec, trial, attrs)
        if requeued:
            self.policy.requeue(spec, trial.params, trial.attempt + 1)
        final = self.store.trial(trial.trial_id)
        self.tracker.trial_finished(spec, final, spec.fidelity.max_steps)
        return final, requeued

    def reap_expired(self) -> list[int]:
        """Fail every running trial whose lease ran out and requeue its params (within
        the study's retry limit). Returns the ids of the reaped trials."""
        now = self._clock()
        reaped: list[int] = []
        for study in self.store.list_studies():
            for t in self.store.trials(study.spec.name, ["running"]):
                if t.lease_expires is None or t.lease_expires.timestamp() > now:
                    continue
                with self._lock(study.spec.name):
                    current = self.store.trial(t.trial_id)
                    if current.state != "running" or (
                        current.lease_expires and current.lease_expires.timestamp() > now
                    ):
                        continue
                    silent = f"lease expired: worker {current.worker_id!r} went silent"
                    self._fail_locked(study, current, silent, requeue=True)
                    reaped.append(t.trial_id)
                    _log.warning("reaped trial %d of %s (%s)", t.trial_id, study.spec.name, silent)
        return reaped
