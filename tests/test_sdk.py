"""stagetune.sdk and StagetuneCallback as a team's training process uses them, against a
real server: the leased params, rung reports answered by MO-ASHA on several objectives, a
stop that every rank obeys, and the result file the worker turns into CompleteTrial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import spec_from_mapping, value_from_proto
from stagetune.integrations.transformers import StagetuneCallback
from stagetune.sdk import ASSIGNMENT_ENV, NoTrial, Trial, current_trial, in_trial
from stagetune.server.app import StagetuneServer
from stagetune.trainer.assignment import Assignment, TrialResult
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO

STUDY = {
    "name": "own-code",
    "stage": "custom",
    "search_space": {
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "adam_beta2": {"type": "float", "low": 0.9, "high": 0.999},
    },
    # Two objectives: Optuna's trial.report refuses such a study; stagetune's must not.
    "objectives": ["eval_loss", "peak_memory_mb"],
    "fidelity": {"min_steps": 2, "max_steps": 8, "reduction_factor": 2},  # rungs 2, 4, 8
    "budget": {"max_trials": 4, "max_retries": 0},
    "runner": {"script": "finetune", "training": {"per_device_train_batch_size": 8}},
}


@pytest.fixture
def study(server: StagetuneServer) -> str:
    with StudyClient(server.address) as client:
        client.create_study(spec_from_mapping(STUDY))
    return str(STUDY["name"])


def lease(server: StagetuneServer, folder: Path) -> Path:
    """Acquire a trial and write its assignment file, as a worker (one per folder) does."""
    worker = f"w-{folder.name}"
    with WorkerClient(server.address) as client:
        got = client.acquire(worker, scripts=["finetune"])  # as a worker that allows it
    trial = got.trial
    folder.mkdir(parents=True)
    a = Assignment(
        trial_id=trial.trial_id,
        study_name=trial.study_name,
        number=trial.number,
        attempt=trial.attempt,
        stage="custom",
        params={k: value_from_proto(v) for k, v in trial.params.items()},
        runner=dict(STUDY["runner"]),  # type: ignore[call-overload]
        rung_steps=list(got.rung_steps),
        objectives=list(STUDY["objectives"]),  # type: ignore[call-overload]
        output_dir=str(folder / "output"),
        result_path=str(folder / "result.json"),
        server=server.address,
        worker_id=worker,
    )
    a.write(folder / "assignment.json")
    return folder / "assignment.json"


def trial_at(path: Path, monkeypatch: pytest.MonkeyPatch) -> Trial:
    monkeypatch.setenv(ASSIGNMENT_ENV, str(path))
    return current_trial()


def server_trial(server: StagetuneServer, trial_id: int) -> pb.Trial:
    with StudyClient(server.address) as client:
        return next(t for t in client.list_trials(str(STUDY["name"])) if t.trial_id == trial_id)


def test_outside_a_worker_there_is_no_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ASSIGNMENT_ENV, raising=False)
    assert not in_trial()
    with pytest.raises(NoTrial, match="--allow-script"):
        current_trial()


def test_the_trial_gives_the_leased_params_the_fixed_values_and_the_budget(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = trial_at(lease(server, tmp_path / "t"), monkeypatch)
    leased = server_trial(server, trial.trial_id)
    assert dict(trial.params) == {k: value_from_proto(v) for k, v in leased.params.items()}
    assert set(trial.params) == {"learning_rate", "adam_beta2"}
    assert dict(trial.settings) == {**trial.params, "per_device_train_batch_size": 8}
    assert trial.rung_steps == (2, 4, 8) and trial.max_steps == 8
    assert trial.objectives == ("eval_loss", "peak_memory_mb")
    assert current_trial() is trial  # read once


def test_reports_reach_the_server_and_complete_writes_what_the_worker_sends(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = trial_at(lease(server, tmp_path / "t"), monkeypatch)
    for step, loss in [(2, 3.0), (4, 2.5)]:
        assert not trial.report(step, {"eval_loss": loss}).stop
    trial.complete({"eval_loss": 2.0})
    trial.complete({"exact_match": 0.25})  # a later call adds to the first
    rungs = server_trial(server, trial.trial_id).rungs
    assert [(r.step, r.metrics["eval_loss"]) for r in rungs] == [(2, 3.0), (4, 2.5)]
    # Memory and cost are measured for the script when it gives none of its own.
    assert all(r.metrics["peak_memory_mb"] > 10 and r.metrics["device_seconds"] > 0 for r in rungs)
    result = TrialResult.read(tmp_path / "t" / "result.json")
    assert result.status == "complete"
    assert result.metrics["eval_loss"] == 2.0 and result.metrics["exact_match"] == 0.25
    assert set(trial.objectives) <= set(result.metrics)
    assert [r["step"] for r in result.rungs] == [2, 4]


def test_mo_asha_stops_a_dominated_trial_and_the_stop_is_final(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = trial_at(lease(server, tmp_path / "good"), monkeypatch)
    assert not good.report(2, {"eval_loss": 1.0, "peak_memory_mb": 100.0}).stop
    bad = trial_at(lease(server, tmp_path / "bad"), monkeypatch)
    decision = bad.report(2, {"eval_loss": 5.0, "peak_memory_mb": 200.0})
    assert decision.stop
    assert "stopped at rung 2" in decision.reason and "eval_loss, peak_memory_mb" in decision.reason
    assert server_trial(server, bad.trial_id).state == pb.TRIAL_STATE_STOPPED
    # Later calls answer the same without asking the server, and complete does nothing.
    assert bad.report(4, {"eval_loss": 0.1}) == decision == bad.stopped
    bad.complete({"eval_loss": 0.1, "peak_memory_mb": 1.0})
    result = TrialResult.read(tmp_path / "bad" / "result.json")
    assert (result.status, result.reason) == ("stopped", decision.reason)
    assert [r.step for r in server_trial(server, bad.trial_id).rungs] == [2]


def test_every_rank_gets_rank_0s_decision_and_only_rank_0_reports(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = trial_at(lease(server, tmp_path / "good"), monkeypatch)
    assert not good.report(2, {"eval_loss": 1.0, "peak_memory_mb": 100.0}).stop
    path = lease(server, tmp_path / "bad")
    # Two processes of one trial without torch.distributed: the answer travels by file.
    code = (
        "import json, os\n"
        "from stagetune.sdk import current_trial\n"
        "t = current_trial()\n"
        "loss = 5.0 if t.rank == 0 else 0.01\n"
        "d = t.report(2, {'eval_loss': loss, 'peak_memory_mb': 200.0})\n"
        "print(json.dumps({'rank': t.rank, 'params': dict(t.params), 'stop': d.stop}))\n"
    )
    env = {**os.environ, ASSIGNMENT_ENV: str(path), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in (1, 0)  # rank 1 first: it waits for rank 0's answer
    ]
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    assert outputs[0]["stop"] and outputs[1]["stop"]
    assert outputs[0]["params"] == outputs[1]["params"]
    (rung,) = server_trial(server, Assignment.read(path).trial_id).rungs
    assert rung.metrics["eval_loss"] == 5.0  # rank 0's metrics; rank 1 sent nothing


def _state(step: int, max_steps: int = 8) -> TrainerState:
    return TrainerState(global_step=step, max_steps=max_steps)


def test_the_callback_evaluates_at_rungs_reports_and_completes_at_the_budget(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = trial_at(lease(server, tmp_path / "t"), monkeypatch)
    callback = StagetuneCallback(trial)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    control = TrainerControl()
    callback.on_train_begin(args, _state(0), control)
    for step in range(1, 9):
        control = callback.on_step_end(args, _state(step), TrainerControl())
        assert control.should_evaluate == (step in (2, 4, 8))
        if control.should_evaluate:
            evaluation = {"eval_loss": 4.0 / step, "eval_exact_match": step / 10, "epoch": 0.5}
            control = callback.on_evaluate(args, _state(step), control, metrics=evaluation)
            assert control.should_training_stop == (step == 8)  # 8: the budget is spent
    callback.on_train_end(args, _state(8), control)
    result = TrialResult.read(tmp_path / "t" / "result.json")
    assert result.status == "complete"
    assert result.metrics["eval_loss"] == 0.5 and result.metrics["exact_match"] == 0.8
    assert result.metrics["perplexity"] == pytest.approx(1.6487, rel=1e-4)
    assert [r.step for r in server_trial(server, trial.trial_id).rungs] == [2, 4, 8]


def test_the_callback_stops_the_trainer_when_the_server_says_so(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = trial_at(lease(server, tmp_path / "good"), monkeypatch)
    good.report(2, {"eval_loss": 1.0, "peak_memory_mb": 100.0})
    callback = StagetuneCallback(trial_at(lease(server, tmp_path / "bad"), monkeypatch))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    control = callback.on_evaluate(
        args, _state(2), TrainerControl(), metrics={"eval_loss": 9.0, "peak_memory_mb": 900.0}
    )
    assert control.should_training_stop
    callback.on_train_end(args, _state(2), control)  # completes nothing after a stop
    assert TrialResult.read(tmp_path / "bad" / "result.json").status == "stopped"


def test_the_callback_refuses_a_trainer_that_would_end_before_the_budget(
    server: StagetuneServer, study: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    callback = StagetuneCallback(trial_at(lease(server, tmp_path / "t"), monkeypatch))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(ValueError, match=r"max_steps=trial.max_steps"):
        callback.on_train_begin(args, _state(0, max_steps=4), TrainerControl())
