"""deploy/compose.yaml's topology as local processes: PostgreSQL (the one on this machine),
a real ``mlflow server --serve-artifacts`` on its own fresh database, two stagetune server
replicas on one shared database, two real workers training tiny LoRA trials. The study
finishes; its front artifacts live only on the tracking server's artifact store and are
downloaded through it into another folder; each replica's /metrics answers with counts that
match the study.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.server.optuna_policy import OptunaPolicy
from stagetune.server.service import StudyService
from stagetune.server.storage import StudyStore
from stagetune.server.tracking import MlflowTracker, local_artifact_root
from stagetune.trainer.worker import Worker, WorkerSettings
from stagetune.v1 import types_pb2 as pb
from tests.conftest import POSTGRES, start_server
from tests.metrics_scrape import Scrape, scrape
from tests.test_e2e_lora import tiny_spec

_UVICORN = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def test_only_a_local_tracking_store_gets_an_artifact_folder_of_the_servers(
    tmp_path: Path,
) -> None:
    for remote in ("http://mlflow:5000", "https://mlflow.example.org", "databricks"):
        assert local_artifact_root(remote, tmp_path) is None, remote
    for local in (f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "mlruns"), "file:///x"):
        assert local_artifact_root(local, tmp_path) == tmp_path / "mlartifacts", local


def test_a_study_created_while_mlflow_is_slow_still_gets_its_run_ids(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = StudyStore(f"sqlite:///{tmp_path / 'stagetune.db'}")
    tracker = MlflowTracker(uri, artifact_root=tmp_path / "mlartifacts", sync_timeout=0.0)
    service = StudyService(store, OptunaPolicy(store), tracker)
    try:
        record, created = service.create_study(lora_spec)
        assert created and record.mlflow_run_id == ""  # MLflow had not answered yet
        tracker.flush()
    finally:
        service.close()
        tracker.close()
    stored = store.get_study(lora_spec.name)
    (parent,) = MlflowClient(uri).search_runs(
        [stored.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'study'"
    )
    assert stored.mlflow_run_id == parent.info.run_id


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    import sqlalchemy

    name = f"stagetune_mlflow_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def mlflow_tracking_server(backend: str, artifacts: Path, folder: Path) -> Iterator[str]:
    """``mlflow server --serve-artifacts`` as compose runs it, on a port the kernel picks
    (uvicorn prints it); yields its URL. Its own session: teardown ends its workers too."""
    folder.mkdir(parents=True)
    log = folder / "mlflow-server.log"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend]
    cmd += ["--serve-artifacts", "--artifacts-destination", str(artifacts)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # imports and migrations on a busy 2-core machine
        while not (found := _UVICORN.search(log.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def run_worker(server: StagetuneServer, study: str, work: Path, worker_id: str) -> Worker:
    return Worker(
        WorkerSettings(
            server=server.address,
            study_name=study,
            worker_id=worker_id,
            threads_per_trial=1,
            work_dir=work,
            poll_interval=0.2,
        )
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_two_replicas_two_workers_and_an_mlflow_server_finish_a_study(
    tmp_path: Path, postgres_url: str, postgres_admin: str, lora_spec: StudySpec
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    spec = tiny_spec(lora_spec, tmp_path, trials=4)
    artifacts = tmp_path / "mlflow-artifacts"  # the tracking server's own disk
    with (
        fresh_database(postgres_admin) as mlflow_db,
        mlflow_tracking_server(mlflow_db, artifacts, tmp_path / "mlflow") as tracking,
    ):
        replicas = [
            start_server(
                tmp_path / name, storage_url=postgres_url, tracking_uri=tracking, metrics_port=0
            )
            for name in ("a", "b")
        ]
        try:
            with StudyClient(replicas[0].address) as sc:
                sc.create_study(spec)
            workers = [
                run_worker(srv, spec.name, tmp_path / f"work-{i}", f"w{i}")
                for i, srv in enumerate(replicas)
            ]
            threads = [threading.Thread(target=w.run) for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=480)
            assert not any(t.is_alive() for t in threads), "the workers did not finish"
            for srv in replicas:
                srv.tracker.flush()
            with StudyClient(replicas[1].address) as sc:
                final = sc.get_study(spec.name)
                front = sc.pareto_front(spec.name)
            scrapes = [scrape(srv.settings.host, srv.metrics_port) for srv in replicas]
        finally:
            for srv in replicas:
                srv.stop(grace=0)

        outcomes = [o.outcome for w in workers for o in w.outcomes]
        assert outcomes == ["complete"] * 4, outcomes
        assert all(w.outcomes for w in workers), "one worker ran no trial"
        assert final.state == pb.STUDY_STATE_DONE and final.counts.complete == 4

        # Artifacts: placed by the tracking server, readable through it from elsewhere.
        client = MlflowClient(tracking)
        # (Recorded once MLflow made the run, even when that took longer than the call.)
        parent = client.get_run(final.mlflow_run_id)
        assert parent.info.artifact_uri.startswith("mlflow-artifacts:"), parent.info.artifact_uri
        trials = client.search_runs(
            [final.mlflow_experiment_id], filter_string="tags.`stagetune.kind` = 'trial'"
        )
        assert len(trials) == 4
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in trials)
        elsewhere = tmp_path / "another-machine"
        elsewhere.mkdir()
        got = {
            name: Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{parent.info.artifact_uri}/{name}",
                    tracking_uri=tracking,
                    dst_path=str(elsewhere),
                )
            )
            for name in ("pareto_front.csv", "pareto_front.png")
        }
    assert got["pareto_front.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = got["pareto_front.csv"].read_text().splitlines()
    assert rows[0].startswith("trial_id,number,eval_loss,decode_latency_ms,peak_memory_mb")
    assert sorted(int(r.split(",")[0]) for r in rows[1:]) == sorted(
        t.trial_id for t in front.trials
    )
    assert (artifacts / final.mlflow_experiment_id).is_dir()
    for name in ("a", "b"):  # nothing on the stagetune servers' own disks
        assert not (tmp_path / name / "data" / "mlartifacts").exists()
        assert not (tmp_path / name / "mlruns").exists()

    # Metrics: study series from the shared database on both; events per replica add up.
    check_metrics(scrapes, spec.name, final, len(front.trials))


def check_metrics(scrapes: list[Scrape], study: str, final: pb.Study, front_size: int) -> None:
    for got in scrapes:
        assert got.value("stagetune_trials", study=study, state="complete") == 4
        assert got.value("stagetune_trials", study=study, state="running") == 0
        assert got.value("stagetune_studies", state="done") == 1
        assert got.value("stagetune_study_front_size", study=study) == front_size
        assert got.value("stagetune_study_hypervolume", study=study) == pytest.approx(
            final.hypervolume
        )
        assert got.value("stagetune_tracking_backlog") == 0
        assert got.value("stagetune_tracking_errors_total") == 0
        # Each replica served one worker: it handed out trials and took their completions.
        assert got.value("stagetune_acquire_seconds_count", outcome="trial") >= 1

    def total(name: str, **labels: str) -> float:
        return sum(got.value(name, **labels) for got in scrapes)

    assert total("stagetune_acquire_seconds_count", outcome="trial") == 4
    assert total("grpc_server_handled_total", grpc_method="CompleteTrial", grpc_code="OK") == 4
    assert total("stagetune_complete_seconds_count") == 4
    assert total("stagetune_rung_decisions_total", decision="continue") == 8  # rungs 2 and 4
    assert total("stagetune_rung_decisions_total", decision="stop") == 0
    assert total("stagetune_trial_requeues_total") == 0
