"""A whole lifecycle with real workers and tiny models: pretrain_proxy -> sft -> dpo through a
live server and a real MLflow store. Each stage trains from the weights the previous stage
promoted (checksums equal: what the trial saved, what the registry serves, what the next
stage's trials loaded), the registry holds every version with its lineage, no trial of a
search read the test split and each promoted model was scored on it once, status shows the
eval/test gaps and the device-seconds, a manual stage waits for its approval, and a server
restarted mid-pipeline finishes it."""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient
from stagetune.contract.errors import DeadlineExceeded, Unavailable
from stagetune.contract.pipeline_client import PipelineClient
from stagetune.contract.pipeline_file import pipeline_from_mapping
from stagetune.server.app import StagetuneServer
from stagetune.server.pipeline_records import HELD_OUT_QUALITY
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import types_pb2 as pb
from tests.conftest import start_server

pytestmark = pytest.mark.slow

TINY = {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}
LR = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def study(stage: str, cache: Path, **runner: Any) -> dict[str, Any]:
    """A tiny study: two trials of 2 and 4 steps on 32 synthetic examples."""
    return {
        "stage": stage,
        "search_space": LR,
        "fidelity": {"min_steps": 2, "max_steps": 4, "reduction_factor": 2},
        "budget": {"max_trials": 2, "max_retries": 1},
        "early_stopping": "none",
        "sampler": {"kind": "random", "seed": 3},
        "runner": {
            "data": {"synthetic": "arithmetic", "train_size": 32, "eval_size": 8, "test_size": 8},
            "training": {"per_device_train_batch_size": 4, "max_length": 32},
            "cache_dir": str(cache),
            **runner,
        },
    }


def lifecycle(cache: Path) -> Any:
    previous = {"from": "previous"}
    return pipeline_from_mapping(
        {
            "name": "e2e",
            "budget": {"max_device_hours": 1.0},
            "stages": [
                {
                    "name": "pre",
                    "study": study("pretrain_proxy", cache, model=TINY),
                    "final": {"steps": 4},
                },
                {
                    "name": "sft",
                    "study": study("sft", cache, model=previous),
                    "select": {"best": "eval_loss"},
                },
                {
                    "name": "dpo",
                    "study": study("dpo", cache, model=previous),
                    "select": "manual",
                    "final": {"steps": 4},
                },
            ],
        }
    )


