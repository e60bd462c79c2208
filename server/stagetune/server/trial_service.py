"""The trial service: the use cases of workers. Hand out a trial (the one a worker still
holds, a queued one, or a new configuration from the policy), take its rung reports and
answer continue or stop, renew its lease, complete or fail it, and reap the trials whose
lease ran out.

Every call that changes a trial runs under its study's lock (``StudyService.lock``) and
is idempotent: a repeated report, completion or failure with the same ``request_id``
gets the first answer and changes nothing, also after a server restart in between.

It runs past 400 lines on purpose: the six worker calls share the lock, lease and
idempotency rules, written here once rather than split across files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from stagetune.contract.errors import FailedPrecondition, InvalidArgument, NotFound
from stagetune.contract.names import FailureKindName
from stagetune.contract.redact import redact_text
from stagetune.contract.spec import StudySpec, check_bounded, check_count
from stagetune.contract.stages import CUSTOM
from stagetune.server.records import (
    RequestAnswer,
    RungReport,
    StudyHead,
    StudyRecord,
    TrialLease,
    TrialOutcome,
    TrialRecord,
)
from stagetune.server.service import StudyService
from stagetune.server.trial_events import AcquireOutcome, TrialEvents

__all__ = ["TrialService", "Acquired", "NoWork", "WorkerFit"]

_log = logging.getLogger(__name__)
_EPOCH = datetime.fromtimestamp(0, UTC)

_FAILURE_LABEL: dict[FailureKindName, str] = {
    "crash": "crashed",
    "out_of_memory": "out of memory",
    "interrupted": "interrupted",
}


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


@dataclass(frozen=True)
class WorkerFit:
    """What a worker says it can run (``WorkerCapabilities``): its GPUs and the names of
    the training scripts its operator allows (the ``custom`` stage)."""

    gpus: int = 0
    scripts: frozenset[str] = frozenset()

    def refusal(self, spec: StudySpec) -> str:
        """Why this worker cannot run a trial of ``spec`` ("" when it can). A trial runs
        one rank per GPU on a GPU worker, so ``runner.processes`` must fit its GPUs; a
        custom stage's script must be one the worker allows."""
        processes = spec.runner.get("processes")
        ranks = processes if isinstance(processes, int) and processes > 0 else 1
        if self.gpus and ranks > self.gpus:
            return f"a trial needs {ranks} GPUs; this worker has {self.gpus}"
        script = spec.runner.get("script")
        if spec.stage == CUSTOM.name and script not in self.scripts:
            allowed = ", ".join(sorted(self.scripts)) or "none"
            return f"a trial needs script {script!r}; this worker allows {allowed}"
        return ""


