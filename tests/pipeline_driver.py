"""Trials for pipeline tests that follow the worker protocol without training: acquire,
report, and complete with metrics computed from the params, and for a trial that saves its
model, a folder of random bytes logged into its MLflow run by the real upload code
(``stagetune.trainer.model_upload``). For the pipeline's control flow (selection,
promotion, restarts, budgets) through a real server, client and MLflow store, in seconds;
tests/test_pipeline_e2e.py runs the same flow with real workers and tiny models."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from stagetune.contract.client import WorkerClient
from stagetune.contract.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from stagetune.contract.spec import StudySpec, parse_runner, spec_from_proto, value_from_proto
from stagetune.trainer.assignment import Assignment
from stagetune.trainer.model_upload import upload_saved_model
from stagetune.v1 import worker_service_pb2 as ws

Params = dict[str, float | int | str | bool]
MetricsOf = Callable[[StudySpec, Params], dict[str, float]]


def default_metrics(spec: StudySpec, params: Params) -> dict[str, float]:
    """Every objective of every stage, from the params (a lower learning rate: a lower
    loss); an evaluation on test comes out 0.25 worse in loss and 0.1 in accuracy."""
    lr = float(params.get("learning_rate", 0.01))
    testing = spec.runner.get("evaluate") == "test"
    return {
        "eval_loss": 1.0 + 10 * lr + (0.25 if testing else 0.0),
        "decode_latency_ms": 2.0 + lr,
        "peak_memory_mb": 100.0,
        "reward_accuracy": 0.9 - 5 * lr - (0.1 if testing else 0.0),
        "device_seconds": 3.0,
    }


def folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.read_bytes())
    return digest.hexdigest()


class FakeTrials:
    """Completes trials handed out by the server at ``address`` (see the module)."""

    def __init__(
        self,
        address: str,
        tracking_uri: str,
        folder: Path,
        metrics: MetricsOf = default_metrics,
        worker_id: str = "w-fake",
        token: str | None = None,
    ) -> None:
        self.client = WorkerClient(address, timeout=10, retries=8, backoff=0.25, token=token)
        self.tracking_uri = tracking_uri
        self.folder = folder
        self.metrics = metrics
        self.worker_id = worker_id
        self.models: dict[int, str] = {}  # trial id -> checksum of the model it logged
        self.handed: list[int] = []  # ids of the trials handed out
        self.ran: list[tuple[str, Params]] = []  # (study, params) of each completed trial

    def close(self) -> None:
        self.client.close()

    def step(self) -> bool:
        """Run one trial if the server hands one out; False when it has none now."""
        got = self.client.acquire(self.worker_id)
        if isinstance(got, ws.NoTrial):
            return False
        spec = spec_from_proto(got.spec)
        trial = got.trial
        params: Params = {k: value_from_proto(v) for k, v in trial.params.items()}
        metrics = self.metrics(spec, params)
        self.handed.append(trial.trial_id)
        try:
            decision = self.client.report_progress(
                trial.trial_id, self.worker_id, got.rung_steps[0], metrics
            )
            if decision.stop:  # early stopping, or the study was stopped
                return True
            if spec.runner.get("save_model"):
                self._save_model(spec, got, params)
            self.client.complete(trial.trial_id, self.worker_id, metrics)
        except (FailedPrecondition, NotFound):
            return True  # lost: the server moved on
        self.ran.append((spec.name, params))
        return True

    def _save_model(self, spec: StudySpec, got: ws.Assignment, params: Params) -> None:
        trial = got.trial
        out = self.folder / f"trial-{trial.trial_id}"
        model = out / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "model.safetensors").write_bytes(os.urandom(256))
        (model / "config.json").write_text('{"model_type": "fake"}')
        a = Assignment(
            trial_id=trial.trial_id,
            study_name=trial.study_name,
            number=trial.number,
            attempt=trial.attempt,
            stage=spec.stage,
            params=params,
            runner=spec.runner,
            rung_steps=list(got.rung_steps),
            objectives=spec.metric_names,
            output_dir=str(out),
            result_path=str(out / "result.json"),
        )
        runner = parse_runner(spec.stage, spec.runner, params)
        upload_saved_model(a, runner, model, tracking_uri=self.tracking_uri, wait_seconds=20)
        self.models[trial.trial_id] = folder_sha256(model)

    def run_until(
        self,
        done: Callable[[], bool],
        timeout: float = 120.0,
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        """Run trials until ``done()``; fail after ``timeout`` seconds. While ``hold()``,
        run none (a test holds the pipeline in a phase it wants to interrupt)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not get there in time")
            if hold():
                time.sleep(0.05)
                continue
            try:
                if not self.step():
                    time.sleep(0.05)
            except (Unavailable, DeadlineExceeded):
                time.sleep(0.2)  # a server restarting, or too busy to answer in time
