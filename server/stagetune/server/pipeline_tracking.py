"""The pipelines' MLflow surface: the Model Registry, where each stage's model is promoted
as a new version of ``<pipeline>.<stage>`` with its lineage, and the pipeline's own run,
which mirrors ``stagetune pipeline status``.

MLflow code for pipelines lives here and in server/tracking.py only. Unlike study tracking,
promotion cannot be skipped when MLflow is down: every call here raises on failure, and the
pipeline service (which calls it from its own thread, never inside an RPC) retries at its
next pass. Registration is idempotent: a version already made from the same run is reused,
so a server that died after registering and before recording it makes no second version.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from stagetune.contract.mlflow_layout import (
    MODEL_ARTIFACT,
    PIPELINE_EXPERIMENT,
    TRIAL_ID_TAG,
    experiment_name,
    no_telemetry,
)
from stagetune.contract.redact import redact_text
from stagetune.server.pipeline_records import PipelineView

no_telemetry()  # before mlflow is imported (contract/mlflow_layout.py says why)

__all__ = [
    "PipelineTracker",
    "NullPipelineTracker",
    "MlflowPipelineTracker",
    "pipeline_tracker",
    "status_document",
]

_log = logging.getLogger(__name__)
_TAG_CHARS = 5000  # MLflow's limit on a model version tag's value
_RUN_STATUS = {"done": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
#: How often a pipeline's run is brought up to date while only its costs change.
STATUS_SECONDS = 30.0


class PipelineTracker(Protocol):
    """What the pipeline service needs of MLflow. Every method raises on failure."""

    @property
    def enabled(self) -> bool: ...

    def model_run(self, stage: str, trial_id: int, known: str) -> str:
        """The MLflow run that holds the saved model (``MODEL_ARTIFACT``) of a trial of a
        ``stage`` study: ``known`` (the run the server recorded), else one found by its
        trial-id tag (a trial that could not find its run made its own); "" if none."""
        ...

    def run_tags(self, run_id: str) -> dict[str, str]: ...

    def register(self, name: str, run_id: str, tags: dict[str, str], description: str) -> str:
        """A version of registered model ``name`` made from the run's model: the one made
        from this run before, else a new one. Returns the version."""
        ...

    def pipeline_run(self, name: str, params: dict[str, str]) -> tuple[str, str]:
        """Experiment id and run id of the pipeline's run, made if missing."""
        ...

    def log_status(self, run_id: str, view: PipelineView) -> None: ...


class NullPipelineTracker:
    """Tracking switched off: pipelines cannot promote, so none is accepted."""

    enabled = False

    def _off(self) -> Any:
        raise RuntimeError("MLflow tracking is off")

    def model_run(self, stage: str, trial_id: int, known: str) -> str:
        return str(self._off())

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self._off())

    def register(self, name: str, run_id: str, tags: dict[str, str], description: str) -> str:
        return str(self._off())

    def pipeline_run(self, name: str, params: dict[str, str]) -> tuple[str, str]:
        return tuple(self._off())

    def log_status(self, run_id: str, view: PipelineView) -> None:
        self._off()


def status_document(view: PipelineView) -> dict[str, Any]:
    """What ``stagetune pipeline status`` shows, as JSON: the run's ``status.json``."""
    r = view.record
    stages = []
    for i, (s, spec) in enumerate(zip(r.stages, r.spec.stages, strict=True)):
        search, final, test = r.spec.study_names(i)
        stages.append(
            {
                "name": spec.name,
                "stage": spec.study.stage,
                "phase": s.phase,
                "select": spec.select.describe(),
                "studies": {
                    "search": search,
                    "final": final if spec.final_steps else "",
                    "test": test,
                },
                "base_model": s.base_uri(),
                "selected_trial": s.selected_trial,
                "selected_params": s.selected_params,
                "model_trial": s.model_trial,
                "model_uri": r.model_uri(i),
                "device_seconds": view.stage_seconds[i],
                "held_out": [
                    {"metric": h.metric, "eval": h.eval_value, "test": h.test_value, "gap": h.gap}
                    for h in r.held_out(i)
                ],
                "reason": s.reason,
            }
        )
    return {
        "pipeline": r.name,
        "state": r.state,
        "current_stage": r.spec.stages[r.current].name,
        "device_seconds": view.total_seconds,
        "max_device_hours": r.spec.max_device_hours,
        "reason": r.reason,
        "stages": stages,
    }


def _tag(value: str) -> str:
    return redact_text(value)[:_TAG_CHARS]


