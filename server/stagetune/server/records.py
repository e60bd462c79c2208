"""Server-side domain records: what the study service works with, apart from protos and
from Optuna's types. The storage layer builds and stores them; the servicer converts them
to protos."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from stagetune.contract.names import StudyStateName, TrialStateName
from stagetune.contract.spec import ParamValue, StudySpec

EndStateName = Literal["complete", "stopped", "failed"]

__all__ = [
    "StudyStateName",
    "TrialStateName",
    "RungRecord",
    "RungReport",
    "TrialRecord",
    "StudyRecord",
    "StudyHead",
    "EndStateName",
    "TrialLease",
    "RequestAnswer",
    "TrialOutcome",
]


@dataclass(frozen=True)
class RungRecord:
    step: int
    metrics: dict[str, float]
    time: datetime


@dataclass(frozen=True)
class RungReport:
    """A rung report to store: its step, metrics, and the metric that is also the trial's
    Optuna intermediate value there (the first objective's)."""

    step: int
    metrics: dict[str, float]
    primary: str = ""


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


@dataclass(frozen=True)
class TrialLease:
    """Who holds a running trial, and until when (epoch seconds) unless renewed."""

    worker_id: str
    expires: float


@dataclass(frozen=True)
class RequestAnswer:
    """What a trial's idempotency key was first used for: the payload's fingerprint and
    the answer given, returned again to a retry with the same payload."""

    request_id: str
    payload: str
    answer: dict[str, Any]


@dataclass(frozen=True)
class TrialOutcome:
    """How a running trial ended: stored in one transaction, then told to the policy."""

    state: EndStateName
    values: tuple[float, ...] = ()  # objective values, in the spec's order (complete only)
    metrics: dict[str, float] | None = None  # final metrics, when the trial reported them
    reason: str = ""
    infeasible: str = ""  # the broken constraint, or "out of memory"; "" when feasible
    request: RequestAnswer | None = None  # the idempotency key that ended it, if any
