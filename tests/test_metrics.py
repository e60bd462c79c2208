"""``stagetune serve --metrics-port``: a real server with its Prometheus endpoint on a free
port, real RPCs, and an HTTP GET of /metrics parsed by Prometheus's own text parser. Each
count in the scrape is checked against what the test did."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.cli.main import build_parser
from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import InvalidArgument, NotFound
from stagetune.contract.spec import BudgetSpec, ConstraintSpec, StudySpec
from stagetune.server.app import ServerSettings, StagetuneServer, make_server
from stagetune.v1 import worker_service_pb2 as ws
from tests.conftest import REPO, objective_metrics, start_server
from tests.metrics_scrape import scrape

# Labels a series may carry: never a trial, a worker or a free-form client value.
ALLOWED_LABELS = {
    "study",
    "state",
    "outcome",
    "decision",
    "grpc_type",
    "grpc_service",
    "grpc_method",
    "grpc_code",
    "le",
    # python_info, from prometheus_client's platform collector
    *("implementation", "major", "minor", "patchlevel", "version", "generation"),
}
WORKER_SERVICE = "stagetune.v1.WorkerService"


@pytest.fixture
def metered(tmp_path: Path, storage_url: str) -> Iterator[StagetuneServer]:
    srv = start_server(tmp_path, storage_url=storage_url, tracking_uri="", metrics_port=0)
    yield srv
    srv.stop(grace=0)


def small(spec: StudySpec, trials: int, retries: int = 0, **changes: object) -> StudySpec:
    return dataclasses.replace(spec, budget=BudgetSpec(trials, retries), **changes)


def test_a_scrape_counts_the_trials_and_calls_that_happened(
    metered: StagetuneServer, lora_spec: StudySpec
) -> None:
    spec = small(lora_spec, 3)
    # Three completions; the third is dominated by the first, so the front holds two.
    results = [(1.0, 10.0, 100.0), (2.0, 5.0, 100.0), (3.0, 20.0, 200.0)]
    with StudyClient(metered.address) as sc, WorkerClient(metered.address) as wc:
        sc.create_study(spec)
        for i, values in enumerate(results):
            a = wc.acquire(f"w{i}")
            assert isinstance(a, ws.Assignment)
            assert not wc.report_progress(a.trial.trial_id, f"w{i}", 8, {"eval_loss": 2.0}).stop
            wc.complete(a.trial.trial_id, f"w{i}", objective_metrics(*values))
        assert isinstance(wc.acquire("late"), ws.NoTrial)
        with pytest.raises(NotFound):
            sc.get_study("no-such-study")

        got = scrape(metered.settings.host, metered.metrics_port)

        study = sc.get_study(spec.name)
        front = sc.pareto_front(spec.name)
    assert metered.metrics_port not in (0, metered.port)

    trials = {s: got.value("stagetune_trials", study=spec.name, state=s) for s in ("complete",)}
    assert trials == {"complete": 3}
    for state in ("waiting", "running", "stopped", "failed", "infeasible"):
        assert got.value("stagetune_trials", study=spec.name, state=state) == 0
    assert got.value("stagetune_studies", state="done") == 1
    assert got.value("stagetune_studies", state="running") == 0
    assert got.value("stagetune_study_front_size", study=spec.name) == len(front.trials) == 2
    assert got.value("stagetune_study_hypervolume", study=spec.name) == pytest.approx(
        study.hypervolume
    )
    assert study.hypervolume > 0
    assert got.value("stagetune_store_up") == 1

    def handled(method: str, code: str) -> float:
        return got.value("grpc_server_handled_total", grpc_method=method, grpc_code=code)

    assert handled("AcquireTrial", "OK") == 4  # three trials and one "nothing now"
    assert handled("ReportProgress", "OK") == 3
    assert handled("CompleteTrial", "OK") == 3
    assert handled("CreateStudy", "OK") == 1
    assert handled("GetStudy", "NotFound") == 1
    assert got.value("grpc_server_started_total", grpc_method="AcquireTrial") == 4
    assert got.value("grpc_server_handling_seconds_count", grpc_method="AcquireTrial") == 4
    assert got.labels("grpc_server_handled_total", "grpc_service") >= {WORKER_SERVICE}
    assert got.labels("grpc_server_handled_total", "grpc_type") == {"unary"}
    # Methods nobody called yet start at zero, so rate() has a series from the first scrape.
    assert handled("Heartbeat", "OK") == 0

    assert got.value("stagetune_acquire_seconds_count", outcome="trial") == 3
    assert got.value("stagetune_acquire_seconds_count", outcome="no_work") == 1
    assert got.value("stagetune_acquire_seconds_count", outcome="error") == 0
    assert got.value("stagetune_complete_seconds_count") == 3
    assert got.value("stagetune_rung_decisions_total", decision="continue") == 3
    assert got.value("stagetune_rung_decisions_total", decision="stop") == 0
    assert got.value("stagetune_lease_expiries_total") == 0
    assert got.value("stagetune_trial_requeues_total") == 0
    assert got.value("stagetune_suggestion_pool_misses_total") >= 1  # the first ask: no pool
    assert got.value("stagetune_tracking_backlog") == 0
    assert got.value("stagetune_tracking_errors_total") == 0
    assert got.value("process_resident_memory_bytes") > 0

    for sample in got.samples:
        assert set(sample.labels) <= ALLOWED_LABELS, sample


def test_an_expired_lease_counts_once_and_so_does_its_requeue(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    srv = start_server(
        tmp_path, tracking_uri="", metrics_port=0, lease_seconds=1.0, reaper_interval=0.2
    )
    spec = small(lora_spec, 1, retries=1)
    try:
        with StudyClient(srv.address) as sc, WorkerClient(srv.address) as wc:
            sc.create_study(spec)
            wc.acquire("dies")
            deadline = time.monotonic() + 10
            while sc.get_study(spec.name).counts.failed == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            retry = wc.acquire("alive")
            assert isinstance(retry, ws.Assignment) and retry.trial.attempt == 2
            # Past its one retry: failed for good, not queued again.
            _, requeued = wc.fail(retry.trial.trial_id, "alive", "interrupted", "preempted")
            assert not requeued
            got = scrape(srv.settings.host, srv.metrics_port)
    finally:
        srv.stop(grace=0)
    assert got.value("stagetune_lease_expiries_total") == 1
    assert got.value("stagetune_trial_requeues_total") == 1
    assert got.value("stagetune_trials", study=spec.name, state="failed") == 2
    assert got.value("stagetune_trials", study=spec.name, state="waiting") == 0
    assert got.value("stagetune_studies", state="done") == 1


def test_a_rung_that_breaks_a_constraint_counts_a_stop(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    limit = ConstraintSpec("peak_memory_mb", max=1000.0)
    spec = small(lora_spec, 2, constraints=(limit,))
    srv = start_server(tmp_path, tracking_uri="", metrics_port=0)
    try:
        with StudyClient(srv.address) as sc, WorkerClient(srv.address) as wc:
            sc.create_study(spec)
            a = wc.acquire("w")
            assert isinstance(a, ws.Assignment)
            over = {"eval_loss": 2.0, "peak_memory_mb": 5000.0}
            assert wc.report_progress(a.trial.trial_id, "w", 8, over).stop
            got = scrape(srv.settings.host, srv.metrics_port)
    finally:
        srv.stop(grace=0)
    assert got.value("stagetune_rung_decisions_total", decision="stop") == 1
    assert got.value("stagetune_rung_decisions_total", decision="continue") == 0
    assert got.value("stagetune_trials", study=spec.name, state="infeasible") == 1
    assert got.value("stagetune_studies", state="running") == 1


def test_the_scrape_tallies_agree_with_each_study_record(
    server: StagetuneServer, lora_spec: StudySpec
) -> None:
    """``StudyStore.tallies`` (one grouped query for every study) against ``get_study``
    (each study's trials read one by one), on SQLite and PostgreSQL: a complete trial, an
    infeasible one (out of memory), a lost attempt and its queued retry, a running one."""
    spec = small(lora_spec, 4, retries=1)
    other = dataclasses.replace(small(lora_spec, 1), name="other")
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(spec)
        sc.create_study(other)
        a = wc.acquire("a", study_name=spec.name)
        wc.complete(a.trial.trial_id, "a", objective_metrics(1.0, 2.0, 3.0))
        b = wc.acquire("b", study_name=spec.name)
        wc.fail(b.trial.trial_id, "b", "out_of_memory", "CUDA out of memory")
        c = wc.acquire("c", study_name=spec.name)
        assert wc.fail(c.trial.trial_id, "c", "interrupted", "preempted")[1]  # requeued
        wc.acquire("d", study_name=spec.name)
        wc.acquire("e", study_name=other.name)
        tallies = {t.spec.name: t for t in server.store.tallies()}
        records = {r.spec.name: r for r in server.store.list_studies()}
    # d holds c's retry (a second attempt: the budget counts three of four first attempts).
    assert tallies[spec.name].trials == {
        "waiting": 0,
        "running": 1,
        "complete": 1,
        "stopped": 0,
        "failed": 1,
        "infeasible": 1,
    }
    assert tallies[spec.name].state == tallies[other.name].state == "running"
    for name, record in records.items():
        assert tallies[name].trials == record.counts, name
        assert tallies[name].state == record.state, name
        assert tallies[name].hypervolume == record.hypervolume, name


def test_metrics_are_off_unless_a_port_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = make_server(ServerSettings(port=0, data_dir=tmp_path, tracking_uri="")).start()
    try:
        assert srv.metrics is None and srv.metrics_port == 0
    finally:
        srv.stop(grace=0)
    parser = build_parser()
    assert parser.parse_args(["serve"]).metrics_port == 0
    monkeypatch.setenv("STAGETUNE_METRICS_PORT", "9464")  # as the deploy files set it
    assert build_parser().parse_args(["serve"]).metrics_port == 9464


def test_a_port_out_of_range_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as refused:
        make_server(ServerSettings(port=0, data_dir=tmp_path, metrics_port=70000))
    assert refused.value.field == "metrics_port"


def test_serve_on_a_busy_metrics_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "stagetune.cli", "serve", "--port", "0"]
            + ["--data-dir", str(tmp_path), "--tracking-uri", "", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "--metrics-port" in done.stderr and f"127.0.0.1:{port}" in done.stderr


@pytest.mark.postgres
def test_a_scrape_during_a_database_outage_answers_with_store_up_0(
    tmp_path: Path, postgres_url: str, lora_spec: StudySpec
) -> None:
    from tests.test_db_outage import CuttableProxy

    proxy = CuttableProxy(("127.0.0.1", 5432))
    proxied = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    srv = start_server(tmp_path, storage_url=proxied, tracking_uri="", metrics_port=0)
    try:
        with StudyClient(srv.address) as sc:
            sc.create_study(small(lora_spec, 1))
        assert scrape(srv.settings.host, srv.metrics_port).value("stagetune_store_up") == 1
        proxy.cut()
        during = scrape(srv.settings.host, srv.metrics_port)
        proxy.restore()
        after = scrape(srv.settings.host, srv.metrics_port)
    finally:
        srv.stop(grace=0)
        proxy.cut()
    assert during.value("stagetune_store_up") == 0
    assert "stagetune_trials" not in during.names
    assert during.value("grpc_server_handled_total", grpc_method="CreateStudy") == 1
    assert after.value("stagetune_store_up") == 1
    assert after.value("stagetune_studies", state="running") == 1
