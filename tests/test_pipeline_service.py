"""Pipelines through a live server and a real MLflow store: each stage's study runs, its
winner is selected, retrained, registered with its lineage and scored on test, and the next
stage starts from the registered version; manual stages wait for an approval; stop and the
device-hour budget end a pipeline; tenancy as for studies. Trials are completed by
tests/pipeline_driver.py (the worker protocol, no training): the same flow with real
workers and tiny models is tests/test_pipeline_e2e.py."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from stagetune.contract.pipeline import PipelineSpec
from stagetune.contract.pipeline_client import PipelineClient
from stagetune.contract.pipeline_file import pipeline_from_mapping
from stagetune.server.app import StagetuneServer
from stagetune.server.pipeline_records import HELD_OUT_QUALITY
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from tests.conftest import start_server
from tests.pipeline_driver import FakeTrials, default_metrics, folder_sha256

SMALL = {"max_trials": 3, "max_retries": 1}
FIDELITY = {"min_steps": 2, "max_steps": 4, "reduction_factor": 2}


def spec_of(
    name: str,
    data_file: Path,
    only: tuple[str, ...] = ("pre", "sft", "dpo"),
    budget: float | None = None,
    **stages: dict[str, Any],
) -> PipelineSpec:
    """pretrain (knee, retrained) -> sft on a data file (best loss under a limit) -> dpo
    (knee), or the ``only`` stages of it, with ``stages`` changes."""
    later = {"runner": {"model": {"from": "previous"}}, "budget": SMALL, "fidelity": FIDELITY}
    sft_data = {"data": {"path": str(data_file), "train_size": 8, "eval_size": 2}}
    default: dict[str, dict[str, Any]] = {
        "pre": {
            "name": "pre",
            "study": "pretrain_proxy",
            "overrides": {"budget": SMALL, "fidelity": FIDELITY},
            "final": {"steps": 8},
        },
        "sft": {
            "name": "sft",
            "study": "sft",
            "overrides": {**later, "runner": {**later["runner"], **sft_data}},
            "select": {"best": "eval_loss", "limits": ["decode_latency_ms <= 100"]},
        },
        "dpo": {"name": "dpo", "study": "dpo", "overrides": later},
    }
    for key, change in stages.items():
        default[key] = {**default[key], **change}
    data: dict[str, Any] = {"name": name, "stages": [default[k] for k in only]}
    if budget is not None:
        data["budget"] = {"max_device_hours": budget}
    return pipeline_from_mapping(data)


def write_data_file(folder: Path) -> Path:
    path = folder / "instructions.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_data_file(tmp_path)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[StagetuneServer]:
    server = start_server(tmp_path, pipeline_interval=0.1)
    yield server
    server.stop(grace=0)


@pytest.fixture
def pipelines(live: StagetuneServer) -> Iterator[PipelineClient]:
    with PipelineClient(live.address, timeout=10, retries=0) as client:
        yield client


@pytest.fixture
def trials(live: StagetuneServer, tmp_path: Path) -> Iterator[FakeTrials]:
    driver = FakeTrials(live.address, live.settings.resolved_tracking_uri(), tmp_path / "work")
    yield driver
    driver.close()


def state_is(client: PipelineClient, name: str, *states: int) -> Any:
    return lambda: client.get(name).state in states


@dataclass
class Finished:
    """A three-stage pipeline run to its end, once for the tests that read it."""

    server: StagetuneServer
    pipeline: ps.Pipeline
    trials: FakeTrials
    data_file: Path
    mlflow: MlflowClient


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    tmp = tmp_path_factory.mktemp("life")
    server = start_server(tmp, pipeline_interval=0.1)
    uri = server.settings.resolved_tracking_uri()
    driver = FakeTrials(server.address, uri, tmp / "work")
    data = write_data_file(tmp)
    try:
        with PipelineClient(server.address, timeout=10, retries=0) as client:
            submitted, created = client.submit(spec_of("life", data))
            assert created and submitted.stages[0].study_name == "life.pre"  # started at once
            driver.run_until(state_is(client, "life", ps.PIPELINE_STATE_DONE))
            # The pipeline's MLflow run mirrors the status from the pipeline loop's thread.
            mlflow = MlflowClient(uri)
            run_done = lambda: (  # noqa: E731
                client.get("life").mlflow_run_id
                and mlflow.get_run(client.get("life").mlflow_run_id).info.status == "FINISHED"
            )
            driver.run_until(run_done, timeout=30)
            yield Finished(server, client.get("life"), driver, data, mlflow)
    finally:
        driver.close()
        server.stop(grace=0)


def test_each_stage_starts_from_the_model_the_previous_one_promoted(
    finished: Finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a worker: models:/ URIs resolve through the tracking server's registry.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", finished.server.settings.resolved_tracking_uri())
    p = finished.pipeline
    assert [s.phase for s in p.stages] == [ps.STAGE_PHASE_DONE] * 3
    with StudyClient(finished.server.address) as studies:
        for i, stage in enumerate(p.stages):
            name = f"life.{stage.name}"
            assert stage.model_name == name and stage.model_version == "1"
            assert stage.model_uri == f"models:/{name}/1"
            # What models:/ downloads is the model trial's own upload, byte for byte.
            uploaded = finished.trials.models[stage.model_trial_id]
            assert _checksum(stage.model_uri) == uploaded
            if i > 0:  # the next stage's studies start from the promoted version
                previous = p.stages[i - 1].model_uri
                assert stage.base_model == previous
                for study in (stage.study_name, stage.test_study_name):
                    runner = studies.get_study(study).spec.runner
                    assert runner["model"]["name_or_path"] == (
                        previous if study == stage.study_name else stage.model_uri
                    )
        pre, sft, dpo = p.stages
        assert pre.model_trial_id != pre.selected_trial_id  # the retrain's model
        assert pre.final_study_name == "life.pre.final"
        assert sft.model_trial_id == sft.selected_trial_id  # no retrain: its own model
        assert sft.final_study_name == ""
        # The selected sft trial has the lowest loss of those under the limit.
        complete = [
            t for t in studies.list_trials("life.sft") if t.state == pb.TRIAL_STATE_COMPLETE
        ]
        best = min(complete, key=lambda t: t.metrics["eval_loss"])
        assert sft.selected_trial_id == best.trial_id
        # The evaluation of a DPO model measures it against what the stage started from.
        dpo_test = studies.get_study(dpo.test_study_name).spec.runner
        assert dpo_test["evaluate"] == "test"
        assert dpo_test["reference_model"] == {"name_or_path": sft.model_uri}


def test_the_registry_holds_each_version_with_its_lineage(finished: Finished) -> None:
    p = finished.pipeline
    for stage in p.stages:
        (version,) = finished.mlflow.search_model_versions(f"name = '{stage.model_name}'")
        tags = version.tags
        assert tags["stagetune.pipeline"] == "life"
        assert tags["stagetune.stage"] == stage.name
        assert tags["stagetune.study"] == stage.study_name
        assert tags["stagetune.selected_trial"] == str(stage.selected_trial_id)
        assert tags["stagetune.trial"] == str(stage.model_trial_id)
        assert tags["stagetune.base_model"] == stage.base_model
        assert json.loads(tags["stagetune.params"]) == {
            k: getattr(v, v.WhichOneof("kind")) for k, v in stage.selected_params.items()
        }
    pre, sft, dpo = (finished.mlflow.get_model_version(s.model_name, "1").tags for s in p.stages)
    assert pre["stagetune.base_model_version"] == ""  # the configured tiny model
    assert sft["stagetune.base_model_version"] == "1"
    assert pre["stagetune.data.source"] == "synthetic:arithmetic"
    # The data file and its content hash, computed where the trial ran.
    assert sft["stagetune.data.source"] == str(finished.data_file)
    assert (
        sft["stagetune.data.sha256"] == hashlib.sha256(finished.data_file.read_bytes()).hexdigest()
    )


def _checksum(uri: str) -> str:
    """The checksum of the model files an artifact URI (runs:/, models:/) downloads."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifacts(artifact_uri=uri, dst_path=tmp)
        return folder_sha256(Path(local))


