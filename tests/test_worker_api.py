"""Worker service through a live server: leases, idempotency, failures, budgets."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from stagetune.contract.spec import BudgetSpec, StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from tests.conftest import objective_metrics


@pytest.fixture
def study(study_client: StudyClient, lora_spec: StudySpec) -> StudySpec:
    study_client.create_study(lora_spec)
    return lora_spec


def test_acquire_hands_out_params_inside_the_search_space_with_rungs(
    worker_client: WorkerClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in a.trial.params.items()}
    assert set(params) == {p.name for p in study.search_space}
    assert 1e-4 <= params["learning_rate"] <= 3e-2
    assert params["lora_alpha"] in (8, 16, 32, 64)
    assert list(a.rung_steps) == [8, 16, 32]
    assert a.trial.state == pb.TRIAL_STATE_RUNNING and a.trial.attempt == 1
    assert a.lease_duration.seconds > 0


def test_a_worker_asking_again_gets_the_trial_it_holds(
    worker_client: WorkerClient, study: StudySpec
) -> None:
    first = worker_client.acquire("w1")
    again = worker_client.acquire("w1")
    other = worker_client.acquire("w2")
    assert again.trial.trial_id == first.trial.trial_id
    assert other.trial.trial_id != first.trial.trial_id


def test_progress_is_recorded_by_step_and_first_report_of_a_step_wins(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    tid = a.trial.trial_id
    assert not worker_client.report_progress(tid, "w1", 8, {"eval_loss": 3.0}).stop
    worker_client.report_progress(tid, "w1", 8, {"eval_loss": 9.0})
    worker_client.report_progress(tid, "w1", 16, {"eval_loss": 2.5})
    (trial,) = study_client.list_trials(study.name)
    assert [(r.step, r.metrics["eval_loss"]) for r in trial.rungs] == [(8, 3.0), (16, 2.5)]


def test_complete_is_idempotent_and_a_different_payload_is_refused(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    m = objective_metrics(2.0, 3.0, 400.0)
    first = worker_client.complete(a.trial.trial_id, "w1", m)
    again = worker_client.complete(a.trial.trial_id, "w1", m)
    assert first.state == again.state == pb.TRIAL_STATE_COMPLETE
    assert list(again.objective_values) == [2.0, 3.0, 400.0]
    with pytest.raises(FailedPrecondition, match="other metrics"):
        worker_client.complete(a.trial.trial_id, "w1", objective_metrics(1.0, 3.0, 400.0))
    assert study_client.get_study(study.name).counts.complete == 1


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"eval_loss": 1.0, "decode_latency_ms": 2.0}, "metrics.peak_memory_mb"),
        (objective_metrics(float("nan"), 1.0, 1.0), "metrics.eval_loss"),
        (objective_metrics(1.0, float("inf"), 1.0), "metrics.decode_latency_ms"),
    ],
)
def test_bad_results_never_complete_a_trial(
    worker_client: WorkerClient,
    study_client: StudyClient,
    study: StudySpec,
    metrics: dict[str, float],
    field: str,
) -> None:
    a = worker_client.acquire("w1")
    with pytest.raises(InvalidArgument) as err:
        worker_client.complete(a.trial.trial_id, "w1", metrics)
    assert err.value.field == field
    (trial,) = study_client.list_trials(study.name)
    assert trial.state == pb.TRIAL_STATE_RUNNING


def test_only_the_holding_worker_may_report(worker_client: WorkerClient, study: StudySpec) -> None:
    a = worker_client.acquire("w1")
    with pytest.raises(FailedPrecondition, match="another worker"):
        worker_client.complete(a.trial.trial_id, "w2", objective_metrics(1, 1, 1))
    with pytest.raises(NotFound):
        worker_client.heartbeat(10**9, "w1")


def test_an_interrupted_trial_is_requeued_with_the_same_params(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    failed, requeued = worker_client.fail(
        a.trial.trial_id, "w1", "interrupted", "worker shutting down"
    )
    assert requeued and failed.state == pb.TRIAL_STATE_FAILED
    b = worker_client.acquire("w2")
    assert b.trial.trial_id != a.trial.trial_id
    assert b.trial.attempt == 2
    assert dict(b.trial.params) == dict(a.trial.params)


def test_a_crashed_trial_is_failed_with_its_reason_and_not_retried(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    failed, requeued = worker_client.fail(
        a.trial.trial_id, "w1", "crash", "exit code 1\nValueError: x"
    )
    assert not requeued
    assert "crashed: exit code 1" in failed.reason
    assert study_client.get_study(study.name).counts.waiting == 0


def test_a_stopped_study_tells_its_running_trials_to_stop(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    a = worker_client.acquire("w1")
    study_client.stop_study(study.name)
    assert worker_client.heartbeat(a.trial.trial_id, "w1")
    decision = worker_client.report_progress(a.trial.trial_id, "w1", 8, {"eval_loss": 2.0})
    assert decision.stop and "stopped" in decision.reason
    (trial,) = study_client.list_trials(study.name)
    assert trial.state == pb.TRIAL_STATE_STOPPED
    with pytest.raises(FailedPrecondition):
        worker_client.report_progress(a.trial.trial_id, "w1", 16, {"eval_loss": 1.0})


def test_the_budget_is_never_exceeded(
    worker_client: WorkerClient, study_client: StudyClient, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(3, 0))
    study_client.create_study(spec)
    got = [worker_client.acquire(f"w{i}") for i in range(5)]
    assert sum(hasattr(g, "trial") for g in got) == 3
    assert "no running study" in got[-1].reason


def test_an_expired_lease_is_reaped_and_its_params_requeued(
    tmp_path: object, storage_url: str, lora_spec: StudySpec
) -> None:
    from tests.conftest import start_server

    srv: StagetuneServer = start_server(
        tmp_path,
        storage_url=storage_url,
        tracking_uri="",
        lease_seconds=1.0,
        reaper_interval=0.2,  # type: ignore[arg-type]
    )
    try:
        with StudyClient(srv.address) as sc, WorkerClient(srv.address) as wc:
            sc.create_study(lora_spec)
            a = wc.acquire("dies")
            deadline = time.monotonic() + 10
            while sc.get_study(lora_spec.name).counts.failed == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            trials = sc.list_trials(lora_spec.name)
            assert trials[0].state == pb.TRIAL_STATE_FAILED
            assert "lease expired" in trials[0].reason
            with pytest.raises(FailedPrecondition):
                wc.report_progress(a.trial.trial_id, "dies", 8, {"eval_loss": 1.0})
            b = wc.acquire("alive")
            assert b.trial.attempt == 2 and dict(b.trial.params) == dict(a.trial.params)
    finally:
        srv.stop(grace=0)


def test_a_retried_completion_with_its_request_id_changes_nothing_twice(
    tracked_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    from mlflow.tracking import MlflowClient

    with StudyClient(tracked_server.address) as sc, WorkerClient(tracked_server.address) as wc:
        study, _ = sc.create_study(lora_spec)
        tid = wc.acquire("w1").trial.trial_id
        first = wc.report_progress(tid, "w1", 8, {"eval_loss": 2.0}, request_id="p-1")
        again = wc.report_progress(tid, "w1", 8, {"eval_loss": 2.0}, request_id="p-1")
        assert again == first
        with pytest.raises(InvalidArgument, match="request_id: was already used"):
            wc.report_progress(tid, "w1", 16, {"eval_loss": 1.5}, request_id="p-1")
        metrics = objective_metrics(2.0, 3.0, 500.0)
        done = wc.complete(tid, "w1", metrics, request_id="c-1")
        # The reply was lost; the worker retries with the same key: the first answer.
        assert wc.complete(tid, "w1", metrics, request_id="c-1") == done
        with pytest.raises(InvalidArgument, match="request_id"):
            wc.complete(tid, "w1", objective_metrics(1.0, 3.0, 500.0), request_id="c-1")
        (trial,) = sc.list_trials(lora_spec.name)
        assert trial.state == pb.TRIAL_STATE_COMPLETE and trial.metrics["eval_loss"] == 2.0
    tracked_server.tracker.flush()
    client = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    (run,) = client.search_runs(
        [study.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
    )
    history = client.get_metric_history(run.info.run_id, "decode_latency_ms")
    assert len(history) == 1  # one set of final metrics in MLflow


def test_a_retried_failure_with_its_request_id_requeues_once(
    worker_client: WorkerClient, study_client: StudyClient, study: StudySpec
) -> None:
    tid = worker_client.acquire("w1").trial.trial_id
    _, requeued = worker_client.fail(tid, "w1", "interrupted", "node drained", request_id="f-1")
    _, again = worker_client.fail(tid, "w1", "interrupted", "node drained", request_id="f-1")
    assert requeued and again
    assert study_client.get_study(study.name).counts.waiting == 1  # queued once, not twice


def test_a_run_id_from_mlflow_waits_for_a_completion_under_way(
    server: StagetuneServer, lora_spec: StudySpec
) -> None:
    """MLflow may answer with the trial's run id while the trial is completing: the run id
    waits for the study's lock and then finds the trial finished and frozen, so the
    completion's answer and its retry's stay the same."""
    trials = server.trials
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(lora_spec)
        tid = wc.acquire("w1").trial.trial_id
        metrics = objective_metrics(2.0, 3.0, 500.0)
        with server.service.lock(lora_spec.name):  # a completion under way holds it
            late = threading.Thread(target=trials._record_run_id, args=(tid, "late"))
            late.start()
            late.join(0.5)
            assert late.is_alive()  # the run id waits
            done = trials.complete(tid, "w1", metrics, request_id="c-1")
        late.join(10)
        assert done.mlflow_run_id == ""
        again = wc.complete(tid, "w1", metrics, request_id="c-1")
        assert again.mlflow_run_id == "" and again.state == pb.TRIAL_STATE_COMPLETE


def test_a_completion_that_failed_after_storing_its_result_updates_the_front_on_retry(
    server: StagetuneServer, lora_spec: StudySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StudyClient(server.address) as sc, WorkerClient(server.address, retries=0) as wc:
        sc.create_study(lora_spec)
        tid = wc.acquire("w1").trial.trial_id
        metrics = objective_metrics(2.0, 3.0, 500.0)

        def lost(*args: object) -> int:
            raise Unavailable("storage unavailable; retry later")  # as storage_errors says it

        # The result is stored, then the database goes away before the front is updated.
        with monkeypatch.context() as m:
            m.setattr(server.store, "count_complete", lost)
            with pytest.raises(Unavailable):
                wc.complete(tid, "w1", metrics, request_id="c-1")
        assert sc.get_study(lora_spec.name).hypervolume == 0.0
        trial = wc.complete(tid, "w1", metrics, request_id="c-1")  # the worker's retry
        assert trial.state == pb.TRIAL_STATE_COMPLETE
        assert sc.get_study(lora_spec.name).hypervolume > 0.0


def test_a_completion_half_written_before_a_crash_is_finished_by_its_retry(
    server: StagetuneServer, lora_spec: StudySpec
) -> None:
    from stagetune.server.records import RequestAnswer
    from stagetune.server.trial_service import _fingerprint

    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(lora_spec)
        tid = wc.acquire("w1").trial.trial_id
        metrics = objective_metrics(2.0, 3.0, 500.0)
        # What a server killed between its first and its last write leaves behind: the
        # request is recorded, the trial still RUNNING.
        payload = _fingerprint({"worker": "w1", "metrics": metrics})
        server.store.record_request(tid, RequestAnswer("c-9", payload, {}))
        trial = wc.complete(tid, "w1", metrics, request_id="c-9")
        assert trial.state == pb.TRIAL_STATE_COMPLETE
        assert sc.get_study(lora_spec.name).counts.complete == 1
