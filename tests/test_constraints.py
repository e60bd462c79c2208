"""Hard constraints: parsed and validated naming the field; a trial that breaks one at a
rung is stopped there and marked infeasible, visible in status and MLflow; out of memory is
infeasible too; infeasible trials never reach the front."""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    BudgetSpec,
    ConstraintSpec,
    StudySpec,
    spec_from_mapping,
    spec_from_proto,
    spec_to_proto,
    validate_spec,
)
from stagetune.server import attributes as at
from stagetune.server.app import StagetuneServer
from stagetune.server.optuna_policy import constraint_values
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO


def lora(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
    data.update(changes)
    return data


def test_constraints_parse_from_strings_and_mappings_and_survive_the_wire() -> None:
    spec = spec_from_mapping(
        lora(
            constraints=[
                "peak_memory_mb <= 40000",
                "exact_match >= 0.2",
                {"metric": "decode_latency_ms", "min": 1, "max": 50},
            ]
        )
    )
    validate_spec(spec)
    assert spec.constraints == (
        ConstraintSpec("peak_memory_mb", max=40000.0),
        ConstraintSpec("exact_match", min=0.2),
        ConstraintSpec("decode_latency_ms", max=50.0, min=1.0),
    )
    assert spec_from_proto(spec_to_proto(spec)) == spec
    assert spec.violated({"peak_memory_mb": 41000.0}) == (
        "peak_memory_mb = 41000 breaks peak_memory_mb <= 40000"
    )
    assert spec.violated({"peak_memory_mb": 40000.0, "exact_match": 0.5}) == ""


@pytest.mark.parametrize(
    ("constraints", "field"),
    [
        (["vibes <= 3"], "constraints[0].metric"),
        (["peak_memory_mb < 3"], "constraints[0]"),
        (["peak_memory_mb <= lots"], "constraints[0]"),
        ([{"metric": "peak_memory_mb"}], "constraints[0]"),
        ([{"metric": "peak_memory_mb", "min": 5, "max": 1}], "constraints[0].min"),
        ([{"metric": "peak_memory_mb", "max": float("nan")}], "constraints[0].max"),
        ("peak_memory_mb <= 3", "constraints"),
    ],
)
def test_a_bad_constraint_is_refused_naming_the_field(constraints: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(spec_from_mapping(lora(constraints=constraints)))
    assert err.value.field == field


def test_the_sampler_sees_how_far_a_trial_is_outside_each_limit() -> None:
    spec = spec_from_mapping(lora(constraints=["peak_memory_mb <= 500", "exact_match >= 0.5"]))
    done = optuna.trial.create_trial(
        values=[1.0, 1.0, 1.0],
        user_attrs={at.METRICS: {"peak_memory_mb": 650.0, "exact_match": 0.7}},
    )
    assert constraint_values(spec, done) == [150.0, 0.0]
    stopped = optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED,
        user_attrs={f"{at.RUNG_PREFIX}8": {"metrics": {"peak_memory_mb": 420.0}, "time": 0}},
    )
    assert constraint_values(spec, stopped) == [0.0, 0.0]  # unmeasured counts as met


@pytest.fixture
def constrained(study_client: StudyClient, lora_spec: StudySpec) -> StudySpec:
    spec = dataclasses.replace(
        lora_spec,
        early_stopping="mo_asha",
        budget=BudgetSpec(8, 2),
        constraints=(
            ConstraintSpec("peak_memory_mb", max=550.0),
            ConstraintSpec("decode_latency_ms", max=10.0),
        ),
    )
    study_client.create_study(spec)
    return spec


def report(wc: WorkerClient, worker: str, loss: float, memory: float) -> tuple[int, Any]:
    a = wc.acquire(worker)
    metrics = {"eval_loss": loss, "peak_memory_mb": memory}
    return a.trial.trial_id, wc.report_progress(a.trial.trial_id, worker, 8, metrics)


def test_a_trial_over_a_limit_is_stopped_at_its_first_rung_and_marked_infeasible(
    worker_client: WorkerClient, study_client: StudyClient, constrained: StudySpec
) -> None:
    from stagetune.cli.render import render_status

    hog, d = report(worker_client, "w1", 1.0, 900.0)  # the best loss, far over the limit
    assert d.stop and d.reason == (
        "infeasible at rung 8: peak_memory_mb = 900 breaks peak_memory_mb <= 550"
    )
    ok, d = report(worker_client, "w2", 3.0, 500.0)
    assert not d.stop  # the infeasible trial is no rival at the rung
    trials = {t.trial_id: t for t in study_client.list_trials(constrained.name)}
    assert trials[hog].state == pb.TRIAL_STATE_INFEASIBLE
    assert trials[ok].state == pb.TRIAL_STATE_RUNNING
    study = study_client.get_study(constrained.name)
    assert (study.counts.infeasible, study.counts.stopped) == (1, 0)
    infeasible = study_client.list_trials(constrained.name, states=[pb.TRIAL_STATE_INFEASIBLE])
    assert [t.trial_id for t in infeasible] == [hog]
    text = render_status(study_client, constrained.name)
    assert "1 infeasible" in text and "infeasible at rung 8" in text


def test_a_limit_broken_only_at_the_end_keeps_the_trial_off_the_front(
    worker_client: WorkerClient, study_client: StudyClient, constrained: StudySpec
) -> None:
    slow = worker_client.acquire("w1").trial.trial_id
    fast = worker_client.acquire("w2").trial.trial_id
    final = {"eval_loss": 1.0, "peak_memory_mb": 500.0}
    worker_client.complete(slow, "w1", {**final, "decode_latency_ms": 25.0})
    worker_client.complete(fast, "w2", {**final, "eval_loss": 2.0, "decode_latency_ms": 5.0})
    trials = {t.trial_id: t for t in study_client.list_trials(constrained.name)}
    assert trials[slow].state == pb.TRIAL_STATE_INFEASIBLE
    assert "infeasible at the full budget: decode_latency_ms = 25" in trials[slow].reason
    front = study_client.pareto_front(constrained.name)
    assert [t.trial_id for t in front.trials] == [fast]


def test_out_of_memory_is_infeasible_and_not_retried(
    worker_client: WorkerClient, study_client: StudyClient, constrained: StudySpec
) -> None:
    tid = worker_client.acquire("w1").trial.trial_id
    trial, requeued = worker_client.fail(tid, "w1", "out_of_memory", "CUDA out of memory")
    assert trial.state == pb.TRIAL_STATE_INFEASIBLE and not requeued
    assert study_client.get_study(constrained.name).counts.waiting == 0


def test_dominated_and_infeasible_trials_end_differently_in_mlflow(
    tracked_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(
        lora_spec,
        early_stopping="mo_asha",
        budget=BudgetSpec(3, 0),
        constraints=(ConstraintSpec("peak_memory_mb", max=550.0),),
    )
    with (
        StudyClient(tracked_server.address) as sc,
        WorkerClient(tracked_server.address) as wc,
    ):
        study, _ = sc.create_study(spec)
        good, d_good = report(wc, "w1", 2.0, 500.0)
        dominated, d_dom = report(wc, "w2", 3.0, 540.0)
        hog, d_hog = report(wc, "w3", 1.0, 800.0)
        assert (d_good.stop, d_dom.stop, d_hog.stop) == (False, True, True)
        states = {t.trial_id: t.state for t in sc.list_trials(spec.name)}
    assert states[dominated] == pb.TRIAL_STATE_STOPPED
    assert states[hog] == pb.TRIAL_STATE_INFEASIBLE
    tracked_server.tracker.flush()
    client = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    runs = client.search_runs([study.mlflow_experiment_id], "tags.`stagetune.kind` = 'trial'")
    by_trial = {r.data.tags.get("stagetune.trial_id"): r for r in runs}
    tags = {
        int(k): (r.data.tags["state"], r.data.tags.get("reason", ""))
        for k, r in by_trial.items()
        if k is not None
    }
    assert tags[dominated][0] == "stopped" and f"dominated by trials {good}" in tags[dominated][1]
    assert tags[hog][0] == "infeasible" and "peak_memory_mb = 800" in tags[hog][1]