def test_status_shows_each_objective_on_eval_and_test_and_the_cost(finished: Finished) -> None:
    p = finished.pipeline
    with StudyClient(finished.server.address) as studies:
        for stage in p.stages:
            (test_trial,) = studies.list_trials(stage.test_study_name)
            model_trial = next(
                t
                for name in (stage.study_name, stage.final_study_name)
                if name
                for t in studies.list_trials(name)
                if t.trial_id == stage.model_trial_id
            )
            objectives = [o.metric for o in studies.get_study(stage.study_name).spec.objectives]
            # Objectives first, then the quality metrics both runs reported (the driver
            # reports every stage's metrics), each once.
            shown = [h.metric for h in stage.held_out]
            assert shown[: len(objectives)] == objectives
            assert shown[len(objectives) :] == [
                m
                for m in HELD_OUT_QUALITY
                if m not in objectives and m in model_trial.metrics and m in test_trial.metrics
            ]
            for h in stage.held_out:
                assert h.eval_value == model_trial.metrics[h.metric]
                assert h.test_value == test_trial.metrics[h.metric]
                assert h.gap == pytest.approx(h.test_value - h.eval_value)
            # Every trial of the stage reported 3 device-seconds: search, retrain, test.
            n = sum(
                len(studies.list_trials(name))
                for name in (stage.study_name, stage.final_study_name, stage.test_study_name)
                if name
            )
            assert stage.device_seconds == pytest.approx(3.0 * n)
    loss = next(h for h in p.stages[1].held_out if h.metric == "eval_loss")
    assert loss.gap == pytest.approx(0.25)  # default_metrics: test loss is 0.25 worse
    assert p.device_seconds == pytest.approx(sum(s.device_seconds for s in p.stages))


