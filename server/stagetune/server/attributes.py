"""Where the service's facts live in Optuna's storage: the user-attribute keys, typed
conversions to and from their values, and the Optuna distributions params are stored
with.

Study user attributes hold the spec (as canonical proto JSON), state, creation time,
owning team, frozen hypervolume reference, last hypervolume and MLflow ids. Trial user
attributes hold the study name, attempt, worker and lease, rung reports, final metrics,
the reason it ended, an infeasibility mark, where a warm-start seed came from, the MLflow
run id and the answers recorded per idempotency key.

These keys are the stored format: a database written by any earlier server is read with
them, so a key never changes meaning or name. Only the storage layer (``storage.py``) and
the Optuna policy (which hands trials to Optuna's samplers, whose constraint functions
read the metrics) use this module; the service works with records.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial

from stagetune.contract.spec import CategoricalParam, FloatParam, StudySpec
from stagetune.server.records import RequestAnswer, RungRecord, TrialLease, TrialOutcome

# Keys of study user attributes.
SPEC = "st_spec"
STATE = "st_state"
CREATED = "st_created"
TEAM = "st_team"  # the owning team (server/auth.py)
REFERENCE = "st_reference"
MLFLOW_EXPERIMENT = "st_mlflow_experiment_id"
MLFLOW_RUN = "st_mlflow_run_id"
HYPERVOLUME = "st_hypervolume"

# Keys of trial user attributes.
STUDY = "st_study"
ATTEMPT = "st_attempt"
WORKER = "st_worker"
LEASE = "st_lease"
REASON = "st_reason"
METRICS = "st_metrics"
RUN_ID = "st_mlflow_run_id"
RUNG_PREFIX = "st_rung_"  # + step -> {"metrics": {...}, "time": epoch seconds}
SEED = "st_seed"  # where a warm-start trial's params came from
INFEASIBLE = "st_infeasible"  # the broken constraint, or "out of memory"
REQUEST_PREFIX = "st_req_"  # + idempotency key -> {"payload": fingerprint, "answer": {...}}


def distributions_of(spec: StudySpec) -> dict[str, BaseDistribution]:
    """The Optuna distribution of each searched param: how its values are stored."""
    dists: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if isinstance(p, FloatParam):
            dists[p.name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            dists[p.name] = CategoricalDistribution(list(p.choices))
        else:
            dists[p.name] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
    return dists


def timestamp(value: Any) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value is not None else None


def lease_attrs(lease: TrialLease) -> dict[str, Any]:
    return {WORKER: lease.worker_id, LEASE: lease.expires}


def queued_attrs(study_name: str, attempt: int, source: str = "") -> dict[str, Any]:
    """A WAITING trial's attributes: a warm-start seed (``source``) or a retry."""
    attrs: dict[str, Any] = {STUDY: study_name, ATTEMPT: attempt}
    if source:
        attrs[SEED] = source
    return attrs


def rung_key(step: int) -> str:
    return f"{RUNG_PREFIX}{step}"


def rung_value(metrics: dict[str, float], time: datetime) -> dict[str, Any]:
    return {"metrics": metrics, "time": time.timestamp()}


def rung_records(user_attrs: dict[str, Any]) -> list[RungRecord]:
    """A trial's rung reports, by step."""
    return sorted(
        (
            RungRecord(
                int(k[len(RUNG_PREFIX) :]),
                v["metrics"],
                timestamp(v["time"]) or datetime.now(UTC),
            )
            for k, v in user_attrs.items()
            if k.startswith(RUNG_PREFIX)
        ),
        key=lambda r: r.step,
    )


def request_attrs(request: RequestAnswer) -> dict[str, Any]:
    return {
        REQUEST_PREFIX + request.request_id: {
            "payload": request.payload,
            "answer": request.answer,
        }
    }


def request_answer(request_id: str, value: Any) -> RequestAnswer | None:
    """The stored record of an idempotency key (None: none, or not one this server wrote)."""
    if not isinstance(value, dict):
        return None
    answer = value.get("answer")
    return RequestAnswer(
        request_id, str(value.get("payload", "")), dict(answer) if isinstance(answer, dict) else {}
    )


def outcome_attrs(outcome: TrialOutcome) -> dict[str, Any]:
    """What a trial's end writes besides its state and values."""
    attrs: dict[str, Any] = {}
    if outcome.metrics is not None:
        attrs[METRICS] = outcome.metrics
    if outcome.request is not None:
        attrs.update(request_attrs(outcome.request))
    if outcome.infeasible:
        attrs[INFEASIBLE] = outcome.infeasible
    if outcome.reason:
        attrs[REASON] = outcome.reason
    return attrs


def constraint_attrs(user_attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes that ``measured_metrics`` reads (and the infeasibility mark)."""
    return {
        k: v
        for k, v in user_attrs.items()
        if k in (METRICS, INFEASIBLE) or k.startswith(RUNG_PREFIX)
    }


def device_seconds(metrics: dict[str, Any] | None, rungs: list[dict[str, Any]]) -> float:
    """What one trial spent: its final ``device_seconds``, else the largest one its rung
    reports carried (a running, stopped or failed trial's spend so far); 0 when it reported
    none. ``rungs``: the stored values of its rung attributes."""
    final = (metrics or {}).get("device_seconds")
    if final is not None:
        return float(final)
    seen = [
        float(r["metrics"]["device_seconds"])
        for r in rungs
        if "device_seconds" in r.get("metrics", {})
    ]
    return max(seen, default=0.0)


def measured_metrics(user_attrs: dict[str, Any]) -> dict[str, float]:
    """A trial's final metrics; for a trial stopped at a rung, its last rung's."""
    metrics: dict[str, float] = dict(user_attrs.get(METRICS) or {})
    if not metrics:
        rungs = rung_records(user_attrs)
        metrics = dict(rungs[-1].metrics) if rungs else {}
    return metrics


def constraint_values(spec: StudySpec, trial: FrozenTrial) -> list[float]:
    """Optuna's constraint convention, one value per constraint of the study, <= 0 when
    met: how far the trial's final metrics (or, for a trial stopped at a rung, its last
    rung's) lie outside each limit. A metric never measured counts as met."""
    metrics = measured_metrics(trial.user_attrs)
    return [c.excess(metrics[c.metric]) if c.metric in metrics else 0.0 for c in spec.constraints]
