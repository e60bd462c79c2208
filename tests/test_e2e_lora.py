"""Real tiny LoRA trials end to end: server + worker (accelerate launch) + MLflow."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import BudgetSpec, FidelitySpec, StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import types_pb2 as pb

pytestmark = pytest.mark.slow


def tiny_spec(spec: StudySpec, tmp_path: Path, trials: int, **runner: object) -> StudySpec:
    return dataclasses.replace(
        spec,
        budget=BudgetSpec(trials, 0),
        fidelity=FidelitySpec(2, 4, 2),
        runner={
            "model": {
                "tiny": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                }
            },
            "data": {"synthetic": "arithmetic", "train_size": 32, "eval_size": 8},
            "training": {"per_device_train_batch_size": 4, "max_length": 32},
            "cache_dir": str(tmp_path / "cache"),
            **runner,
        },
    )


def worker(server: StagetuneServer, tmp_path: Path, study: str) -> Worker:
    return Worker(
        WorkerSettings(
            server=server.address,
            study_name=study,
            threads_per_trial=1,
            work_dir=tmp_path / "work",
            worker_id="w-test",
            poll_interval=0.2,
        )
    )


def test_tiny_lora_trials_land_in_mlflow_with_real_objectives(
    tracked_server: StagetuneServer, lora_spec: StudySpec, tmp_path: Path
) -> None:
    spec = tiny_spec(lora_spec, tmp_path, trials=2)
    with StudyClient(tracked_server.address) as sc:
        study, _ = sc.create_study(spec)
        outcomes = worker(tracked_server, tmp_path, spec.name).run()
        assert [o.outcome for o in outcomes] == ["complete", "complete"]
        assert sc.get_study(spec.name).state == pb.STUDY_STATE_DONE
        front = sc.pareto_front(spec.name)
    assert front.trials
    for t in front.trials:
        loss, latency, memory = t.objective_values
        assert 0 < loss < 10 and 0 < latency < 1000 and memory > 50
        assert t.metrics["device_seconds"] > 0
    tracked_server.tracker.flush()
    client = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    children = client.search_runs(
        [study.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
    )
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["pareto_front"] in ("true", "false")
        assert run.data.tags["worker"] == "w-test"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")]
        assert steps == [2, 4, 4]  # rungs 2 and 4, then the final value at the full budget
        assert {"decode_latency_ms", "peak_memory_mb", "device_seconds"} <= set(run.data.metrics)
    assert sum(r.data.tags["pareto_front"] == "true" for r in children) == len(front.trials)


def trial_run_id(srv: StagetuneServer, study: str, trial_id: int) -> str:
    with StudyClient(srv.address) as sc:
        (trial,) = (t for t in sc.list_trials(study) if t.trial_id == trial_id)
    return trial.mlflow_run_id


def test_the_worker_survives_a_trial_that_errors(
    tracked_server: StagetuneServer, lora_spec: StudySpec, tmp_path: Path
) -> None:
    spec = tiny_spec(lora_spec, tmp_path, trials=2)
    spec = dataclasses.replace(
        spec, runner={**spec.runner, "model": {"name_or_path": str(tmp_path / "no-such-model")}}
    )
    with StudyClient(tracked_server.address) as sc:
        sc.create_study(spec)
        outcomes = worker(tracked_server, tmp_path, spec.name).run()
        trials = sc.list_trials(spec.name)
    assert [o.outcome for o in outcomes] == ["failed", "failed"]
    assert all(t.state == pb.TRIAL_STATE_FAILED for t in trials)
    assert "crashed" in trials[0].reason and "no-such-model" in trials[0].reason
    # The headline names the Python error, not only the exit code; `stagetune logs` prints
    # the whole reason, with the end of the trial's log, from any machine.
    headline = trials[0].reason.splitlines()[0]
    assert re.match(r"crashed: exit code 1: \w+(Error|Exception): .*no-such-model", headline)
    logs = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "logs", spec.name, str(trials[0].trial_id)]
        + ["--server", tracked_server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert logs.returncode == 0, logs.stderr
    assert headline in logs.stdout and "--- trial log (end) ---" in logs.stdout
    # The same is kept with the trial's MLflow run, for whoever reviews the study there.
    tracked_server.tracker.flush(timeout=60)
    mlflow = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    run = mlflow.get_run(trial_run_id(tracked_server, spec.name, trials[0].trial_id))
    assert run.data.tags["reason"] == headline
    text = Path(
        mlflow.download_artifacts(run.info.run_id, "failure.log", str(tmp_path))
    ).read_text()
    assert text.startswith(headline) and "--- trial log (end) ---" in text


def test_the_worker_survives_a_trial_process_killed_by_sigkill(
    tracked_server: StagetuneServer, lora_spec: StudySpec, tmp_path: Path
) -> None:
    # Long enough (rungs 2, 20, 200) that the first trial is still training when killed:
    # a warm tiny trial of 4 steps is over in about a second.
    spec = dataclasses.replace(
        tiny_spec(lora_spec, tmp_path, trials=2), fidelity=FidelitySpec(2, 200, 10)
    )
    with StudyClient(tracked_server.address) as sc:
        sc.create_study(spec)
        w = worker(tracked_server, tmp_path, spec.name)
        runner = threading.Thread(target=w.run)
        runner.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(t.rungs for t in sc.list_trials(spec.name)):
            time.sleep(0.05)  # until the first trial has trained and reported its first rung
        child = w._child
        assert child is not None, "no trial process running"
        os.killpg(child.pid, signal.SIGKILL)  # as the kernel's OOM killer would
        runner.join(timeout=240)
        assert not runner.is_alive()
        trials = sc.list_trials(spec.name)
    assert [o.outcome for o in w.outcomes] == ["failed", "complete"]
    assert "killed by SIGKILL" in trials[0].reason
    assert trials[1].state == pb.TRIAL_STATE_COMPLETE