def test_the_pipelines_mlflow_run_shows_the_same(finished: Finished) -> None:
    p = finished.pipeline
    run = finished.mlflow.get_run(p.mlflow_run_id)
    assert run.data.tags["state"] == "done" and run.info.status == "FINISHED"
    assert run.data.metrics["device_seconds"] == pytest.approx(p.device_seconds)
    assert run.data.metrics["sft.eval_loss.gap"] == pytest.approx(0.25)
    assert run.data.metrics["dpo.device_seconds"] == pytest.approx(p.stages[2].device_seconds)
    assert run.data.tags["dpo.model"] == "models:/life.dpo/1"
    with tempfile.TemporaryDirectory() as tmp:
        path = finished.mlflow.download_artifacts(run.info.run_id, "status.json", tmp)
        status = json.loads(Path(path).read_text())
    assert [s["model_uri"] for s in status["stages"]] == [s.model_uri for s in p.stages]
    assert [s["held_out"][0]["gap"] for s in status["stages"]] == [
        s.held_out[0].gap for s in p.stages
    ]


def test_a_manual_stage_waits_for_a_persons_approval(
    live: StagetuneServer, pipelines: PipelineClient, trials: FakeTrials, data_file: Path
) -> None:
    spec = spec_of("manual", data_file, ("pre",), pre={"select": "manual", "final": {"steps": 8}})
    pipelines.submit(spec)
    trials.run_until(state_is(pipelines, "manual", ps.PIPELINE_STATE_AWAITING_APPROVAL))
    p = pipelines.get("manual")
    assert p.stages[0].phase == ps.STAGE_PHASE_AWAITING_APPROVAL
    assert not trials.step()  # nothing to run while it waits
    with StudyClient(live.address) as studies:
        search = studies.list_trials("manual.pre")
    complete = [t for t in search if t.state == pb.TRIAL_STATE_COMPLETE]
    worst = max(complete, key=lambda t: t.metrics["eval_loss"])  # a person's own reasons
    # Another study's trial and no trial at all are refused alike, naming the field.
    for wrong in (_trial_of_other_study(live), 999_999):
        with pytest.raises(InvalidArgument) as err:
            pipelines.approve("manual", wrong)
        assert (
            err.value.field == "trial_id" and "not a trial of study manual.pre" in err.value.message
        )
    approved = pipelines.approve("manual", worst.trial_id)
    assert approved.state == ps.PIPELINE_STATE_RUNNING
    assert approved.stages[0].selected_trial_id == worst.trial_id
    with pytest.raises(FailedPrecondition):
        pipelines.approve("manual", worst.trial_id)  # nothing waits any more
    trials.run_until(state_is(pipelines, "manual", ps.PIPELINE_STATE_DONE))
    final = pipelines.get("manual").stages[0]
    assert final.selected_trial_id == worst.trial_id
    assert {k: getattr(v, v.WhichOneof("kind")) for k, v in final.selected_params.items()} == {
        k: getattr(v, v.WhichOneof("kind")) for k, v in worst.params.items()
    }


def _trial_of_other_study(live: StagetuneServer) -> int:
    """A complete trial of a study no pipeline owns."""
    with StudyClient(live.address) as studies, WorkerClient(live.address) as workers:
        spec = (
            pipeline_from_mapping({"name": "other", "stages": [{"name": "x", "study": "sft"}]})
            .stages[0]
            .study
        )
        studies.create_study(spec)
        got = workers.acquire("w-other", study_name=spec.name)
        assert isinstance(got, ws.Assignment)
        workers.complete(got.trial.trial_id, "w-other", default_metrics(spec, {}))
        return int(got.trial.trial_id)


