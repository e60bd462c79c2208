"""A pipeline survives its server: ``kill -9`` of a real ``stagetune serve`` at several
points of a three-stage pipeline, each time restarted on the same port and database, and
the pipeline finishes with one study of each kind and one registered version per stage,
each stage started from the previous one's. And a server that dies between registering a
model and recording it makes no second version when it comes back."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.contract.client import StudyClient
from stagetune.contract.errors import DeadlineExceeded, Unavailable
from stagetune.contract.pipeline_client import PipelineClient
from stagetune.server.pipeline_tracking import MlflowPipelineTracker
from stagetune.v1 import pipeline_service_pb2 as ps
from tests.conftest import start_server
from tests.pipeline_driver import FakeTrials
from tests.test_pipeline_service import spec_of, state_is, write_data_file

pytestmark = pytest.mark.slow


def serve(port: int, data: Path) -> subprocess.Popen[str]:
    """``stagetune serve`` with its defaults: SQLite and an MLflow store in ``data``."""
    cmd = [sys.executable, "-m", "stagetune.cli", "serve", "--port", str(port)]
    cmd += ["--data-dir", str(data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError("server exited before serving")
        if "stagetune serving on" in line:
            # Keep draining its output so a full pipe never blocks it.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (Unavailable, DeadlineExceeded):  # a server restarting, or busy
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("never got there")
        time.sleep(0.1)


def test_a_pipeline_finishes_across_servers_killed_with_sigkill(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    data = tmp_path / "data"
    tracking = f"sqlite:///{(data / 'mlflow.db').resolve()}"
    proc = serve(port, data)
    driver = FakeTrials(address, tracking, tmp_path / "work")
    pipelines = PipelineClient(address, timeout=10, retries=8, backoff=0.25)
    finished = threading.Event()
    failures: list[BaseException] = []
    # The driver runs no trial while the test waits to kill the server in a phase: on a
    # loaded machine a phase could otherwise pass between two polls.
    holding = threading.Event()

    def work() -> None:
        try:
            driver.run_until(finished.is_set, timeout=400, hold=holding.is_set)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failures.append(e)

    worker = threading.Thread(target=work, daemon=True)
    try:
        pipelines.submit(spec_of("survivor", write_data_file(tmp_path)))
        worker.start()
        kills = 0
        # Mid-retrain of stage 1, mid-search of stage 2, and as stage 3 is scored on test.
        for stage, phase in ((0, "RETRAINING"), (1, "SEARCHING"), (2, "EVALUATING")):
            wanted = ps.StagePhase.Value(f"STAGE_PHASE_{phase}")

            def there() -> bool:
                reached = pipelines.get("survivor").stages[stage].phase == wanted  # noqa: B023
                if reached:
                    holding.set()
                return reached

            wait_for(there)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = serve(port, data)
            holding.clear()
        wait_for(state_is(pipelines, "survivor", ps.PIPELINE_STATE_DONE), timeout=300)
        finished.set()
        worker.join(timeout=60)
        assert not failures, failures
        assert kills == 3
        p = pipelines.get("survivor")
        mlflow = MlflowClient(tracking)
        with StudyClient(address) as studies:
            names = sorted(s.spec.name for s in studies.list_studies())
        assert names == sorted(
            n for s in p.stages for n in (s.study_name, s.final_study_name, s.test_study_name) if n
        )
        for i, stage in enumerate(p.stages):
            versions = mlflow.search_model_versions(f"name = '{stage.model_name}'")
            assert [str(v.version) for v in versions] == ["1"], stage.name
            if i:
                assert stage.base_model == p.stages[i - 1].model_uri
            assert stage.held_out
    finally:
        finished.set()
        pipelines.close()
        driver.close()
        proc.kill()
        proc.wait()


class DiesAfterRegistering(MlflowPipelineTracker):
    """The real tracker, except that the first registration is followed by a crash: the
    version exists in MLflow, and the server never recorded it."""

    crashed = False

    def register(self, name: str, run_id: str, tags: dict[str, str], description: str) -> str:
        version = super().register(name, run_id, tags, description)
        if not DiesAfterRegistering.crashed:
            DiesAfterRegistering.crashed = True
            raise RuntimeError("the server died here")
        return version


def test_a_model_registered_just_before_a_crash_is_not_registered_twice(tmp_path: Path) -> None:
    server = start_server(tmp_path, pipeline_interval=0.1)
    uri = server.settings.resolved_tracking_uri()
    server.pipelines.steps.tracker = DiesAfterRegistering(uri)
    driver = FakeTrials(server.address, uri, tmp_path / "work")
    try:
        with PipelineClient(server.address) as pipelines:
            pipelines.submit(spec_of("once", write_data_file(tmp_path), ("pre",)))
            driver.run_until(state_is(pipelines, "once", ps.PIPELINE_STATE_DONE))
            (stage,) = pipelines.get("once").stages
        assert DiesAfterRegistering.crashed
        versions = MlflowClient(uri).search_model_versions("name = 'once.pre'")
        assert [str(v.version) for v in versions] == ["1"]
        assert stage.model_version == "1"
    finally:
        driver.close()
        server.stop(grace=0)
