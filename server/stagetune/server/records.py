"""Server-side domain records: what the study service works with, apart from protos and
from Optuna's types. The storage layer builds them; the servicer converts them to protos."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from stagetune.contract.spec import ParamValue, StudySpec

StudyStateName = Literal["running", "stopped", "done"]
TrialStateName = Literal["waiting", "running", "complete", "stopped", "failed", "infeasible"]

__all__ = [
    "StudyStateName",
    "TrialStateName",
    "RungRecord",
    "TrialRecord",
    "StudyRecord",
    "StudyHead",
]


@dataclass(frozen=True)
class RungRecord:
    step: int
    metrics: dict[str, float]
    time: datetime


@dataclass(frozen=True)
class TrialRecord:
    trial_id: int
    number: int
    study_name: str
    state: TrialStateName
    params: dict[str, ParamValue]
    attempt: int
    metrics: dict[str, float] = field(default_factory=dict)
    values: tuple[float, ...] = ()
    rungs: tuple[RungRecord, ...] = ()
    worker_id: str = ""
    start: datetime | None = None
    end: datetime | None = None
    lease_expires: datetime | None = None
    reason: str = ""
    mlflow_run_id: str = ""
    pareto_rank: int = 0


@dataclass(frozen=True)
class StudyRecord:
    spec: StudySpec
    state: StudyStateName
    created: datetime
    counts: dict[TrialStateName, int]
    budget_used: int  # first attempts created so far (retries excluded)
    reference: tuple[float, ...] | None = None  # frozen hypervolume reference point
    mlflow_experiment_id: str = ""
    mlflow_run_id: str = ""
    hypervolume: float = 0.0


@dataclass(frozen=True)
class StudyHead:
    """What the per-trial calls need of a study, read without loading its trials."""

    spec: StudySpec
    state: StudyStateName  # as stored: running or stopped ("done" is derived from trials)
    reference: tuple[float, ...] | None = None