def test_stop_ends_the_pipeline_and_its_running_study(
    live: StagetuneServer, pipelines: PipelineClient, trials: FakeTrials, data_file: Path
) -> None:
    pipelines.submit(spec_of("halted", data_file, ("pre",)))
    with WorkerClient(live.address) as workers:
        held = workers.acquire("w-slow")
        assert isinstance(held, ws.Assignment)
        stopped = pipelines.stop("halted")
        assert stopped.state == ps.PIPELINE_STATE_STOPPED and "by a user" in stopped.reason
        assert stopped.stages[0].phase == ps.STAGE_PHASE_STOPPED
        assert workers.heartbeat(held.trial.trial_id, "w-slow")  # told to stop
        assert isinstance(workers.acquire("w-new"), ws.NoTrial)
    assert pipelines.stop("halted").state == ps.PIPELINE_STATE_STOPPED  # again: no-op


def test_the_device_hour_budget_stops_handing_out_trials_exactly(
    live: StagetuneServer, pipelines: PipelineClient, trials: FakeTrials, data_file: Path
) -> None:
    # 10 device-seconds; each trial reports 3: the fifth trial is never handed out.
    budget = {"overrides": {"budget": {"max_trials": 9}, "fidelity": FIDELITY}}
    pipelines.submit(spec_of("frugal", data_file, ("pre",), budget=10 / 3600, pre=budget))
    trials.run_until(state_is(pipelines, "frugal", ps.PIPELINE_STATE_STOPPED))
    p = pipelines.get("frugal")
    assert "device budget spent" in p.reason
    assert p.device_seconds == pytest.approx(12.0)
    assert len(trials.handed) == 4  # 3 + 3 + 3 < 10: a fourth; 12 >= 10: no fifth
    with StudyClient(live.address) as studies:
        study = studies.get_study("frugal.pre")
    assert study.state == pb.STUDY_STATE_DONE
    assert study.spec.budget.max_device_hours == pytest.approx(10 / 3600)
    assert p.stages[0].final_study_name == ""  # nothing left for the retrain


def test_submitting_is_idempotent_and_names_are_not_taken_twice(
    live: StagetuneServer, pipelines: PipelineClient, data_file: Path
) -> None:
    spec = spec_of("same", data_file)
    first, created = pipelines.submit(spec)
    again, created_again = pipelines.submit(spec)
    assert created and not created_again
    assert again.spec == first.spec
    other = spec_of("same", data_file, pre={"final": {"steps": 16}})
    with pytest.raises(AlreadyExists):
        pipelines.submit(other)
    with StudyClient(live.address) as studies:
        studies.create_study(spec_of("taken", data_file).stages[0].study)
    with pytest.raises(AlreadyExists, match="taken.pre"):
        pipelines.submit(spec_of("taken", data_file))
    with pytest.raises(NotFound):
        pipelines.get("taken")  # nothing was made
    assert [p.spec.name for p in pipelines.list()] == ["same"]


def test_a_server_without_tracking_refuses_pipelines(tmp_path: Path, data_file: Path) -> None:
    server = start_server(tmp_path, tracking_uri="")
    try:
        with (
            PipelineClient(server.address, retries=0) as client,
            pytest.raises(FailedPrecondition, match="tracking"),
        ):
            client.submit(spec_of("untracked", data_file))
    finally:
        server.stop(grace=0)


@pytest.mark.postgres
def test_a_pipeline_runs_on_postgresql(tmp_path: Path, postgres_url: str, data_file: Path) -> None:
    server = start_server(tmp_path, storage_url=postgres_url, pipeline_interval=0.1)
    uri = server.settings.resolved_tracking_uri()
    driver = FakeTrials(server.address, uri, tmp_path / "work")
    try:
        with PipelineClient(server.address) as pipelines:
            pipelines.submit(spec_of("pg", data_file, ("pre", "sft")))
            driver.run_until(state_is(pipelines, "pg", ps.PIPELINE_STATE_DONE))
            pre, sft = pipelines.get("pg").stages
        assert sft.base_model == pre.model_uri == "models:/pg.pre/1"
        assert [h.metric for h in sft.held_out] == [
            "eval_loss",
            "decode_latency_ms",
            "peak_memory_mb",
            "reward_accuracy",  # the driver reports it for every stage
        ]
    finally:
        driver.close()
        server.stop(grace=0)
