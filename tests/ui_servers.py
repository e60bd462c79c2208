"""The review UIs teams already run, started the way they start them: ``mlflow server`` and
``optuna-dashboard`` as their own processes on localhost, over the stores a test's server
wrote. Shared by tests/test_mlflow_ui.py and tests/test_optuna_dashboard.py.

Each runs in a new session so that teardown ends it and whatever it started (MLflow's
uvicorn worker) by its process group; its output goes to a log file in the
test's folder, quoted when it does not come up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import REPO

ARTIFACTS = REPO / "test-artifacts"  # screenshots kept for review (git-ignored)
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads one
_T = TypeVar("_T")
# uvicorn (MLflow 3 default) and gunicorn say where they listen, port 0 resolved.
_LISTENING = re.compile(r"(?:Uvicorn running on|Listening at:) http://127\.0\.0\.1:(\d+)")


@dataclass(frozen=True)
class LocalUi:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())


def keep_artifact(path: Path) -> Path:
    """Copy a test's output (a screenshot) to test-artifacts/ at the repository root, where
    CI collects it; returns the copy."""
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / path.name
    shutil.copyfile(path, kept)
    return kept


def _program(name: str, package: str) -> str:
    found = Path(sys.executable).parent / name
    if not found.exists():
        pytest.fail(f"{name} is not installed: pip install {package} (the dev extra has it)")
    return str(found)


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")  # no network here
    # MLflow's job runner (scorers, trace archival) is a second process importing MLflow
    # and a folder left in /dev/shm per start; the UI needs neither.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def _start(cmd: list[str], folder: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd,
            cwd=folder,  # anything either writes beside itself stays in the test's folder
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _wait_until(
    ready: Callable[[], _T | None], process: subprocess.Popen[bytes], log: Path, what: str
) -> _T:
    deadline = time.monotonic() + 90  # MLflow imports for ~10 s on a busy 2-core machine
    while time.monotonic() < deadline:
        found = ready()
        if found is not None:
            return found
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"{what} did not come up within 90 s:\n{log.read_text()[-3000:]}")


@contextmanager
def mlflow_server(backend_store_uri: str, folder: Path) -> Iterator[LocalUi]:
    """``mlflow server`` (UI and REST API) over the backend store, on a port the kernel
    picks (the server prints it)."""
    cmd = [_program("mlflow", "mlflow"), "server", "--backend-store-uri", backend_store_uri]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    process, log = _start(cmd, folder, "mlflow-server")
    try:

        def port() -> str | None:
            found = _LISTENING.search(log.read_text(errors="replace"))
            return found.group(1) if found else None

        url = f"http://127.0.0.1:{_wait_until(port, process, log, 'mlflow server')}"
        yield LocalUi(url, process, log)
    finally:
        _stop(process)


def _free_port() -> int:
    # optuna-dashboard prints the port it was given, not the one bound: ask the kernel for
    # a free one first (the only way to learn its address).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def optuna_dashboard(storage_url: str, folder: Path) -> Iterator[LocalUi]:
    """``optuna-dashboard STORAGE`` as the compose file runs it, answering on ``/api``."""
    port = _free_port()
    cmd = [_program("optuna-dashboard", "optuna-dashboard"), storage_url]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    process, log = _start(cmd, folder, "optuna-dashboard")
    ui = LocalUi(f"http://127.0.0.1:{port}", process, log)
    try:

        def answers() -> bool | None:
            try:
                ui.get_json("/api/meta")
            except (urllib.error.URLError, ConnectionError):
                return None
            return True

        _wait_until(answers, process, log, "optuna-dashboard")
        yield ui
    finally:
        _stop(process)
