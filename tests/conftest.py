"""Shared fixtures: real servers on localhost:0, real SQLite/PostgreSQL, real MLflow stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec, load_spec_file
from stagetune.server.app import ServerSettings, StagetuneServer, make_server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
POSTGRES = os.environ.get("STAGETUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")


def _postgres_admin_url() -> str | None:
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"{POSTGRES}/test", connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return f"{POSTGRES}/test"
    except Exception:
        return None


@pytest.fixture(autouse=True)
def _no_credentials_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI and clients read a token, TLS files, addresses and URLs from
    ``STAGETUNE_*``: a runner that exports them must not change what the tests see (tests
    that need them set their own)."""
    for name in list(os.environ):
        if name.startswith("STAGETUNE_") and name != "STAGETUNE_TEST_POSTGRES":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    url = _postgres_admin_url()
    if url is None:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES} (set STAGETUNE_TEST_POSTGRES)")
    return url


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import sqlalchemy

    name = f"stagetune_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(postgres_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield f"{POSTGRES}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage test runs against SQLite and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stagetune.db'}"
    return str(request.getfixturevalue("postgres_url"))


def start_server(tmp_path: Path, **overrides: object) -> StagetuneServer:
    settings = ServerSettings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", grace=1.0)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return make_server(settings).start()


@pytest.fixture
def server(tmp_path: Path, storage_url: str) -> Iterator[StagetuneServer]:
    """A real server on localhost:0 with the parametrised storage and MLflow tracking off."""
    srv = start_server(tmp_path, storage_url=storage_url, tracking_uri="")
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def tracked_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    """A real server on localhost:0 with SQLite and a real MLflow store in tmp_path."""
    srv = start_server(tmp_path)
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def study_client(server: StagetuneServer) -> Iterator[StudyClient]:
    with StudyClient(server.address, timeout=10, retries=0) as client:
        yield client


@pytest.fixture
def worker_client(server: StagetuneServer) -> Iterator[WorkerClient]:
    with WorkerClient(server.address, timeout=10, retries=0) as client:
        yield client


@pytest.fixture
def lora_spec() -> StudySpec:
    return load_spec_file(REPO / "configs" / "lora.yaml")


def objective_metrics(loss: float, latency: float, memory: float) -> dict[str, float]:
    return {"eval_loss": loss, "decode_latency_ms": latency, "peak_memory_mb": memory}
