"""Pipelines obey the same auth and tenancy as studies (a pipeline and every study it makes
belong to the submitting member's team; every other team sees them as if they did not
exist; a worker token may not touch them), and ``stagetune pipeline`` prints status and
one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from stagetune.cli.main import main
from stagetune.contract.client import StudyClient
from stagetune.contract.errors import (
    AlreadyExists,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from stagetune.contract.pipeline_client import PipelineClient
from stagetune.server.app import StagetuneServer
from stagetune.v1 import pipeline_service_pb2 as ps
from tests.conftest import start_server
from tests.pipeline_driver import FakeTrials
from tests.test_auth import ALICE, BOB, ROOT, WORKER_A, _token_file
from tests.test_pipeline_service import spec_of, state_is, write_data_file


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    server = start_server(tmp_path, auth_file=_token_file(tmp_path), pipeline_interval=0.1)
    yield server
    server.stop(grace=0)


def client(server: StagetuneServer, token: str) -> PipelineClient:
    return PipelineClient(server.address, token=token, timeout=10, retries=0)


def test_another_teams_pipeline_and_its_studies_do_not_exist_for_you(
    auth_server: StagetuneServer, tmp_path: Path
) -> None:
    spec = spec_of("team-a", write_data_file(tmp_path))
    with client(auth_server, ALICE) as alice, client(auth_server, BOB) as bob:
        alice.submit(spec)
        assert [p.spec.name for p in alice.list()] == ["team-a"]
        assert bob.list() == []
        for call in (
            lambda: bob.get("team-a"),
            lambda: bob.stop("team-a"),
            lambda: bob.approve("team-a", 1),
        ):
            with pytest.raises(NotFound, match="pipeline 'team-a' not found"):
                call()
        with pytest.raises(NotFound):
            bob.get("no-such-pipeline")
        with pytest.raises(AlreadyExists):  # the name space is shared
            bob.submit(spec)
        # The studies it made are team a's.
        with StudyClient(auth_server.address, token=BOB) as studies:
            with pytest.raises(NotFound):
                studies.get_study("team-a.pre")
            assert studies.list_studies() == []
        with StudyClient(auth_server.address, token=ALICE) as studies:
            assert studies.get_study("team-a.pre").spec.name == "team-a.pre"
        with client(auth_server, ROOT) as admin:
            assert admin.get("team-a").spec.name == "team-a"
            assert admin.stop("team-a").state == ps.PIPELINE_STATE_STOPPED
        assert alice.get("team-a").state == ps.PIPELINE_STATE_STOPPED


def test_a_worker_token_runs_a_pipelines_trials_but_may_not_touch_pipelines(
    auth_server: StagetuneServer, tmp_path: Path
) -> None:
    with client(auth_server, WORKER_A) as worker:
        with pytest.raises(PermissionDenied):
            worker.list()
        with pytest.raises(PermissionDenied):
            worker.submit(spec_of("by-worker", write_data_file(tmp_path)))
    with client(auth_server, "") as nobody, pytest.raises(Unauthenticated):
        nobody.list()
    uri = auth_server.settings.resolved_tracking_uri()
    driver = FakeTrials(auth_server.address, uri, tmp_path / "work", token=WORKER_A)
    try:
        with client(auth_server, ALICE) as alice:
            alice.submit(spec_of("runs", write_data_file(tmp_path), ("pre",)))
            driver.run_until(state_is(alice, "runs", ps.PIPELINE_STATE_DONE))
    finally:
        driver.close()
    assert MlflowClient(uri).get_model_version("runs.pre", "1").tags["stagetune.pipeline"] == "runs"


def test_the_cli_submits_and_shows_a_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(tmp_path, pipeline_interval=0.1)
    try:
        flags = ["--server", server.address]
        assert main(["pipeline", "submit", "tiny-lifecycle", *flags]) == 0
        out = capsys.readouterr().out
        assert "submitted pipeline tiny-lifecycle: pretrain -> sft -> dpo" in out
        assert "tiny-lifecycle.pretrain" in out
        assert main(["pipeline", "status", *flags]) == 0
        assert "tiny-lifecycle  running  1/3 pretrain" in capsys.readouterr().out
        assert main(["pipeline", "status", "tiny-lifecycle", *flags]) == 0
        out = capsys.readouterr().out
        assert "pipeline tiny-lifecycle: running, stage 1 of 3 (pretrain)" in out
        assert (
            "sft (sft): select best eval_loss, decode_latency_ms <= 50, retrained 32 steps" in out
        )
        assert main(["pipeline", "approve", "tiny-lifecycle", "--trial", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err
            == "stagetune pipeline: pipeline tiny-lifecycle waits for no approval (it is running)"
        )
        assert main(["pipeline", "stop", "tiny-lifecycle", *flags]) == 0
        assert "stopped by a user" in capsys.readouterr().out
        bad = tmp_path / "bad.yaml"
        bad.write_text("name: bad\nstages: [{name: x, study: sft, select: best}]\n")
        assert main(["pipeline", "submit", str(bad), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("stagetune pipeline: stages[0].select: must be knee, manual or")
        assert "\n" not in err
    finally:
        server.stop(grace=0)
