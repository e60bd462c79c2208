"""MLflow as the review surface: a real MLflow store in tmp_path behind a live server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from tests.conftest import objective_metrics, start_server


def _runs(server: StagetuneServer) -> tuple[MlflowClient, list, list]:  # type: ignore[type-arg]
    server.tracker.flush()
    client = MlflowClient(server.settings.resolved_tracking_uri())
    exp = client.get_experiment_by_name("stagetune/lora")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stagetune.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("stagetune.kind") == "trial"]
    return client, parents, children


def test_a_study_is_a_parent_run_and_each_trial_a_child_run_with_pareto_tags(
    tracked_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with StudyClient(tracked_server.address) as sc, WorkerClient(tracked_server.address) as wc:
        study, _ = sc.create_study(lora_spec)
        results = [(2.0, 5.0, 100.0), (1.0, 6.0, 100.0), (2.5, 6.5, 120.0)]
        ids = []
        for metrics in results:
            a = wc.acquire("w1")
            wc.report_progress(a.trial.trial_id, "w1", 8, {"eval_loss": metrics[0] + 1})
            wc.complete(a.trial.trial_id, "w1", objective_metrics(*metrics))
            ids.append(a.trial.trial_id)
    client, parents, children = _runs(tracked_server)
    assert [p.info.run_id for p in parents] == [study.mlflow_run_id]
    assert len(children) == 3
    by_trial = {int(r.data.tags["stagetune.trial_id"]): r for r in children}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == study.mlflow_run_id
        assert r.info.status == "FINISHED"
        assert set(r.data.params) == {p.name for p in lora_spec.search_space}
    assert [by_trial[i].data.tags["pareto_front"] for i in ids] == ["true", "true", "false"]
    assert [by_trial[i].data.tags["pareto_rank"] for i in ids] == ["1", "1", "2"]
    # Rung metrics by step, then the final value at the full budget.
    history = client.get_metric_history(by_trial[ids[0]].info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in history] == [(8, 3.0), (32, 2.0)]
    assert by_trial[ids[0]].data.metrics["decode_latency_ms"] == 5.0
    hv = client.get_metric_history(study.mlflow_run_id, "hypervolume")
    assert [m.step for m in hv] == [1, 2, 3]
    assert hv[-1].value >= hv[0].value > 0
    artifacts = {a.path for a in client.list_artifacts(study.mlflow_run_id)}
    assert {"pareto_front.csv", "pareto_front.png", "spec.json"} <= artifacts
    csv_text = Path(client.download_artifacts(study.mlflow_run_id, "pareto_front.csv")).read_text()
    assert len(csv_text.strip().splitlines()) == 3  # header + the two front members


def test_tracking_outage_never_fails_an_rpc(
    tmp_path: Path, lora_spec: StudySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tracking server where nothing listens: every MLflow call fails on the tracker thread.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    srv = start_server(tmp_path, tracking_uri="http://127.0.0.1:1")
    try:
        with (
            StudyClient(srv.address, timeout=20) as sc,
            WorkerClient(srv.address, timeout=20) as wc,
        ):
            study, created = sc.create_study(lora_spec)
            assert created and study.mlflow_run_id == ""
            a = wc.acquire("w1")
            assert a.mlflow_run_id == ""
            trial = wc.complete(a.trial.trial_id, "w1", objective_metrics(1, 2, 3))
            assert list(trial.objective_values) == [1, 2, 3]
    finally:
        srv.stop(grace=0)


def test_a_stopped_trial_run_says_why(
    tracked_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    import dataclasses

    spec = dataclasses.replace(lora_spec, early_stopping="mo_asha")
    with StudyClient(tracked_server.address) as sc, WorkerClient(tracked_server.address) as wc:
        sc.create_study(spec)
        for worker, loss in (("w1", 2.0), ("w2", 3.0)):
            a = wc.acquire(worker)
            wc.report_progress(a.trial.trial_id, worker, 8, {"eval_loss": loss})
    client, _, children = _runs(tracked_server)
    stopped = [r for r in children if r.data.tags.get("state") == "stopped"]
    assert len(stopped) == 1
    assert stopped[0].info.status == "KILLED"
    assert stopped[0].data.tags["reason"].startswith("stopped at rung 8")
    assert stopped[0].data.metrics["eval_loss"] == 3.0


def test_a_burst_of_completions_rewrites_the_front_once_and_flush_writes_the_last(
    tracked_server: StagetuneServer, lora_spec: StudySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At thousands of trials every rank tag rewrite is thousands of MLflow writes: the
    front is rewritten at most once per interval, and the rewrite carries every change."""
    tracker = tracked_server.tracker
    monkeypatch.setattr(tracker, "_front_interval", 3600.0)
    writes: list[str] = []
    write_front = tracker._write_front  # type: ignore[attr-defined]

    def counted(spec: StudySpec, load: object) -> None:
        writes.append(spec.name)
        write_front(spec, load)

    monkeypatch.setattr(tracker, "_write_front", counted)
    with StudyClient(tracked_server.address) as sc, WorkerClient(tracked_server.address) as wc:
        sc.create_study(lora_spec)
        ids = []
        for i in range(5):  # each one dominates every earlier one
            a = wc.acquire("w1")
            wc.complete(a.trial.trial_id, "w1", objective_metrics(5.0 - i, 5.0 - i, 100.0 - i))
            ids.append(a.trial.trial_id)
            if i == 0:
                tracker.flush()  # the first front is written at once
    assert writes == [lora_spec.name]  # the other four wait for the interval
    _, _, children = _runs(tracked_server)  # flushes: the waiting rewrite is written now
    assert writes == [lora_spec.name] * 2
    by_trial = {int(r.data.tags["stagetune.trial_id"]): r.data.tags for r in children}
    assert [by_trial[i]["pareto_rank"] for i in ids] == ["5", "4", "3", "2", "1"]
    assert [by_trial[i]["pareto_front"] for i in ids] == ["false"] * 4 + ["true"]
    assert tracker.backlog() == 0


