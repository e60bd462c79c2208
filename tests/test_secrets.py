"""Secrets never reach logs, MLflow params/tags/artifacts or error messages: a real
`stagetune serve` with a password in its storage URL and secrets in a failure reason,
then a grep of everything it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.redact import redact, redact_text
from stagetune.contract.spec import load_spec_file
from tests.conftest import REPO

PASSWORD = "PLANTED-pw-7731"
TOKEN = "PLANTED-tok-9913"
HF = "hf_PLANTEDabcdefghijklmnop"


def test_redaction_rules() -> None:
    assert redact_text(f"postgresql://postgres:{PASSWORD}@db:5432/x") == (
        "postgresql://postgres:***@db:5432/x"
    )
    assert redact_text(f"HF_TOKEN={TOKEN} api_key: '{TOKEN}' {HF}") == (
        "HF_TOKEN=*** api_key: '***' hf_***"
    )
    assert redact_text(f"authorization: Bearer {TOKEN}") == "authorization: Bearer ***"
    assert redact({"model": {"hub_token": TOKEN, "name": "x"}}) == {
        "model": {"hub_token": "***", "name": "x"}
    }


@pytest.mark.postgres
def test_planted_secrets_appear_nowhere_the_server_writes(
    tmp_path: Path, postgres_url: str
) -> None:
    # PostgreSQL here trusts local users, so any password connects: plant one in the URL.
    storage = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    assert PASSWORD in storage
    mlflow_dir = tmp_path / "mlflow"
    cmd = [sys.executable, "-m", "stagetune.cli", "-v", "serve", "--port", "0"]
    cmd += ["--storage", storage, "--data-dir", str(tmp_path / "data")]
    cmd += ["--tracking-uri", f"sqlite:///{mlflow_dir}/mlflow.db"]
    mlflow_dir.mkdir()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    seen = []
    while "tracking:" not in "".join(seen):  # readline: iteration would buffer ahead
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"no serving banner: {seen}")
        seen.append(line)
    banner = next(line for line in seen if "serving on" in line)
    address = banner.split("serving on", 1)[1].strip()
    try:
        spec = load_spec_file(REPO / "configs" / "lora.yaml")
        with StudyClient(address) as sc, WorkerClient(address) as wc:
            sc.create_study(spec)
            a = wc.acquire("w1")
            reason = f"crashed: HF_TOKEN={TOKEN} url=https://u:{PASSWORD}@hub {HF}"
            trial, _ = wc.fail(a.trial.trial_id, "w1", "crash", reason)
            assert PASSWORD not in trial.reason and TOKEN not in trial.reason
            assert "HF_TOKEN=***" in trial.reason
            status = sc.list_trials(spec.name)[0].reason
            assert TOKEN not in status and HF not in status
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    logs = "".join(seen) + out
    assert "storage:  postgresql+psycopg://postgres:***@" in logs
    written = b"".join(p.read_bytes() for p in mlflow_dir.rglob("*") if p.is_file())
    assert b"HF_TOKEN=***" in written  # the failed trial's reason did reach MLflow
    for planted in (PASSWORD, TOKEN, HF):
        assert planted not in logs
        for path in mlflow_dir.rglob("*"):
            if path.is_file():
                assert planted.encode() not in path.read_bytes(), (planted, path)
