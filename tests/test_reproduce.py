"""Every trial logs its seed and its data's overlap, and ``stagetune reproduce`` re-runs a
trial from what the server recorded: a real server, a real worker (accelerate launch), a
real MLflow store, and the CLI as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.cli.reproduce import TIMING_METRICS, compare_metrics
from stagetune.contract.client import StudyClient
from stagetune.contract.spec import ConstraintSpec, StudySpec, load_spec_file
from stagetune.server.app import StagetuneServer
from stagetune.trainer.assignment import TrialResult
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import types_pb2 as pb
from tests.conftest import REPO
from tests.test_e2e_lora import tiny_spec


def run_study(server: StagetuneServer, tmp_path: Path, spec: StudySpec) -> pb.Trial:
    """Submit ``spec`` (one trial), run it with a worker that keeps its outputs."""
    with StudyClient(server.address) as client:
        client.create_study(spec)
        settings = WorkerSettings(
            server=server.address,
            study_name=spec.name,
            threads_per_trial=1,
            work_dir=tmp_path / "work",
            worker_id="w-test",
            poll_interval=0.2,
            keep_outputs=True,
        )
        Worker(settings).run()
        (trial,) = client.list_trials(spec.name)
    return trial


def reproduce(server: StagetuneServer, tmp_path: Path, study: str, trial_id: int) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "reproduce", study, str(trial_id)]
        + ["--server", server.address, "--work-dir", str(tmp_path / "again"), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def verdicts(output: str) -> dict[tuple[str, str], str]:
    """(metric, step) -> verdict, from the table ``reproduce`` prints."""
    out = {}
    for line in output.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[1] in {"final"} | {str(s) for s in range(1, 100)}:
            out[(cells[0], cells[1])] = " ".join(cells[5:])
    return out


@pytest.mark.slow
def test_a_trial_logs_its_seed_and_overlap_and_reproduce_matches_it_exactly(
    tracked_server: StagetuneServer, tmp_path: Path
) -> None:
    spec = tiny_spec(load_spec_file(REPO / "configs" / "sft.yaml"), tmp_path, trials=1)
    trial = run_study(tracked_server, tmp_path, spec)
    assert trial.state == pb.TRIAL_STATE_COMPLETE, trial.reason
    # The seed the worker gave the trial (sampler seed 7 + trial number 0), at every rung
    # and at the end, and the data record: overlap between the splits, rows read per split.
    assert trial.metrics["seed"] == 7 and [r.metrics["seed"] for r in trial.rungs] == [7, 7]
    assert trial.metrics["overlap.eval_vs_train.fraction"] == 0.0
    assert trial.metrics["overlap.test_vs_train.fraction"] == 0.0
    assert (trial.metrics["data.train_rows"], trial.metrics["data.eval_rows"]) == (32, 8)
    assert "data.test_rows" not in trial.metrics  # a training trial never reads test
    output = Path(tmp_path / "work" / spec.name / f"trial-{trial.trial_id}" / "output")
    record = json.loads((output / "data-rank-0.json").read_text())
    assert sorted(record["read"]) == ["eval", "train"]

    tracked_server.tracker.flush()
    client = MlflowClient(tracked_server.settings.resolved_tracking_uri())
    run = client.get_run(trial.mlflow_run_id)
    assert run.data.metrics["seed"] == 7
    assert run.data.metrics["overlap.eval_vs_train.fraction"] == 0.0

    printed = reproduce(tracked_server, tmp_path, spec.name, trial.trial_id)
    found = verdicts(printed)
    for step in ("2", "4", "final"):
        assert found[("eval_loss", step)] == "exact", printed
        assert found[("perplexity", step)] == "exact", printed
    assert found[("exact_match", "final")] == "exact"
    assert found[("seed", "final")] == "exact"
    assert found[("decode_latency_ms", "final")] == "not compared"
    compared = re.search(r"(\d+) compared: (\d+) exact", printed)
    assert compared is not None and compared.group(1) == compared.group(2), printed


@pytest.mark.slow
def test_a_trial_stopped_at_a_rung_is_reproduced_up_to_that_rung(
    tracked_server: StagetuneServer, tmp_path: Path
) -> None:
    spec = tiny_spec(load_spec_file(REPO / "configs" / "sft.yaml"), tmp_path, trials=1)
    # No tiny model reaches this loss: the server stops the trial at its first rung.
    spec = dataclasses.replace(
        spec, name="stopped-sft", constraints=(ConstraintSpec("eval_loss", max=1e-3),)
    )
    trial = run_study(tracked_server, tmp_path, spec)
    assert [r.step for r in trial.rungs] == [2] and trial.state != pb.TRIAL_STATE_COMPLETE
    printed = reproduce(tracked_server, tmp_path, spec.name, trial.trial_id)
    assert "stopped at 2" in printed and "re-run stopped" in printed
    found = verdicts(printed)
    assert found[("eval_loss", "2")] == "exact" and ("eval_loss", "4") not in found


def test_timing_is_shown_but_not_compared_and_a_changed_loss_differs() -> None:
    trial = pb.Trial(state=pb.TRIAL_STATE_COMPLETE)
    trial.metrics.update({"eval_loss": 2.0, "decode_latency_ms": 1.0, "exact_match": 0.5})
    rerun = TrialResult("complete", metrics={"eval_loss": 2.0 + 1e-7, "decode_latency_ms": 9.0})
    rows = {c.metric: c for c in compare_metrics(trial, rerun, rtol=1e-6)}
    assert rows["eval_loss"].verdict == "within tolerance"
    assert (
        rows["decode_latency_ms"].verdict == "not compared" and not rows["decode_latency_ms"].failed
    )
    assert rows["exact_match"].verdict == "MISSING" and rows["exact_match"].failed
    rows = {c.metric: c for c in compare_metrics(trial, rerun, rtol=1e-9, atol=0)}
    assert rows["eval_loss"].verdict == "DIFFERS"
    assert "decode_latency_ms" in TIMING_METRICS
