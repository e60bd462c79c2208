"""deploy/'s shell scripts run for real: the images' entry point, and the Slurm batch script
with a real worker against a real server, stopped the way Slurm stops it before the time
limit (SIGTERM to the batch shell only, ``--signal=B:TERM@...``). Slurm itself is not here:
the script runs under plain bash with the variables Slurm would set."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from tests.conftest import REPO, start_server

ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"
SBATCH = REPO / "deploy" / "slurm" / "worker.sbatch"
WORKER_TOKEN = "slurm-worker-token-PLANTED-0007"
MEMBER = "slurm-member-token-PLANTED-0008"
WORKER_ID = "slurm-4242-3-0-gpu-node-17"  # from the Slurm variables start_batch sets


def entrypoint(env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *cmd],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entrypoint_turns_secret_files_into_variables(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret with spaces\n")
    (tmp_path / "url").write_text("postgresql+psycopg://u@db/x")
    done = entrypoint(
        {
            "PGPASSWORD_FILE": str(tmp_path / "pw"),
            "STAGETUNE_STORAGE_FILE": str(tmp_path / "url"),
            "SSL_CERT_FILE": "/etc/ssl/ca.pem",  # a path that must stay a path
        },
        "env",
    )
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert env["PGPASSWORD"] == "s3cret with spaces"
    assert env["STAGETUNE_STORAGE"] == "postgresql+psycopg://u@db/x"
    assert "PGPASSWORD_FILE" not in env and "STAGETUNE_STORAGE_FILE" not in env
    assert env["SSL_CERT_FILE"] == "/etc/ssl/ca.pem" and "SSL_CERT" not in env


def test_entrypoint_refuses_a_missing_file_or_two_sources(tmp_path: Path) -> None:
    missing = entrypoint({"STAGETUNE_TOKEN_FILE": str(tmp_path / "nope")}, "true")
    assert missing.returncode == 2 and "STAGETUNE_TOKEN_FILE" in missing.stderr
    (tmp_path / "tok").write_text("x")
    both = entrypoint(
        {"STAGETUNE_TOKEN": "PLANTED-value", "STAGETUNE_TOKEN_FILE": str(tmp_path / "tok")},
        "true",
    )
    assert both.returncode == 2 and "keep one" in both.stderr
    assert "PLANTED" not in both.stderr  # names the variables, never a value


# ------------------------------------------------------------------ Slurm


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    def entry(name: str, role: str, token: str) -> dict[str, str]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return {"name": name, "team": "a", "role": role, "sha256": digest}

    tokens = {"tokens": [entry("slurm", "worker", WORKER_TOKEN), entry("me", "member", MEMBER)]}
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump(tokens))
    srv = start_server(tmp_path, tracking_uri="", auth_file=tmp_path / "tokens.yaml")
    yield srv
    srv.stop(grace=0)


def start_batch(
    tmp_path: Path, server: str, token: str, study: str = ""
) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """The batch script as slurmd starts it on the array task's node (no GPU here)."""
    (tmp_path / "token").write_text(token + "\n")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "STAGETUNE_SERVER": server,
        "STAGETUNE_TOKEN_FILE": str(tmp_path / "token"),
        "STAGETUNE_STUDY": study,
        "STAGETUNE_BIN": str(Path(sys.executable).parent / "stagetune"),
        "SLURM_JOB_ID": "4243",
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURMD_NODENAME": "gpu-node-17",
        "SLURM_GPUS_ON_NODE": "0",
    }
    batch = subprocess.Popen(
        ["bash", str(SBATCH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(batch, lines), daemon=True).start()
    return batch, lines


def _pump(batch: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert batch.stdout is not None
    for line in batch.stdout:
        lines.put(line)


def wait_for_line(lines: queue.Queue[str], text: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.2))
        except queue.Empty:
            continue
        if text in seen[-1]:
            return seen
    pytest.fail(f"no line with {text!r} within {timeout}s; saw {seen}")


def test_slurm_early_signal_makes_the_worker_hand_its_trial_back(
    tmp_path: Path, auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with StudyClient(auth_server.address, token=MEMBER, timeout=10, retries=0) as studies:
        studies.create_study(lora_spec)
    batch, lines = start_batch(tmp_path, auth_server.address, WORKER_TOKEN, lora_spec.name)
    worker: psutil.Process | None = None
    try:
        seen = wait_for_line(lines, "attempt 1", timeout=60)  # the trial has started
        assert f"[worker {WORKER_ID}]" in seen[-1]
        (worker,) = psutil.Process(batch.pid).children()
        assert all(WORKER_TOKEN not in part for part in worker.cmdline())
        batch.send_signal(signal.SIGTERM)  # what --signal=B:TERM@180 sends: the shell only
        assert batch.wait(timeout=60) == 0  # Slurm's own warning: the task ends cleanly
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        # The worker itself says it was stopped by SIGTERM (what a Kubernetes Job needs).
        wait_for_line(lines, "exited with status 143", timeout=5)
    finally:
        if batch.poll() is None:
            batch.kill()
        if worker is not None and worker.is_running():
            worker.kill()  # orphaned: the script did not wait for it
    with StudyClient(auth_server.address, token=MEMBER, timeout=10, retries=0) as studies:
        first, again = sorted(studies.list_trials(lora_spec.name), key=lambda t: t.attempt)
    # Handed back at once, not left to its lease: failed as interrupted, queued again as is.
    assert first.state == pb.TRIAL_STATE_FAILED and first.worker_id == WORKER_ID
    assert first.reason == "interrupted: worker shutting down"
    assert (again.state, again.attempt) == (pb.TRIAL_STATE_WAITING, 2)
    with WorkerClient(auth_server.address, token=WORKER_TOKEN, timeout=10, retries=0) as wc:
        got = wc.acquire("next-node", study_name=lora_spec.name)
    assert isinstance(got, ws.Assignment) and got.trial.attempt == 2
    assert dict(got.trial.params) == dict(first.params)


def test_slurm_worker_with_a_refused_token_ends_with_the_configuration_error_status(
    tmp_path: Path, auth_server: StagetuneServer
) -> None:
    batch, lines = start_batch(tmp_path, auth_server.address, "a-token-nobody-issued-0000")
    try:
        assert batch.wait(timeout=60) == 2
        wait_for_line(lines, "exited with status 2", timeout=5)
    finally:
        if batch.poll() is None:
            batch.kill()


def test_cli_configuration_errors_exit_with_the_status_the_k8s_job_fails_on(
    auth_server: StagetuneServer,
) -> None:
    """deploy/k8s's podFailurePolicy fails the Job on exit status 2: what the CLI returns for
    a bad flag, a bad value and a token the server refuses, which no retry would fix."""
    from stagetune.cli.main import main

    def status(*argv: str) -> object:
        try:
            return main(list(argv))
        except SystemExit as e:  # argparse's own refusals
            return e.code

    assert status("worker", "--no-such-flag") == 2
    assert status("worker", "--gpus", "many") == 2
    assert status("worker", "--server", auth_server.address, "--token", "x" * 20) == 2