def test_a_front_view_older_than_the_latest_completion_is_never_written(
    tracked_server: StagetuneServer, lora_spec: StudySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A front rewrite can wait for its interval while another completion (on this server
    or on a replica sharing the database) lands: the older view must not overwrite the
    newer one's CSV, plot and rank tags."""
    views: list[object] = []
    front_changed = tracked_server.tracker.front_changed

    def keep(spec: StudySpec, load: object, hv: float, n: int) -> None:
        views.append(load)
        front_changed(spec, load, hv, n)  # type: ignore[arg-type]

    monkeypatch.setattr(tracked_server.tracker, "front_changed", keep)
    with StudyClient(tracked_server.address) as sc, WorkerClient(tracked_server.address) as wc:
        sc.create_study(lora_spec)
        for i in range(2):
            a = wc.acquire("w1")
            wc.complete(a.trial.trial_id, "w1", objective_metrics(2.0 - i, 5.0, 100.0))
    older, newer = views
    assert older() is None  # type: ignore[operator]
    assert [t.pareto_rank for t in newer()] == [2, 1]  # type: ignore[operator]


# Every variable MLflow 3.17 reads as "in CI or testing" (mlflow.telemetry.utils.
# _is_ci_env_or_testing): any one left in the child's environment would turn its
# telemetry off whatever stagetune does, and the check would prove nothing.
_CI_MARKERS = (
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
)


_CLI = (
    "from stagetune.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
)


@pytest.mark.parametrize(
    ("first", "user_setting", "telemetry_on"),
    [
        ("import stagetune.server.tracking", None, False),  # the server
        (_CLI, None, False),  # any command: serve, worker (and the trials it starts), demo
        ("import stagetune.server.tracking", "false", True),  # a user who asks keeps it
    ],
)
def test_mlflow_telemetry_is_off_in_stagetune_processes_unless_the_user_turns_it_on(
    first: str, user_setting: str | None, telemetry_on: bool
) -> None:
    """MLflow 3 starts a telemetry client when imported (a thread that fetches a config
    from config.mlflow-telemetry.io, then posts usage events). MLflow itself skips it
    under pytest or CI, so the check runs in a child process without those markers."""
    env = {k: v for k, v in os.environ.items() if k not in _CI_MARKERS}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)
    if user_setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = user_setting
    code = (
        f"{first}\nimport mlflow\n"
        "from mlflow.telemetry import get_telemetry_client\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled\n"
        "print(is_telemetry_disabled(), get_telemetry_client() is not None)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [str(not telemetry_on), str(telemetry_on)]
