"""``budget.max_device_hours``: a study hands out no trial once the device-seconds its
trials reported reach the budget (running trials' reports count; queued retries are held
back), running trials finish, and the study is done once nothing runs. Through a live
server on SQLite and PostgreSQL, with workers driven by the real client."""

from __future__ import annotations

import dataclasses

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import (
    BudgetSpec,
    StudySpec,
    spec_from_mapping,
    spec_from_proto,
    spec_to_proto,
    validate_spec,
)
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws

SECONDS = 10.0  # the budget below, in device-seconds


def metrics(device_seconds: float) -> dict[str, float]:
    return {
        "eval_loss": 1.0,
        "decode_latency_ms": 1.0,
        "peak_memory_mb": 10.0,
        "device_seconds": device_seconds,
    }


@pytest.fixture
def study(study_client: StudyClient, lora_spec: StudySpec) -> StudySpec:
    spec = dataclasses.replace(
        lora_spec, budget=BudgetSpec(max_trials=50, max_retries=3, max_device_hours=SECONDS / 3600)
    )
    study_client.create_study(spec)
    return spec


def acquire(client: WorkerClient, worker: str) -> ws.Assignment:
    got = client.acquire(worker)
    assert isinstance(got, ws.Assignment), got
    return got


def test_no_trial_is_handed_out_once_the_reported_device_seconds_reach_the_budget(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    first = acquire(worker_client, "w1")
    worker_client.complete(first.trial.trial_id, "w1", metrics(6.0))
    second = acquire(worker_client, "w1")  # 6 of 10 spent
    third = acquire(worker_client, "w2")  # still 6: the second reported nothing yet
    # A rung report of the running second trial counts: 6 + 4 reaches the budget exactly.
    worker_client.report_progress(second.trial.trial_id, "w1", 8, {**metrics(4.0)})
    refused = worker_client.acquire("w3", study_name=study.name)
    assert isinstance(refused, ws.NoTrial)
    assert "device budget is spent" in refused.reason
    # Running trials finish; their final device-seconds replace what their rungs said.
    worker_client.complete(second.trial.trial_id, "w1", metrics(5.0))
    assert study_client.get_study(study.name).state == pb.STUDY_STATE_RUNNING  # one runs
    worker_client.complete(third.trial.trial_id, "w2", metrics(1.0))
    done = study_client.get_study(study.name)
    assert done.state == pb.STUDY_STATE_DONE
    assert done.counts.complete == 3
    again = worker_client.acquire("w3", study_name=study.name)
    assert isinstance(again, ws.NoTrial) and again.reason.endswith("(done)")


def test_one_device_second_short_of_the_budget_still_hands_out_a_trial(
    worker_client: WorkerClient, study: StudySpec
) -> None:
    first = acquire(worker_client, "w1")
    worker_client.complete(first.trial.trial_id, "w1", metrics(SECONDS - 1.0))
    acquire(worker_client, "w1")  # 9 of 10: not spent


def test_a_queued_retry_is_held_back_once_the_budget_is_spent(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    first = acquire(worker_client, "w1")
    second = acquire(worker_client, "w2")
    worker_client.report_progress(first.trial.trial_id, "w1", 8, metrics(3.0))
    _, requeued = worker_client.fail(first.trial.trial_id, "w1", "interrupted", "preempted")
    assert requeued
    worker_client.complete(second.trial.trial_id, "w2", metrics(SECONDS))
    held = worker_client.acquire("w3", study_name=study.name)
    assert isinstance(held, ws.NoTrial) and held.reason.endswith("(done)")
    s = study_client.get_study(study.name)
    assert s.state == pb.STUDY_STATE_DONE and s.counts.waiting == 1


def test_the_budget_is_validated_naming_the_field(lora_spec: StudySpec) -> None:
    for bad in (0, -1.0, float("inf")):
        spec = dataclasses.replace(lora_spec, budget=BudgetSpec(4, 1, bad))
        with pytest.raises(InvalidArgument) as e:
            validate_spec(spec)
        assert e.value.field == "budget.max_device_hours"
    with pytest.raises(InvalidArgument) as e:
        spec_from_mapping(
            {
                "name": "x",
                "stage": "lora",
                "fidelity": {"max_steps": 4},
                "budget": {"max_trials": 2, "max_device_hours": "lots"},
            }
        )
    assert e.value.field == "budget.max_device_hours"


def test_the_budget_travels_on_the_wire_and_unset_means_no_limit(lora_spec: StudySpec) -> None:
    limited = dataclasses.replace(lora_spec, budget=BudgetSpec(4, 1, 0.25))
    assert spec_from_proto(spec_to_proto(limited)).budget.max_device_hours == 0.25
    assert spec_from_proto(spec_to_proto(lora_spec)).budget.max_device_hours is None
    assert not spec_to_proto(lora_spec).budget.HasField("max_device_hours")
