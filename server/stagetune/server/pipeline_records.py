"""Server-side records of pipelines: what the pipeline service works with, apart from
protos and from how they are stored (server/pipeline_store.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from stagetune.contract.pipeline import PipelineSpec, model_name
from stagetune.contract.spec import ParamValue

__all__ = [
    "PipelineStateName",
    "StagePhaseName",
    "StageRecord",
    "PipelineRecord",
    "HeldOut",
    "PipelineView",
]

PipelineStateName = Literal["running", "awaiting_approval", "done", "stopped", "failed"]
StagePhaseName = Literal[
    "pending",
    "searching",
    "awaiting_approval",
    "retraining",
    "promoting",
    "evaluating",
    "done",
    "failed",
    "stopped",
]


# Shown on eval and test whenever both runs report them, objectives or not.
HELD_OUT_QUALITY = ("eval_loss", "exact_match", "reward_accuracy", "reward_margin", "mean_reward")


@dataclass(frozen=True)
class HeldOut:
    """One objective measured on eval (by the trial that trained the promoted model) and
    on test (by the evaluation trial)."""

    metric: str
    eval_value: float
    test_value: float

    @property
    def gap(self) -> float:
        return self.test_value - self.eval_value


@dataclass(frozen=True)
class StageRecord:
    """One stage's progress. Each study a stage creates is decided (its phase and its
    device-hour budget written here) before it is created, so a server that dies in
    between creates the same study again on restart, which is then a no-op."""

    phase: StagePhaseName = "pending"
    base_model: dict[str, Any] = field(default_factory=dict)  # the runner.model it started from
    search_hours: float | None = None  # device-hours each of its studies was given
    final_hours: float | None = None
    test_hours: float | None = None
    selected_trial: int = 0
    selected_params: dict[str, ParamValue] = field(default_factory=dict)
    model_trial: int = 0  # the trial whose saved model is promoted
    model_run_id: str = ""  # its MLflow run, which holds the model
    model_version: str = ""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def base_uri(self) -> str:
        """What the stage started from, as text: a path, a models:/ URI, or the tiny model."""
        if "name_or_path" in self.base_model:
            return str(self.base_model["name_or_path"])
        if "tiny" in self.base_model:
            sizes = ",".join(f"{k}={v}" for k, v in sorted(self.base_model["tiny"].items()))
            return f"tiny({sizes})"
        return ""


@dataclass(frozen=True)
class PipelineRecord:
    spec: PipelineSpec
    state: PipelineStateName
    current: int  # the stage that runs, waits, or ended the pipeline
    stages: tuple[StageRecord, ...]
    created: datetime
    team: str = ""
    reason: str = ""
    mlflow_experiment_id: str = ""
    mlflow_run_id: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def model_name(self, i: int) -> str:
        return model_name(self.spec.name, self.spec.stages[i].name)

    def model_uri(self, i: int) -> str:
        version = self.stages[i].model_version
        return f"models:/{self.model_name(i)}/{version}" if version else ""

    def held_out(self, i: int) -> list[HeldOut]:
        """Stage ``i``'s objectives on eval and test, once both are known, then the quality
        metrics that are not objectives (exact match beside an eval-loss objective)."""
        stage = self.stages[i]
        out = []
        objectives = self.spec.stages[i].study.metric_names
        for metric in [*objectives, *(m for m in HELD_OUT_QUALITY if m not in objectives)]:
            if metric in stage.eval_metrics and metric in stage.test_metrics:
                out.append(HeldOut(metric, stage.eval_metrics[metric], stage.test_metrics[metric]))
        return out


@dataclass(frozen=True)
class PipelineView:
    """A pipeline with what it cost: device-seconds per stage (every trial of the stage's
    studies), read from the studies when the view is made."""

    record: PipelineRecord
    stage_seconds: tuple[float, ...]
    #: Per stage: its search, retrain and evaluation study names; "" for one not made (yet).
    stage_studies: tuple[tuple[str, str, str], ...]

    @property
    def total_seconds(self) -> float:
        return sum(self.stage_seconds)
