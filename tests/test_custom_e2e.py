"""A team's own training script tuned end to end: the example HF Trainer fine-tune
(tests/examples/hf_trainer_finetune.py) run by a real `stagetune worker --allow-script`
against a real server, and the worker's lease, hand-back and failure handling around it."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import (
    BudgetSpec,
    FidelitySpec,
    FloatParam,
    ObjectiveSpec,
    StudySpec,
    load_spec_file,
    value_from_proto,
)
from stagetune.server.app import StagetuneServer
from stagetune.trainer.tiny_model import build_tiny_model
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO, start_server

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "tests" / "examples" / "hf_trainer_finetune.py"
PARAMS_LINE = re.compile(r"^finetune: rank (\d+) trial (\d+) params (\{.*\})$", re.M)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    return build_tiny_model(folder, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    """One storage is enough here: what is tested is the worker and the script."""
    srv = start_server(tmp_path, tracking_uri="")
    yield srv
    srv.stop(grace=0)


def example_study(tiny_model: Path, trials: int, processes: int = 1) -> StudySpec:
    spec = load_spec_file(EXAMPLE.with_name("finetune.yaml"))
    return dataclasses.replace(
        spec,
        budget=BudgetSpec(trials, 0),
        fidelity=FidelitySpec(2, 8, 2),  # rungs 2, 4, 8
        # Two objectives the script's evaluation decides, so each rung's ranking is the same
        # on every run (peak memory moves a little from run to run).
        objectives=(
            ObjectiveSpec("eval_loss", "minimize"),
            ObjectiveSpec("perplexity", "minimize"),
        ),
        runner={
            "script": "finetune",
            "processes": processes,
            "training": {"per_device_train_batch_size": 8, "model_name_or_path": str(tiny_model)},
        },
    )


def worker_cli(server: str, study: str, work: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stagetune.cli",
        "worker",
        "--server",
        server,
        "--study",
        study,
        "--worker-id",
        "w-custom",
        "--threads",
        "1",
        "--work-dir",
        str(work),
        "--allow-script",
        f"finetune={EXAMPLE}",
        *extra,
    ]


def test_the_example_script_is_tuned_end_to_end_with_mo_asha_on_two_ranks(
    tracked_server: StagetuneServer, tiny_model: Path, tmp_path: Path
) -> None:
    spec = example_study(tiny_model, trials=3, processes=2)
    with StudyClient(tracked_server.address) as client:
        study, _ = client.create_study(spec)
        done = subprocess.run(
            worker_cli(tracked_server.address, spec.name, tmp_path / "work"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        trials = client.list_trials(spec.name)
        assert client.get_study(spec.name).state == pb.STUDY_STATE_DONE
        front = client.pareto_front(spec.name)
    states = [t.state for t in trials]
    assert len(trials) == 3 and pb.TRIAL_STATE_FAILED not in states, done.stdout
    assert states.count(pb.TRIAL_STATE_COMPLETE) >= 1, done.stdout
    stopped = [t for t in trials if t.state == pb.TRIAL_STATE_STOPPED]
    assert stopped, f"MO-ASHA stopped no trial: {done.stdout}"
    for t in stopped:
        assert re.match(r"stopped at rung [24]: .* on eval_loss, perplexity", t.reason), t.reason
        assert max(r.step for r in t.rungs) < 8
    for t in trials:
        # Every rank of the script printed the params it read: the server's, exactly.
        log = (tmp_path / "work" / spec.name / f"trial-{t.trial_id}" / "trial.log").read_text()
        seen = {int(rank): json.loads(p) for rank, tid, p in PARAMS_LINE.findall(log)}
        assert sorted(seen) == [0, 1], log[-2000:]
        leased = {k: value_from_proto(v) for k, v in t.params.items()}
        assert seen[0] == seen[1] == leased
        if t.state == pb.TRIAL_STATE_COMPLETE:
            assert [r.step for r in t.rungs] == [2, 4, 8]
            loss, perplexity = t.objective_values
            assert 0 < loss < 10 and perplexity == pytest.approx(2.718281828**loss, rel=1e-6)
            assert t.metrics["peak_memory_mb"] > 50 and t.metrics["device_seconds"] > 0
    assert {t.trial_id for t in front.trials} <= {
        t.trial_id for t in trials if t.state == pb.TRIAL_STATE_COMPLETE
    }
    assert front.trials
    tracked_server.tracker.flush()
    mlflow = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    runs = mlflow.search_runs(
        [study.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
    )
    assert len(runs) == 3
    for run in runs:
        assert {"learning_rate", "adam_beta2"} <= set(run.data.params)
        assert mlflow.get_metric_history(run.info.run_id, "eval_loss")


def test_sigterm_hands_a_running_custom_trial_back(
    sqlite_server: StagetuneServer, tiny_model: Path, tmp_path: Path
) -> None:
    spec = example_study(tiny_model, trials=1)
    spec = dataclasses.replace(spec, budget=BudgetSpec(1, 1), fidelity=FidelitySpec(400, 400, 2))
    work = tmp_path / "work"
    with StudyClient(sqlite_server.address) as client:
        client.create_study(spec)
        worker = subprocess.Popen(
            worker_cli(sqlite_server.address, spec.name, work),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 180
        logs: list[Path] = []
        while time.monotonic() < deadline and worker.poll() is None:
            logs = list(work.rglob("trial.log"))
            if logs and "finetune: rank 0" in logs[0].read_text():
                break
            time.sleep(0.2)
        assert logs, "the trial never started"
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=120)
        trials = client.list_trials(spec.name)
    assert worker.returncode == 128 + signal.SIGTERM, out
    first = next(t for t in trials if t.attempt == 1)
    assert first.state == pb.TRIAL_STATE_FAILED
    assert first.reason == "interrupted: worker shutting down"
    assert [t.state for t in trials if t.attempt == 2] == [pb.TRIAL_STATE_WAITING], out


SCRIPTS = {
    # A fake OOM: a real CUDA one needs a GPU. The trial process reports it as such.
    "oom": "import torch\nraise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate')\n",
    "error": "from stagetune.sdk import current_trial\n"
    "raise ValueError(f'bad value {current_trial().params}')\n",
    "silent": "from stagetune.sdk import current_trial\ncurrent_trial()\n",
    "partial": "from stagetune.sdk import current_trial\n"
    "current_trial().complete({'eval_loss': 1.0})\n",
}


@pytest.mark.parametrize(
    ("script", "state", "reason"),
    [
        ("oom", pb.TRIAL_STATE_INFEASIBLE, r"^out of memory: OutOfMemoryError: CUDA out of memory"),
        ("error", pb.TRIAL_STATE_FAILED, r"^crashed: exit code 1: ValueError: bad value \{'lr'"),
        (
            "silent",
            pb.TRIAL_STATE_FAILED,
            r"^crashed: exit code 1: RuntimeError: script silent.py ended without calling complete",
        ),
        ("partial", pb.TRIAL_STATE_FAILED, r"^crashed: runner reported no \['perplexity'\]"),
    ],
)
def test_a_failing_script_fails_its_trial_with_the_reason(
    sqlite_server: StagetuneServer, tmp_path: Path, script: str, state: int, reason: str
) -> None:
    path = tmp_path / f"{script}.py"
    path.write_text(SCRIPTS[script])
    spec = StudySpec(
        name=f"fails-{script}",
        stage="custom",
        search_space=(FloatParam("lr", 1e-4, 1e-2, log=True),),
        objectives=(
            ObjectiveSpec("eval_loss", "minimize"),
            ObjectiveSpec("perplexity", "minimize"),
        ),
        fidelity=FidelitySpec(2, 2, 2),
        budget=BudgetSpec(1, 0),
        runner={"script": script},
    )
    with StudyClient(sqlite_server.address) as client:
        client.create_study(spec)
        outcomes = Worker(
            WorkerSettings(
                server=sqlite_server.address,
                study_name=spec.name,
                worker_id="w-fail",
                threads_per_trial=1,
                work_dir=tmp_path / "work",
                poll_interval=0.2,
                scripts={script: path},
            )
        ).run()
        (trial,) = client.list_trials(spec.name)
    assert [o.outcome for o in outcomes] == ["failed"]
    assert trial.state == state
    assert re.search(reason, trial.reason, re.S), trial.reason