class MlflowPipelineTracker:
    """``PipelineTracker`` over an MLflow tracking server or local store."""

    enabled = True

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self._artifact_root = artifact_root
        self._experiments: dict[str, str] = {}
        self._logged: dict[str, tuple[str, str, float]] = {}  # run id -> (milestones, doc, when)

    def _experiment(self, name: str, create: bool) -> str:
        if name not in self._experiments:
            exp = self._client.get_experiment_by_name(name)
            if exp is not None:
                self._experiments[name] = exp.experiment_id
            elif not create:
                return ""
            else:
                location = None
                if self._artifact_root is not None:
                    folder = self._artifact_root / name.rpartition("/")[2]
                    location = folder.resolve().as_uri()
                self._experiments[name] = self._client.create_experiment(
                    name, artifact_location=location
                )
        return self._experiments[name]

    def model_run(self, stage: str, trial_id: int, known: str) -> str:
        candidates = [known] if known else []
        exp = self._experiment(experiment_name(stage), create=False)
        if exp:
            found = self._client.search_runs(
                [exp], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'", max_results=10
            )
            candidates += sorted(r.info.run_id for r in found if r.info.run_id != known)
        for run_id in candidates:
            if self._client.list_artifacts(run_id, MODEL_ARTIFACT):
                return run_id
        return ""

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self._client.get_run(run_id).data.tags)

    def register(self, name: str, run_id: str, tags: dict[str, str], description: str) -> str:
        from mlflow.exceptions import MlflowException

        made = self._client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if made:
            return str(min(int(v.version) for v in made))
        try:
            self._client.create_registered_model(
                name, description="stagetune pipeline stage: each version a promoted model"
            )
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self._client.create_model_version(
            name,
            source=f"runs:/{run_id}/{MODEL_ARTIFACT}",
            run_id=run_id,
            tags={k: _tag(v) for k, v in tags.items()},
            description=description,
        )
        return str(version.version)

    def pipeline_run(self, name: str, params: dict[str, str]) -> tuple[str, str]:
        exp = self._experiment(PIPELINE_EXPERIMENT, create=True)
        found = self._client.search_runs(
            [exp],
            filter_string=f"tags.`stagetune.pipeline` = '{name}' "
            "and tags.`stagetune.kind` = 'pipeline'",
            max_results=1,
        )
        if found:
            return exp, found[0].info.run_id
        run = self._client.create_run(
            exp, run_name=name, tags={"stagetune.pipeline": name, "stagetune.kind": "pipeline"}
        )
        for key, value in params.items():
            self._client.log_param(run.info.run_id, key, _tag(value)[:500])
        return exp, run.info.run_id

    def log_status(self, run_id: str, view: PipelineView) -> None:
        """Tags, metrics and ``status.json`` of the pipeline's run: at once when a stage
        moved (phase, selection, version), else at most every ``STATUS_SECONDS`` while
        only costs grow."""
        doc = status_document(view)
        text = json.dumps(doc, indent=2, sort_keys=True, default=str)
        milestones = json.dumps(
            [
                doc["state"],
                [(s["phase"], s["selected_trial"], s["model_uri"]) for s in doc["stages"]],
            ]
        )
        last = self._logged.get(run_id)
        now = time.monotonic()
        if last is not None and (
            last[1] == text or (last[0] == milestones and now - last[2] < STATUS_SECONDS)
        ):
            return
        c = self._client
        c.set_tag(run_id, "state", doc["state"])
        c.set_tag(run_id, "current_stage", doc["current_stage"])
        c.log_metric(run_id, "device_seconds", float(doc["device_seconds"]))
        for s in doc["stages"]:
            n = s["name"]
            c.set_tag(run_id, f"{n}.phase", s["phase"])
            if s["selected_trial"]:
                c.set_tag(run_id, f"{n}.selected_trial", str(s["selected_trial"]))
            if s["model_uri"]:
                c.set_tag(run_id, f"{n}.model", s["model_uri"])
            c.log_metric(run_id, f"{n}.device_seconds", float(s["device_seconds"]))
            for h in s["held_out"]:
                for key in ("eval", "test", "gap"):
                    c.log_metric(run_id, f"{n}.{h['metric']}.{key}", float(h[key]))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "status.json"
            path.write_text(text)
            c.log_artifact(run_id, str(path))
        if doc["state"] in _RUN_STATUS:
            c.set_terminated(run_id, _RUN_STATUS[doc["state"]])
        self._logged[run_id] = (milestones, text, now)


def pipeline_tracker(tracking_uri: str, artifact_root: Path | None) -> PipelineTracker:
    """The tracker for the server's tracking URI ("" = off: no pipeline is accepted)."""
    if not tracking_uri:
        return NullPipelineTracker()
    return MlflowPipelineTracker(tracking_uri, artifact_root)
