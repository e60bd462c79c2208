"""Clear errors at start: the real ``stagetune serve`` given a tracking URI MLflow refuses
or a storage it cannot reach exits with status 2 and one line that names the flag (and its
variable) and what to use instead; no traceback, nothing served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def serve(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "stagetune.cli", "serve", "--port", "0"]
    cmd += ["--data-dir", str(tmp_path / "data"), *flags]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STAGETUNE_")}
    done = subprocess.run(
        cmd,
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "stagetune serving on" not in done.stdout
    return done.returncode, done.stderr


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("uri", ["file:///tmp/stagetune-mlruns", "./mlruns", "foo://bar"])
def test_a_tracking_uri_mlflow_refuses_names_the_flag_and_what_to_use(
    tmp_path: Path, uri: str
) -> None:
    code, stderr = serve(tmp_path, "--tracking-uri", uri)
    line = one_line(stderr)
    assert code == 2
    assert line.startswith("stagetune serve: --tracking-uri (STAGETUNE_TRACKING_URI): ")
    assert f"MLflow cannot track to {uri!r}" in line
    assert "sqlite:///PATH/mlflow.db" in line and "http://HOST:5000" in line


def test_the_tracking_variable_gets_the_same_message(tmp_path: Path) -> None:
    code, stderr = serve(tmp_path, env={"STAGETUNE_TRACKING_URI": "file:///tmp/x"})
    assert code == 2
    assert "--tracking-uri (STAGETUNE_TRACKING_URI): MLflow cannot track" in one_line(stderr)


def test_an_unreachable_storage_names_the_flag_and_keeps_the_password_out(
    tmp_path: Path,
) -> None:
    url = "postgresql+psycopg://nobody:PLANTED-pw@127.0.0.1:1/x"
    code, stderr = serve(tmp_path, "--storage", url, "--tracking-uri", "")
    line = one_line(stderr)
    assert code == 2
    assert line.startswith("stagetune serve: --storage (STAGETUNE_STORAGE): cannot connect to ")
    assert "postgresql+psycopg://nobody:***@127.0.0.1:1/x" in line
    assert "PLANTED-pw" not in stderr
    assert "leave it unset for SQLite" in line


def test_a_storage_url_that_is_not_one_is_named(tmp_path: Path) -> None:
    code, stderr = serve(
        tmp_path, "--tracking-uri", "", env={"STAGETUNE_STORAGE": "nosuchdb://somewhere/x"}
    )
    line = one_line(stderr)
    assert code == 2
    assert "--storage (STAGETUNE_STORAGE): 'nosuchdb://somewhere/x' is not a database URL" in line


def test_a_database_stagetune_does_not_run_on_is_refused_naming_the_ones_it_does(
    tmp_path: Path,
) -> None:
    code, stderr = serve(
        tmp_path, "--storage", "mysql+pymysql://u:PLANTED-pw@127.0.0.1/x", "--tracking-uri", ""
    )
    line = one_line(stderr)
    assert code == 2
    assert "--storage (STAGETUNE_STORAGE): 'mysql+pymysql://u:***@127.0.0.1/x' is a mysql" in line
    assert "PostgreSQL (postgresql+psycopg://USER@HOST:5432/DB) or SQLite" in line
    assert "PLANTED-pw" not in stderr
    assert not (tmp_path / "data" / "stagetune.db").exists()