def wait_for(check: Callable[[], bool], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (Unavailable, DeadlineExceeded):
            pass  # the server restarting
        if time.monotonic() > deadline:
            raise TimeoutError("the pipeline never got there")
        time.sleep(0.5)


def weights_sha256(folder: Path) -> str:
    """One checksum over a model folder's weight files."""
    digest = hashlib.sha256()
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no weights in {folder}"
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """Two real workers (each trial in its own ``accelerate launch`` process), started
    against an address once a server is up."""
    running: list[tuple[Worker, threading.Thread]] = []

    def start(address: str) -> None:
        for i in range(2):
            w = Worker(
                WorkerSettings(
                    server=address,
                    worker_id=f"w{i}",
                    threads_per_trial=1,
                    work_dir=tmp_path / f"work{i}",
                    poll_interval=0.2,
                )
            )
            t = threading.Thread(target=w.run, daemon=True)
            t.start()
            running.append((w, t))

    yield start
    for w, _ in running:
        w.stop()
    for _, t in running:
        t.join(timeout=60)


def test_a_lifecycle_promotes_each_stages_model_into_the_next(
    tmp_path: Path, workers: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    server: StagetuneServer = start_server(tmp_path, pipeline_interval=0.2)
    port = server.port
    tracking = server.settings.resolved_tracking_uri()
    # Workers reach the server's MLflow as remote ones would: trials upload the models they
    # save and download the models:/ URIs they start from.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    cache = tmp_path / "cache"
    pipelines = PipelineClient(server.address, timeout=30, retries=8, backoff=0.5)
    try:
        pipelines.submit(lifecycle(cache))
        workers(server.address)
        # Restart the server while the sft stage searches: the pipeline carries on.
        wait_for(lambda: pipelines.get("e2e").stages[1].phase == ps.STAGE_PHASE_SEARCHING)
        server.stop(grace=0)
        server = start_server(tmp_path, port=port, pipeline_interval=0.2)
        # The manual stage waits for a person; they pick the best reward accuracy.
        awaiting = ps.PIPELINE_STATE_AWAITING_APPROVAL
        wait_for(lambda: pipelines.get("e2e").state == awaiting)
        time.sleep(1.0)
        assert pipelines.get("e2e").state == awaiting  # still waiting
        with StudyClient(server.address) as studies:
            done = studies.list_trials("e2e.dpo", [pb.TRIAL_STATE_COMPLETE])
        chosen = max(done, key=lambda t: t.metrics["reward_accuracy"])
        pipelines.approve("e2e", chosen.trial_id)
        wait_for(lambda: pipelines.get("e2e").state == ps.PIPELINE_STATE_DONE)
        p = pipelines.get("e2e")
        with StudyClient(server.address) as studies:
            _check_held_out(p, studies)
    finally:
        pipelines.close()
        server.stop(grace=0)
    pre, sft, dpo = p.stages
    assert dpo.selected_trial_id == chosen.trial_id
    # Each stage's trials loaded exactly the weights the previous stage promoted.
    for previous, stage in ((pre, sft), (sft, dpo)):
        assert stage.base_model == previous.model_uri
        served = _served_weights(previous.model_uri)
        saved = _saved_weights(tmp_path, previous.model_trial_id)
        loaded = _loaded_weights(cache, previous.model_uri)
        assert served == saved == loaded, stage.name
    # The registry holds every version, with its lineage.
    mlflow = MlflowClient(tracking)
    for stage in p.stages:
        tags = mlflow.get_model_version(stage.model_name, stage.model_version).tags
        assert tags["stagetune.pipeline"] == "e2e" and tags["stagetune.stage"] == stage.name
        assert tags["stagetune.trial"] == str(stage.model_trial_id)
        assert tags["stagetune.base_model"] == stage.base_model
        assert tags["stagetune.data.source"] == "synthetic:arithmetic"
        assert "fractions" in tags["stagetune.data.split"]  # recorded by the trial itself


def _check_held_out(p: ps.Pipeline, studies: StudyClient) -> None:
    """No trial but the evaluations read test, each evaluation read only test, and status
    shows every objective on eval and test and what each stage cost."""
    for stage in p.stages:
        for name in (stage.study_name, stage.final_study_name):
            for t in studies.list_trials(name) if name else []:
                assert t.metrics.get("data.test_rows", 0.0) == 0.0, t.trial_id
                assert t.metrics["data.train_rows"] > 0
        (scored,) = studies.list_trials(stage.test_study_name)
        assert scored.metrics["data.test_rows"] > 0
        assert scored.metrics.get("data.train_rows", 0.0) == 0.0
        objectives = [o.metric for o in studies.get_study(stage.study_name).spec.objectives]
        shown = [h.metric for h in stage.held_out]
        assert shown[: len(objectives)] == objectives
        # then the quality metrics that are not objectives: sft's exact match, dpo's margin
        assert set(shown[len(objectives) :]) <= set(HELD_OUT_QUALITY) - set(objectives)
        for h in stage.held_out:
            assert h.test_value == scored.metrics[h.metric]
            assert h.gap == pytest.approx(h.test_value - h.eval_value)
        assert stage.device_seconds > 0
    assert p.device_seconds == pytest.approx(sum(s.device_seconds for s in p.stages))


def _served_weights(uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return weights_sha256(Path(download_artifacts(artifact_uri=uri, dst_path=tmp)))


def _saved_weights(tmp_path: Path, trial_id: int) -> str:
    """What the trial saved on its worker (kept: its study saves models)."""
    (folder,) = [p for p in tmp_path.glob(f"work*/*/trial-{trial_id}/output/model")]
    return weights_sha256(folder)


def _loaded_weights(cache: Path, uri: str) -> str:
    """What the next stage's trials downloaded from ``uri`` and loaded."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = Path((cache / "artifacts" / key / ".complete").read_text())
    return weights_sha256(local)
