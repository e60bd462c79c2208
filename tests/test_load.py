"""Many workers at once against a live server, on SQLite and PostgreSQL: every trial
completes exactly once, the budget is exact however many workers race, nothing is left
RUNNING and no call fails with INTERNAL.

The CI sizes are small; the sizes the guarantees are stated for (32 workers x 20 trials
on SQLite, 64 on PostgreSQL) run with ``make soak`` (``pytest -m soak``)."""

from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import time
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import BudgetSpec, StudySpec
from stagetune.objectives.pareto import hypervolume
from stagetune.server.app import StagetuneServer
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws


def run_workers(
    servers: list[StagetuneServer], study: str, workers: int
) -> tuple[list[int], list[float], list[BaseException]]:
    """Each worker: acquire -> report one rung -> complete, until the study has no work.
    Worker i talks to ``servers[i % len(servers)]`` (replicas sharing one database)."""
    done: list[int] = []
    acquire_seconds: list[float] = []
    errors: list[BaseException] = []
    guard = threading.Lock()
    start = threading.Barrier(workers)

    def work(i: int) -> None:
        rng = random.Random(i)
        name = f"load-{i}"
        try:
            with WorkerClient(servers[i % len(servers)].address, timeout=60) as wc:
                start.wait()
                while True:
                    t0 = time.perf_counter()
                    got = wc.acquire(name, study_name=study)
                    with guard:
                        acquire_seconds.append(time.perf_counter() - t0)
                    if isinstance(got, ws.NoTrial):
                        return
                    tid = got.trial.trial_id
                    loss = rng.uniform(1, 3)
                    memory = rng.uniform(400, 600)
                    d = wc.report_progress(
                        tid, name, 8, {"eval_loss": loss, "peak_memory_mb": memory}
                    )
                    if d.stop:
                        continue
                    final = {"eval_loss": loss, "decode_latency_ms": 3.0, "peak_memory_mb": memory}
                    wc.complete(tid, name, final)
                    with guard:
                        done.append(tid)
        except Exception as e:  # every failure, INTERNAL included, is a test failure
            with guard:
                errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3000)
    return done, acquire_seconds, errors


def check(
    server: StagetuneServer, spec: StudySpec, workers: int, *replicas: StagetuneServer
) -> None:
    with StudyClient(server.address) as sc:
        sc.create_study(spec)
        started = time.perf_counter()
        done, acquires, errors = run_workers([server, *replicas], spec.name, workers)
        seconds = time.perf_counter() - started
        assert errors == []
        trials = sc.list_trials(spec.name)
        study = sc.get_study(spec.name)
    n = spec.budget.max_trials
    assert len(done) == n and len(set(done)) == n  # each completed once, by one worker
    assert len(trials) == n  # exactly the budget, however many raced for the last one
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state == pb.TRIAL_STATE_COMPLETE for t in trials)
    assert study.state == pb.STUDY_STATE_DONE and study.counts.running == 0
    # The stored hypervolume (kept up to date one completion at a time, on each replica)
    # is that of every trial's final values, whichever replica completed them.
    reference = server.store.study_head(spec.name).reference
    assert reference is not None
    values = [[t.metrics[m] for m in spec.metric_names] for t in trials]
    expected = hypervolume(values, reference, spec.directions)
    assert study.hypervolume == pytest.approx(expected, rel=1e-9)
    p99 = statistics.quantiles(acquires, n=100)[98] * 1000
    print(f"\n{workers} workers, {n} trials: {n / seconds:.1f} trials/s, acquire p99 {p99:.0f} ms")


@pytest.mark.parametrize(("workers", "trials"), [(16, 50)])
def test_racing_workers_complete_exactly_the_budget(
    server: StagetuneServer, lora_spec: StudySpec, workers: int, trials: int
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(trials, 0))  # runs every trial
    check(server, spec, workers)


@pytest.mark.postgres
def test_two_replicas_sharing_postgresql_hand_out_exactly_the_budget(
    tmp_path: Path, postgres_url: str, lora_spec: StudySpec
) -> None:
    """Two servers, each with its own locks and suggestion pool, on one database: workers
    split between them still get exactly max_trials trials, each completed once."""
    from tests.conftest import start_server

    a = start_server(tmp_path / "a", storage_url=postgres_url, tracking_uri="")
    b = start_server(tmp_path / "b", storage_url=postgres_url, tracking_uri="")
    try:
        check(a, dataclasses.replace(lora_spec, budget=BudgetSpec(40, 0)), 16, b)
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_32_workers_x_20_trials_on_sqlite(tmp_path: Path, lora_spec: StudySpec) -> None:
    from tests.conftest import start_server

    srv = start_server(tmp_path, storage_url=f"sqlite:///{tmp_path / 'st.db'}", tracking_uri="")
    try:
        check(srv, dataclasses.replace(lora_spec, budget=BudgetSpec(32 * 20, 0)), 32)
    finally:
        srv.stop(grace=0)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_64_workers_x_20_trials_on_postgresql(
    tmp_path: Path, postgres_url: str, lora_spec: StudySpec
) -> None:
    from tests.conftest import start_server

    srv = start_server(tmp_path, storage_url=postgres_url, tracking_uri="")
    try:
        check(srv, dataclasses.replace(lora_spec, budget=BudgetSpec(64 * 20, 0)), 64)
    finally:
        srv.stop(grace=0)
