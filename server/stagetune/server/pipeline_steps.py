"""One step at a time of a pipeline's current stage: the phases of a stage, each decided in
the store before it acts (server/pipeline_service.py runs the steps and holds the locks).

``pending`` -> ``searching`` -> [``awaiting_approval``] -> [``retraining``] -> ``promoting``
-> ``evaluating`` -> ``done``. Every action is idempotent: a study is created only if it does
not exist (with the spec and budget written before), and a version registered from the
same MLflow run is reused, so a server that died half-way redoes the step and nothing
doubles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from stagetune.contract.errors import AlreadyExists, NotFound
from stagetune.contract.pipeline import evaluation_study, final_study, search_study
from stagetune.contract.spec import StudySpec, spec_from_proto, spec_to_proto
from stagetune.server.pipeline_records import PipelineRecord, PipelineView
from stagetune.server.pipeline_store import PipelineStore
from stagetune.server.pipeline_tracking import PipelineTracker
from stagetune.server.records import StudyRecord
from stagetune.server.selection import select_trial
from stagetune.server.service import StudyService

__all__ = ["PipelineSteps", "MODEL_GRACE_SECONDS"]

_log = logging.getLogger(__name__)
#: How long a promoted trial's model may take to show in MLflow after the trial ended.
MODEL_GRACE_SECONDS = 120.0


def _as_stored(spec: StudySpec) -> StudySpec:
    # What the store gives back for a spec (the runner struct round-trips through JSON),
    # so re-creating a derived study after a restart finds it equal.
    return spec_from_proto(spec_to_proto(spec))


class PipelineSteps:
    """The steps of pipelines over the study service, the pipeline store and MLflow. The
    caller holds the pipeline's lock."""

    def __init__(
        self,
        studies: StudyService,
        store: PipelineStore,
        tracker: PipelineTracker,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.studies = studies
        self.store = store
        self.tracker = tracker
        self._clock = clock

    def step(self, r: PipelineRecord) -> bool:
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
            self.save(r, i, phase="searching", base_model=base, search_hours=hours)
            return True
        if stage.phase == "searching":
            study = self._study(r, search_study(r.spec, i, stage.base_model, stage.search_hours))
            if study is None or not _finished(study):
                return False
            if spec.select.rule == "manual":
                self.save(r, i, phase="awaiting_approval")
                self.store.set_state(r.name, "awaiting_approval", i)
                return True
            trials = self.studies.store.trials(search)
            chosen, why = select_trial(study.spec, trials, spec.select)
            if chosen is None:
                return self._ended_short(r, f"{search}: nothing to select ({why})")
            _log.info(
                "pipeline %s stage %s: trial %d (%s)", r.name, spec.name, chosen.trial_id, why
            )
            self.selected(r, i, chosen.trial_id, dict(chosen.params))
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
                return self._ended_short(r, f"{final}: the retrain did not complete ({why})")
            self.save(r, i, phase="promoting", model_trial=done[0].trial_id)
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
                return self._ended_short(r, f"{test}: the test evaluation failed ({why})")
            self.save(r, i, phase="done", test_metrics=dict(complete[0].metrics))
            if i + 1 < len(r.spec.stages):
                self.store.set_state(r.name, "running", i + 1)
            else:
                self.store.set_state(r.name, "done", i)
            return True
        return False  # awaiting approval, or over

    def selected(self, r: PipelineRecord, i: int, trial_id: int, params: dict[str, Any]) -> None:
        spec = r.spec.stages[i]
        if spec.final_steps:
            hours = self._hours_left(r)
            if hours is not None and hours <= 0:
                self.save(r, i, selected_trial=trial_id, selected_params=params)
                self._out_of_budget(r)
                return
            self.save(
                r,
                i,
                phase="retraining",
                selected_trial=trial_id,
                selected_params=params,
                final_hours=hours,
            )
        else:
            self.save(
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
        run_id = stage.model_run_id or self.tracker.model_run(
            spec.study.stage, trial.trial_id, trial.mlflow_run_id
        )
        if not run_id:
            ended = trial.end.timestamp() if trial.end else self._clock()
            if self._clock() - ended <= MODEL_GRACE_SECONDS:
                return False  # MLflow may not show the run or its files yet
            return self._fail(
                r,
                f"trial {trial.trial_id} logged no model to MLflow: its worker needs "
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
            self.save(r, i, model_run_id=run_id, model_version=version)
            return self._out_of_budget(r)
        self.save(
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

    def save(self, r: PipelineRecord, i: int, **changes: Any) -> None:
        self.store.save_stage(r.name, i, dataclasses.replace(r.stages[i], **changes))

    def _ended_short(self, r: PipelineRecord, reason: str) -> bool:
        """A study ended without what the stage needs: the pipeline stops when its device
        budget ran out (the likely cause), and fails otherwise."""
        hours = self._hours_left(r)
        if hours is not None and hours <= 0:
            return self._out_of_budget(r)
        return self._fail(r, reason)

    def _fail(self, r: PipelineRecord, reason: str) -> bool:
        i = r.current
        self.save(r, i, phase="failed", reason=reason)
        self.store.set_state(r.name, "failed", i, f"stage {r.spec.stages[i].name}: {reason}")
        _log.warning("pipeline %s failed: %s", r.name, reason)
        return True

    def _out_of_budget(self, r: PipelineRecord) -> bool:
        spent = sum(self.stage_seconds(r)) / 3600.0
        reason = f"device budget spent: {spent:.4g} of {r.spec.max_device_hours:g} device-hours"
        i = r.current
        if r.stages[i].phase != "pending":
            self.save(r, i, phase="stopped", reason=reason)
        self.store.set_state(r.name, "stopped", i, reason)
        return True

    def _hours_left(self, r: PipelineRecord) -> float | None:
        limit = r.spec.max_device_seconds
        if limit is None:
            return None
        return (limit - sum(self.stage_seconds(r))) / 3600.0

    def stage_seconds(self, r: PipelineRecord) -> tuple[float, ...]:
        return self.view(r).stage_seconds

    def view(self, r: PipelineRecord) -> PipelineView:
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


def _finished(study: StudyRecord) -> bool:
    """Whether a stage's study hands out nothing more and runs nothing."""
    running = study.counts.get("running", 0)
    return study.state in ("done", "stopped") and running == 0