class TrialService:
    """Use cases of workers, over the study service's store, policy, fronts and locks."""

    def __init__(
        self,
        studies: StudyService,
        *,
        lease_seconds: float = 120.0,
        retry_after: float = 2.0,
        clock: Callable[[], float] = time.time,
        events: TrialEvents | None = None,
    ) -> None:
        self.store = studies.store
        self.policy = studies.policy
        self.tracker = studies.tracker
        self._fronts = studies.fronts
        self._lock = studies.lock
        self.lease_seconds = lease_seconds
        self.retry_after = retry_after
        self._clock = clock
        self.events = events or TrialEvents()  # what metrics count

    def _lease_until(self) -> float:
        return self._clock() + self.lease_seconds

    def _lease(self, worker_id: str) -> TrialLease:
        return TrialLease(worker_id, self._lease_until())

    def acquire(
        self,
        worker_id: str,
        study_name: str = "",
        among: Collection[str] | None = None,
        fit: WorkerFit | None = None,
    ) -> Acquired | NoWork:
        """Hand out a trial: the one this worker still holds, else a queued retry, else the
        next ready suggestion. Reads no trial table: two count queries and one insert.
        Without ``study_name``: from any running study, or only those named in ``among``.
        ``fit``: what the worker said it has (None: a worker that says nothing gets any
        trial); it never gets one it cannot run (``WorkerFit.refusal``)."""
        began = time.perf_counter()
        outcome: AcquireOutcome = "error"
        try:
            got = self._acquire(worker_id, study_name, among, fit)
            outcome = "trial" if isinstance(got, Acquired) else "no_work"
            return got
        finally:
            self.events.acquired(time.perf_counter() - began, outcome)

    def _acquire(
        self,
        worker_id: str,
        study_name: str,
        among: Collection[str] | None,
        fit: WorkerFit | None,
    ) -> Acquired | NoWork:
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
                self.store.renew_lease(held, self._lease_until())
                return self._acquired(head.spec, self.store.trial(held))
        # Fewest running trials first, so concurrent studies share the workers.
        by_load = heads
        if len(heads) > 1:
            running = {h.spec.name: self.store.counts(h.spec.name).running for h, _ in heads}
            by_load = sorted(heads, key=lambda hc: (running[hc[0].spec.name], hc[1]))
        why = ""
        for head, _ in by_load:
            name = head.spec.name
            if head.state != "running":
                why = head.state
                continue
            refusal = fit.refusal(head.spec) if fit is not None else ""
            if refusal:
                why = refusal
                continue
            with self._lock(name), self.store.exclusive(name):
                fresh = self.store.study_head(name)
                counts = self.store.counts(name)
                if fresh.state != "running":
                    why = fresh.state
                    continue
                if counts.waiting == 0 and counts.budget_used >= fresh.spec.budget.max_trials:
                    why = "done" if counts.running == 0 else "its budget is handed out"
                    continue
                # Device-hours as exactly as trials: what running trials reported counts,
                # and nothing (a queued retry neither) is handed out once it is spent.
                limit = fresh.spec.budget.max_device_seconds
                if limit is not None:
                    spent = self.store.device_seconds(name, fresh.spec.fidelity.rungs())
                    if spent >= limit:
                        why = "done" if counts.running == 0 else "its device budget is spent"
                        continue
                lease = self._lease(worker_id)
                trial = self.policy.ask(fresh.spec, lease, queued=counts.waiting > 0)
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
                self.store.set_run_id(trial_id, run_id)

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

    def _repeat(self, trial_id: int, request_id: str, payload: str) -> dict[str, Any] | None:
        """The first answer to this idempotency key, or None when it is new; the same key
        with a different payload is refused."""
        seen = self.store.request(trial_id, request_id)
        if seen is None:
            return None
        if seen.payload != payload:
            raise InvalidArgument("request_id", "was already used with a different payload")
        return seen.answer

    def _finish(self, spec: StudySpec, trial: TrialRecord, outcome: TrialOutcome) -> TrialRecord:
        """Store how the trial ended, tell the policy, and return the trial as stored."""
        self.store.finish_trial(trial.trial_id, outcome)
        self.policy.tell(spec, trial, outcome)
        return self.store.trial(trial.trial_id)

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
            # A repeated report of a step keeps the first metrics (the first answer counts).
            new_rung = not any(r.step == step for r in trial.rungs)
            violation = study.spec.violated(metrics)
            if study.state != "running" and study.state != "done":
                stop, reason = True, f"study {study.spec.name} was stopped"
            elif violation:  # hard constraints first, at any rung: no point going on
                stop, reason = True, f"infeasible at rung {step}: {violation}"
            else:  # against the other trials' reports: this one's need not be stored yet
                stop, reason = self.policy.decide(study.spec, trial, step, metrics)
            answer = {"stop": stop, "reason": reason, "infeasible": violation}
            # The lease, the rung and the answer in one transaction: at thousands of
            # reports the commits are the cost.
            self.store.record_report(
                trial_id,
                lease,
                RungReport(step, metrics, study.spec.objectives[0].metric) if new_rung else None,
                RequestAnswer(request_id, payload, answer) if request_id else None,
            )
            if new_rung:
                self.tracker.trial_progress(trial, step, metrics)
            if stop:
                self._stop(study, trial, reason, violation, step)
        self.events.rung_decided(stop)
        return stop, reason, datetime.fromtimestamp(lease, UTC)

    def _stop(
        self, study: StudyHead, trial: TrialRecord, reason: str, violation: str, step: int
    ) -> None:
        outcome = TrialOutcome("stopped", reason=reason, infeasible=violation)
        final = self._finish(study.spec, trial, outcome)
        self.tracker.trial_finished(study.spec, final, step)

    def heartbeat(self, trial_id: int, worker_id: str) -> tuple[datetime, bool]:
        with self._lock(self.store.study_of(trial_id)):
            study, trial = self._held(trial_id, worker_id)
            lease = self._lease_until()
            self.store.renew_lease(trial_id, lease)
        return datetime.fromtimestamp(lease, UTC), study.state == "stopped"

    def complete(
        self, trial_id: int, worker_id: str, metrics: dict[str, float], request_id: str = ""
    ) -> TrialRecord:
        """Record the final metrics. Repeating the same call returns the same trial."""
        began = time.perf_counter()
        try:
            return self._complete(trial_id, worker_id, metrics, request_id)
        finally:
            self.events.completed(time.perf_counter() - began)

    def _complete(
        self, trial_id: int, worker_id: str, metrics: dict[str, float], request_id: str
    ) -> TrialRecord:
        _finite_metrics(metrics)
        _check_request_id(request_id)
        payload = _fingerprint({"worker": worker_id, "metrics": metrics})
        with self._lock(self.store.study_of(trial_id)):
            trial = self.store.trial(trial_id)
            repeated = bool(request_id) and self._repeat(trial_id, request_id, payload) is not None
            if repeated and trial.state != "running":
                self._fronts.refresh(trial)
                return trial
            # (repeated and still running: the server died half-way through; finish it now.)
            if trial.state == "complete" and trial.worker_id == worker_id:
                if trial.metrics == metrics:
                    self._fronts.refresh(trial)
                    return trial  # a retry of a call that already took effect
                raise FailedPrecondition(f"trial {trial_id} already completed with other metrics")
            study, trial = self._held(trial_id, worker_id, trial)
            spec = study.spec
            missing = [m for m in spec.metric_names if m not in metrics]
            if missing:
                raise InvalidArgument(f"metrics.{missing[0]}", "objective metric missing")
            values = tuple(metrics[m] for m in spec.metric_names)
            # Measured only at the end (e.g. decode latency): an infeasible one is off the front.
            violation = spec.violated(metrics)
            outcome = TrialOutcome(
                "complete",
                values=values,
                metrics=metrics,
                reason=f"infeasible at the full budget: {violation}" if violation else "",
                infeasible=violation,
                request=RequestAnswer(request_id, payload, {}) if request_id else None,
            )
            trial = self._finish(spec, trial, outcome)  # as stored: a repeat returns the same
            self.tracker.trial_finished(spec, trial, spec.fidelity.max_steps)
            self._fronts.completed(study, trial_id, None if violation else values)
        return trial

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
            return self._fail_locked(
                study,
                trial,
                f"{_FAILURE_LABEL[kind]}: {reason}".strip(),
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
        outcome = TrialOutcome(
            "failed",
            reason=redact_text(reason)[:8000],
            infeasible="out of memory" if infeasible else "",
            request=RequestAnswer(*request, {"requeued": requeued}) if request else None,
        )
        final = self._finish(spec, trial, outcome)
        if requeued:
            self.policy.enqueue(spec, trial.params, attempt=trial.attempt + 1)
            self.events.requeued()
        self.tracker.trial_finished(spec, final, spec.fidelity.max_steps)
        return final, requeued

    def reap_expired(self) -> list[int]:
        """Fail every running trial whose lease ran out and requeue its params (within
        the study's retry limit). Returns the ids of the reaped trials."""
        now = self._clock()
        reaped: list[int] = []
        # Heads, not records: a record counts every trial, and this runs every few seconds.
        for head, _ in self.store.study_heads():
            name = head.spec.name
            for t in self.store.trials(name, ["running"]):
                if t.lease_expires is None or t.lease_expires.timestamp() > now:
                    continue
                with self._lock(name):
                    current = self.store.trial(t.trial_id)
                    if current.state != "running" or (
                        current.lease_expires and current.lease_expires.timestamp() > now
                    ):
                        continue
                    study = self.store.study_head(name)
                    silent = f"lease expired: worker {current.worker_id!r} went silent"
                    self._fail_locked(study, current, silent, requeue=True)
                    reaped.append(t.trial_id)
                    self.events.lease_expired()
                    _log.warning("reaped trial %d of %s (%s)", t.trial_id, study.spec.name, silent)
        return reaped
