"""Each lifecycle stage end to end: server + worker (accelerate launch) + MLflow child run
with the stage's quality metric, latency, memory and device-seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import load_spec_file
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO
from tests.test_e2e_lora import tiny_spec, worker
from tests.test_stages import QUALITY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", ["pretrain_proxy", "sft", "dpo", "grpo"])
def test_a_stage_runs_through_server_and_worker_into_mlflow(
    stage: str, tracked_server: StagetuneServer, tmp_path: Path
) -> None:
    spec = tiny_spec(load_spec_file(REPO / "configs" / f"{stage}.yaml"), tmp_path, trials=1)
    with StudyClient(tracked_server.address) as sc:
        study, _ = sc.create_study(spec)
        outcomes = worker(tracked_server, tmp_path, spec.name).run()
        assert [o.outcome for o in outcomes] == ["complete"], outcomes
        assert sc.get_study(spec.name).state == pb.STUDY_STATE_DONE
        (trial,) = sc.list_trials(spec.name)
    quality = QUALITY[stage]
    assert set(spec.metric_names) <= set(trial.metrics)
    tracked_server.tracker.flush()
    client = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    (run,) = client.search_runs(
        [study.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
    )
    assert run.info.status == "FINISHED"
    for key in (quality, "decode_latency_ms", "peak_memory_mb", "device_seconds"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, quality)]
    assert steps == [2, 4, 4]  # both rungs, then the final value
    assert run.data.params  # the trial's sampled params are on the run
