"""The pipeline service: the use cases of teams (submit, read, approve, stop a pipeline)
and the loop that runs pipelines, one stage after another.

A stage moves through phases, each decided in the store before it acts (so a restarted
server redoes at most the one action it was in, and every action is idempotent):

``pending`` -> ``searching`` (its search study runs) -> [``awaiting_approval``] ->
[``retraining``: one trial of the winner at ``final.steps``] -> ``promoting`` (the model
is registered in MLflow's Model Registry with its lineage) -> ``evaluating`` (one trial
scores the promoted model on the test split) -> ``done``, and the next stage starts from
``models:/<pipeline>.<stage>/<version>``.

Studies are created through the study service, owned by the pipeline's team, so workers
run a pipeline's trials like any others. Each study gets what is left of the pipeline's
device-hour budget as its own, which the trial service enforces; with nothing left the
pipeline stops. MLflow work runs on the loop's thread, never inside an RPC; a failure is
logged and retried at the next pass.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from stagetune.contract.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    StagetuneError,
)
from stagetune.contract.pipeline import (
    PipelineSpec,
    evaluation_study,
    final_study,
    search_study,
    validate_pipeline,
)
from stagetune.contract.pipeline_wire import pipeline_from_proto, pipeline_to_proto
from stagetune.contract.spec import StudySpec, spec_from_proto, spec_to_proto
from stagetune.server.pipeline_records import (
    PipelineRecord,
    PipelineView,
)
from stagetune.server.pipeline_store import PREFIX, PipelineStore
from stagetune.server.pipeline_tracking import PipelineTracker
from stagetune.server.records import StudyRecord
from stagetune.server.selection import approvable, select_trial
from stagetune.server.service import StudyService

__all__ = ["PipelineService"]

_log = logging.getLogger(__name__)
#: How long a promoted trial's model may take to show in MLflow after the trial ended.
MODEL_GRACE_SECONDS = 120.0


def _as_stored(spec: StudySpec) -> StudySpec:
    # What the store gives back for a spec (the runner struct round-trips through JSON),
    # so re-creating a derived study after a restart finds it equal.
    return spec_from_proto(spec_to_proto(spec))


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
        self._clock = clock
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
        return self._view(self.store.get(name))

    def list_pipelines(self) -> list[PipelineView]:
        return [self._view(r) for r in self.store.all()]

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
            trial = self.studies.store.trial(trial_id)
            approvable(search, trial)
            self.store.set_state(name, "running", i)
            self._selected(record, i, trial.trial_id, dict(trial.params))
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
                    self._save(record, i, phase="stopped", reason="the pipeline was stopped")
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
                if record.state != "running" or not self._step(record):
                    return

    # ------------------------------------------------------------ steps

    def _step(self, r: PipelineRecord) -> bool:
        """One step of the current stage; False when it must wait."""
        i = r.current
        stage = r.stages[i]
        spec = r.spec.stages[i]
        search, final, test = r.spec.study_names(i)
        if stage.phase == "pending":
            hours = self._hours_left(r)
            if hours is not None and hours <= 0:
                return self._out_of_budget(r)
            if spec.model_from_previous:
                base: dict[str, Any] = {"name_or_path": r.model_uri(i - 1)}
            else:
                base = dict(spec.study.runner.get("model") or {})
            self._save(r, i, phase="searching", base_model=base, search_hours=hours)
            return True
        if stage.phase == "searching":
            study = self._study(r, search_study(r.spec, i, stage.base_model, stage.search_hours))
            if study is None or not _finished(study):
                return False
            if spec.select.rule == "manual":
                self._save(r, i, phase="awaiting_approval")
                self.store.set_state(r.name, "awaiting_approval", i)
                return True
            trials = self.studies.store.trials(search)
            chosen, why = select_trial(study.spec, trials, spec.select)
            if chosen is None:
                return self._fail(r, f"{search}: nothing to select ({why}){_spent(study)}")
            _log.info(
                "pipeline %s stage %s: trial %d (%s)", r.name, spec.name, chosen.trial_id, why
            )
            self._selected(r, i, chosen.trial_id, dict(chosen.params))
            return True
        if stage.phase == "retraining":
            made = final_study(
                r.spec, i, stage.base_model, stage.selected_params, stage.final_hours
            )
            study = self._study(r, made)
            if study is None or not _finished(study):
                return False
            done = [t for t in self.studies.store.trials(final) if t.state == "complete"]
            if not done:
                last = self.studies.store.trials(final)
                why = last[-1].reason.splitlines()[0] if last and last[-1].reason else "no trial"
                return self._fail(
                    r, f"{final}: the retrain did not complete ({why}){_spent(study)}"
                )
            self._save(r, i, phase="promoting", model_trial=done[0].trial_id)
            return True
        if stage.phase == "promoting":
            return self._promote(r, i)
        if stage.phase == "evaluating":
            made = evaluation_study(
                r.spec,
                i,
                r.model_uri(i),
                stage.base_model,
                stage.selected_params,
                stage.test_hours,
            )
            study = self._study(r, made)
            if study is None or not _finished(study):
                return False
            done = [t for t in self.studies.store.trials(test) if t.metrics]
            complete = [t for t in done if t.state in ("complete", "infeasible")]
            if not complete:
                last = self.studies.store.trials(test)
                why = last[-1].reason.splitlines()[0] if last and last[-1].reason else "no trial"
                return self._fail(r, f"{test}: the test evaluation failed ({why}){_spent(study)}")
            self._save(r, i, phase="done", test_metrics=dict(complete[0].metrics))
            if i + 1 < len(r.spec.stages):
                self.store.set_state(r.name, "running", i + 1)
            else:
                self.store.set_state(r.name, "done", i)
            return True
        return False  # awaiting approval, or over

    def _selected(self, r: PipelineRecord, i: int, trial_id: int, params: dict[str, Any]) -> None:
        spec = r.spec.stages[i]
        if spec.final_steps:
            hours = self._hours_left(r)
            if hours is not None and hours <= 0:
                self._save(r, i, selected_trial=trial_id, selected_params=params)
                self._out_of_budget(r)
                return
            self._save(
                r,
                i,
                phase="retraining",
                selected_trial=trial_id,
                selected_params=params,
                final_hours=hours,
            )
        else:
            self._save(
                r,
                i,
                phase="promoting",
                selected_trial=trial_id,
                selected_params=params,
                model_trial=trial_id,
            )

    def _promote(self, r: PipelineRecord, i: int) -> bool:
        stage = r.stages[i]
        spec = r.spec.stages[i]
        trial = self.studies.store.trial(stage.model_trial)
        run_id = stage.model_run_id or trial.mlflow_run_id
        if not run_id:
            run_id = self.tracker.trial_run(spec.study.stage, trial.trial_id)
        ended = trial.end.timestamp() if trial.end else self._clock()
        late = self._clock() - ended > MODEL_GRACE_SECONDS
        if not run_id or not self.tracker.model_logged(run_id):
            if not late:
                return False  # MLflow may not show the run or its files yet
            where = f"its MLflow run {run_id}" if run_id else "MLflow (no run found)"
            return self._fail(
                r,
                f"trial {trial.trial_id} logged no model to {where}: the worker needs "
                "MLFLOW_TRACKING_URI to reach the server's MLflow",
            )
        hours = self._hours_left(r)
        tags = self._lineage(r, i, trial.trial_id, run_id)
        description = (
            f"pipeline {r.name}, stage {spec.name} ({spec.study.stage}): trial "
            f"{trial.trial_id} of {trial.study_name}, selected by {spec.select.describe()}"
        )
        version = self.tracker.register(r.model_name(i), run_id, tags, description)
        if hours is not None and hours <= 0:
            self._save(r, i, model_run_id=run_id, model_version=version)
            return self._out_of_budget(r)
        self._save(
            r,
            i,
            phase="evaluating",
            model_run_id=run_id,
            model_version=version,
            eval_metrics=dict(trial.metrics),
            test_hours=hours,
        )
        return True

    def _lineage(self, r: PipelineRecord, i: int, trial_id: int, run_id: str) -> dict[str, str]:
        """The tags a promoted version carries: where it comes from, and on what data."""
        stage = r.stages[i]
        spec = r.spec.stages[i]
        search, final, _ = r.spec.study_names(i)
        base = stage.base_uri()
        data = spec.study.runner.get("data", {})
        tags = {
            "stagetune.pipeline": r.name,
            "stagetune.stage": spec.name,
            "stagetune.stage_kind": spec.study.stage,
            "stagetune.study": search,
            "stagetune.selected_trial": str(stage.selected_trial),
            "stagetune.selection": spec.select.describe(),
            "stagetune.trial": str(trial_id),
            "stagetune.trial_study": final if spec.final_steps else search,
            "stagetune.run_id": run_id,
            "stagetune.params": json.dumps(stage.selected_params, sort_keys=True),
            "stagetune.base_model": base,
            "stagetune.base_model_version": base.rpartition("/")[2]
            if base.startswith("models:/")
            else "",
            "stagetune.data.source": str(data.get("path") or f"synthetic:{data.get('synthetic')}"),
        }
        run_tags = self.tracker.run_tags(run_id)
        tags.update({k: v for k, v in run_tags.items() if k.startswith("stagetune.data.")})
        return tags

    # ------------------------------------------------------------ helpers

    def _study(self, r: PipelineRecord, spec: StudySpec) -> StudyRecord | None:
        """The study, created (owned by the pipeline's team) if it does not exist yet; None
        when it cannot be (the stage fails, naming why)."""
        store = self.studies.store
        if store.study_exists(spec.name):
            return self.studies.get_study(spec.name)
        try:
            record, _ = self.studies.create_study(_as_stored(spec), r.team)
        except AlreadyExists as e:  # someone took the name since the pipeline was submitted
            self._fail(r, e.message)
            return None
        return record

    def _save(self, r: PipelineRecord, i: int, **changes: Any) -> None:
        self.store.save_stage(r.name, i, dataclasses.replace(r.stages[i], **changes))

    def _fail(self, r: PipelineRecord, reason: str) -> bool:
        i = r.current
        self._save(r, i, phase="failed", reason=reason)
        self.store.set_state(r.name, "failed", i, f"stage {r.spec.stages[i].name}: {reason}")
        _log.warning("pipeline %s failed: %s", r.name, reason)
        return True

    def _out_of_budget(self, r: PipelineRecord) -> bool:
        spent = sum(self._stage_seconds(r)) / 3600.0
        reason = f"device budget spent: {spent:.4g} of {r.spec.max_device_hours:g} device-hours"
        i = r.current
        if r.stages[i].phase != "pending":
            self._save(r, i, phase="stopped", reason=reason)
        self.store.set_state(r.name, "stopped", i, reason)
        return True

    def _hours_left(self, r: PipelineRecord) -> float | None:
        limit = r.spec.max_device_seconds
        if limit is None:
            return None
        return (limit - sum(self._stage_seconds(r))) / 3600.0

    def _stage_seconds(self, r: PipelineRecord) -> tuple[float, ...]:
        return self._view(r).stage_seconds

    def _view(self, r: PipelineRecord) -> PipelineView:
        """The record with each stage's studies and the device-seconds their trials
        reported."""
        store = self.studies.store
        seconds = []
        studies = []
        for i in range(len(r.spec.stages)):
            total = 0.0
            made = []
            for name in r.spec.study_names(i):
                try:
                    rungs = store.study_head(name).spec.fidelity.rungs()
                except NotFound:  # not made yet (or being made right now)
                    made.append("")
                    continue
                total += store.device_seconds(name, rungs)
                made.append(name)
            seconds.append(total)
            studies.append((made[0], made[1], made[2]))
        return PipelineView(r, tuple(seconds), tuple(studies))

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
            self.tracker.log_status(run_id, self._view(self.store.get(name)))
        except Exception:
            _log.warning("pipeline %s: MLflow status not logged", name, exc_info=True)


def _finished(study: StudyRecord) -> bool:
    """Whether a stage's study hands out nothing more and runs nothing."""
    running = study.counts.get("running", 0)
    return study.state in ("done", "stopped") and running == 0


def _spent(study: StudyRecord) -> str:
    hours = study.spec.budget.max_device_hours
    return f"; its budget was {hours:g} device-hours" if hours is not None else ""


def _run_params(spec: PipelineSpec) -> dict[str, str]:
    params = {
        f"stage.{i}": f"{s.name}: {s.study.stage}, select {s.select.describe()}"
        + (f", final {s.final_steps} steps" if s.final_steps else "")
        for i, s in enumerate(spec.stages)
    }
    if spec.max_device_hours is not None:
        params["max_device_hours"] = f"{spec.max_device_hours:g}"
    return params
