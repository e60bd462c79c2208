"""The pipeline service: the use cases of teams (submit, read, approve, stop a pipeline)
and the loop that runs pipelines, one stage after another (the steps themselves are
server/pipeline_steps.py's).

Studies are created through the study service, owned by the pipeline's team, so workers
run a pipeline's trials like any others. Each study gets what is left of the pipeline's
device-hour budget as its own, which the trial service enforces; with nothing left the
pipeline stops. One pipeline advances at a time (a lock per pipeline, and on PostgreSQL a
database lock shared by server replicas). MLflow work (promotion, the pipeline's run) runs
on the loop's thread, never inside an RPC; a failure is logged and retried at the next pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stagetune.contract.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StagetuneError,
)
from stagetune.contract.pipeline import PipelineSpec, validate_pipeline
from stagetune.contract.pipeline_wire import pipeline_from_proto, pipeline_to_proto
from stagetune.server.pipeline_records import PipelineView
from stagetune.server.pipeline_steps import PipelineSteps
from stagetune.server.pipeline_store import PREFIX, PipelineStore
from stagetune.server.pipeline_tracking import PipelineTracker
from stagetune.server.selection import approvable
from stagetune.server.service import StudyService

__all__ = ["PipelineService"]

_log = logging.getLogger(__name__)


class PipelineService:
    """Use cases of teams over pipelines, and the loop (``start``/``close``) that runs them."""

    def __init__(
        self,
        studies: StudyService,
        tracker: PipelineTracker,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.studies = studies
        self.store = PipelineStore(studies.store)
        self.tracker = tracker
        self.interval = interval
        self.steps = PipelineSteps(studies, self.store, tracker, clock)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._wake = threading.Event()
        self._dirty: set[str] = set()  # changed by a call: the loop mirrors them to MLflow
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipelines", daemon=True)

    def _lock(self, name: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.RLock())

    # ------------------------------------------------------------ team use cases

    def submit(self, spec: PipelineSpec, team: str = "") -> tuple[PipelineView, bool]:
        """Create a pipeline and start its first stage; an equal one is returned as is."""
        spec = pipeline_from_proto(pipeline_to_proto(spec))
        validate_pipeline(spec)
        if not self.tracker.enabled:
            raise FailedPrecondition(
                "pipelines promote models through MLflow's Model Registry, and this server "
                "runs with tracking off (serve with --tracking-uri)"
            )
        if not self.store.exists(spec.name):
            for i in range(len(spec.stages)):
                for study in spec.study_names(i):
                    if self.studies.store.study_exists(study):
                        raise AlreadyExists(
                            f"study {study!r} already exists; stage {spec.stages[i].name} of "
                            f"pipeline {spec.name} needs that name: rename the pipeline"
                        )
        record, created = self.store.create(spec, team)
        if created:
            self._advance_quietly(spec.name, track=False)
            self._changed(spec.name)
        return self.view(spec.name), created

    def view(self, name: str) -> PipelineView:
        return self.steps.view(self.store.get(name))

    def list_pipelines(self) -> list[PipelineView]:
        return [self.steps.view(r) for r in self.store.all()]

    def owner(self, name: str) -> str | None:
        return self.store.owner(name)

    def approve(self, name: str, trial_id: int) -> PipelineView:
        """Promote ``trial_id`` of the stage that waits for a person's choice."""
        with self._lock(name):
            record = self.store.get(name)
            i = record.current
            stage = record.stages[i]
            if record.state != "awaiting_approval" or stage.phase != "awaiting_approval":
                state = record.state.replace("_", " ")
                raise FailedPrecondition(f"pipeline {name} waits for no approval (it is {state})")
            search = record.spec.study_names(i)[0]
            try:
                trial = self.studies.store.trial(trial_id)
            except NotFound:  # worded as for another study's trial: ids say nothing more
                raise InvalidArgument(
                    "trial_id", f"trial {trial_id} is not a trial of study {search}"
                ) from None
            approvable(search, trial)
            self.store.set_state(name, "running", i)
            self.steps.selected(record, i, trial.trial_id, dict(trial.params))
        self._changed(name)  # the loop promotes it: MLflow is never called inside an RPC
        return self.view(name)

    def stop(self, name: str) -> PipelineView:
        """No further stage starts; the current stage's study stops handing out trials."""
        with self._lock(name):
            record = self.store.get(name)
            if record.state in ("running", "awaiting_approval"):
                i = record.current
                stage = record.stages[i]
                self.store.set_state(name, "stopped", i, "stopped by a user")
                if stage.phase not in ("pending", "done", "failed"):
                    self.steps.save(record, i, phase="stopped", reason="the pipeline was stopped")
                for study in record.spec.study_names(i):
                    if self.studies.store.study_exists(study):
                        self.studies.stop_study(study)
        self._changed(name)
        return self.view(name)

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:
                _log.warning("pipeline pass failed", exc_info=True)
            self._wake.wait(self.interval)
            self._wake.clear()

    def run_once(self) -> None:
        """One pass: advance every running pipeline as far as it can go now, and mirror
        each one that moved (or that a call changed) into MLflow."""
        with self._locks_guard:
            dirty, self._dirty = self._dirty, set()
        for name in sorted({*self.store.names({"running"}), *dirty}):
            if self._stopping.is_set():
                return
            self._advance_quietly(name)

    def _changed(self, name: str) -> None:
        with self._locks_guard:
            self._dirty.add(name)
        self._wake.set()

    def _advance_quietly(self, name: str, track: bool = True) -> None:
        """Advance; a failure is logged and retried at the next pass. MLflow work (the
        pipeline's run) only on the loop's thread: ``track=False`` inside an RPC."""
        try:
            self.advance(name)
        except StagetuneError as e:
            _log.warning("pipeline %s: %s (retried at the next pass)", name, e.message)
        except Exception:
            _log.warning("pipeline %s could not advance (retried)", name, exc_info=True)
        if track:
            self._track(name)

    def advance(self, name: str) -> None:
        """Take every step pipeline ``name`` can take now (each one decided in the store
        before it acts); return when it waits on trials, a person, or is over."""
        with self._lock(name), self.studies.store.exclusive(PREFIX + name):
            for _ in range(4 * 8):  # a stage has at most 8 steps; the rest wait on trials
                record = self.store.get(name)
                if record.state != "running" or not self.steps.step(record):
                    return

    # ------------------------------------------------------------ the pipeline's MLflow run

    def _track(self, name: str) -> None:
        """Mirror the pipeline's status into its MLflow run (made on first use)."""
        if not self.tracker.enabled:
            return
        try:
            record = self.store.get(name)
            run_id = record.mlflow_run_id
            if not run_id:
                params = _run_params(record.spec)
                experiment_id, run_id = self.tracker.pipeline_run(name, params)
                self.store.set_tracking(name, experiment_id, run_id)
            self.tracker.log_status(run_id, self.steps.view(self.store.get(name)))
        except Exception:
            _log.warning("pipeline %s: MLflow status not logged", name, exc_info=True)


def _run_params(spec: PipelineSpec) -> dict[str, str]:
    params = {
        f"stage.{i}": f"{s.name}: {s.study.stage}, select {s.select.describe()}"
        + (f", final {s.final_steps} steps" if s.final_steps else "")
        for i, s in enumerate(spec.stages)
    }
    if spec.max_device_hours is not None:
        params["max_device_hours"] = f"{spec.max_device_hours:g}"
    return params
