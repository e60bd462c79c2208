"""The suggestion pool: acquires are served from suggestions computed ahead, the in-memory
mirror learns every result, and a restarted server rebuilds it from the database."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from optuna.trial import TrialState

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import BudgetSpec, StudySpec, value_from_proto
from stagetune.server.app import StagetuneServer
from stagetune.server.pool import SuggestionPool
from tests.conftest import objective_metrics, start_server


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def mirror_states(pool: SuggestionPool, study: str) -> dict[TrialState, int]:
    mirror = pool._mirrors[study]
    counts: dict[TrialState, int] = {}
    for t in mirror.study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def run_trials(address: str, study: str, n: int, worker: str = "w") -> list[int]:
    ids = []
    with WorkerClient(address, timeout=10, retries=0) as wc:
        for i in range(n):
            got = wc.acquire(worker, study_name=study)
            tid = got.trial.trial_id
            wc.complete(tid, worker, objective_metrics(1.0 + i, 2.0, 500.0 - i))
            ids.append(tid)
    return ids


def server_with_study(path: Path, spec: StudySpec, **settings: object) -> StagetuneServer:
    """A server (tracking off) on which ``spec`` has been created."""
    srv = start_server(path, tracking_uri="", **settings)
    try:
        with StudyClient(srv.address, retries=0) as sc:
            sc.create_study(spec)
    except BaseException:
        srv.stop(grace=0)
        raise
    return srv


def test_acquires_pop_ready_suggestions_and_the_mirror_learns_each_result(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(20, 0))
    srv = server_with_study(tmp_path, spec)
    pool = srv.service.policy.pool
    try:
        run_trials(srv.address, spec.name, 1)  # the first acquire builds the mirror
        eventually(lambda: len(pool._ready(spec.name)) == pool.size)
        misses = pool.misses
        run_trials(srv.address, spec.name, 5)
        assert pool.misses == misses  # every acquire was a pop: nothing waited
        # The six results reach the mirror's sampler; the ready suggestions run there.
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 6)
        eventually(
            lambda: mirror_states(pool, spec.name).get(TrialState.RUNNING, 0) >= pool.size - 1
        )
        eventually(lambda: len(pool._ready(spec.name)) == pool.size)
        next_up = pool._ready(spec.name)[0].params
        with WorkerClient(srv.address, retries=0) as wc:
            held = wc.acquire("holder", study_name=spec.name).trial
        assert {k: value_from_proto(v) for k, v in held.params.items()} == next_up
    finally:
        srv.stop(grace=0)


def two_servers_on(
    tmp_path: Path, lora_spec: StudySpec, trials: int
) -> tuple[StudySpec, StagetuneServer, Callable[[], StagetuneServer]]:
    """A study on a SQLite file, a first server that created it, and how to start another
    server on the same file."""
    db = f"sqlite:///{tmp_path / 'st.db'}"
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(trials, 0))
    first = server_with_study(tmp_path / "a", spec, storage_url=db)
    return spec, first, lambda: start_server(tmp_path / "b", storage_url=db, tracking_uri="")


def test_a_restarted_server_rebuilds_the_mirror_from_the_database(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, first, start_second = two_servers_on(tmp_path, lora_spec, 20)
    try:
        run_trials(first.address, spec.name, 4)
        with WorkerClient(first.address, retries=0) as wc:
            wc.acquire("still-running", study_name=spec.name)
    finally:
        first.stop(grace=0)
    second = start_second()
    try:
        run_trials(second.address, spec.name, 1, worker="after-restart")
        pool = second.service.policy.pool
        # Rebuilt from the database: the four results and the trial still running
        # (a constant-liar guess), then the new trial's result.
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 5)
        mirror = pool._mirrors[spec.name]
        assert len(mirror.by_db) == 6
    finally:
        second.stop(grace=0)


def test_trials_another_replica_created_make_the_mirror_rebuild(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, a, start_second = two_servers_on(tmp_path, lora_spec, 30)
    b = start_second()
    try:
        run_trials(a.address, spec.name, 2)
        pool = a.service.policy.pool
        built = pool._mirrors[spec.name].generation
        run_trials(b.address, spec.name, 3, worker="other-replica")
        run_trials(a.address, spec.name, 1)  # a pop lets the refill loop notice
        eventually(lambda: pool._mirrors[spec.name].generation > built)
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 6)
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_a_study_nobody_asks_for_is_forgotten_and_rebuilt_when_asked_again(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(10, 0))
    srv = server_with_study(tmp_path, spec)
    pool = srv.service.policy.pool
    try:
        run_trials(srv.address, spec.name, 2)
        pool._idle_seconds = 0.3  # as if ten idle minutes had passed
        eventually(lambda: spec.name not in pool._mirrors)
        pool._idle_seconds = 600.0
        run_trials(srv.address, spec.name, 1)
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 3)
    finally:
        srv.stop(grace=0)


def acquired_params(address: str, study: str, n: int, worker: str) -> list[dict[str, object]]:
    """Params of ``n`` trials acquired (and completed) by ``worker``."""
    out = []
    with WorkerClient(address, timeout=10, retries=0) as wc:
        for i in range(n):
            got = wc.acquire(worker, study_name=study)
            out.append({k: value_from_proto(v) for k, v in got.trial.params.items()})
            wc.complete(got.trial.trial_id, worker, objective_metrics(1.0 + i, 2.0, 500.0))
    return out


def test_a_restarted_server_does_not_replay_the_configurations_already_tried(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, first, start_second = two_servers_on(tmp_path, lora_spec, 20)
    try:
        before = acquired_params(first.address, spec.name, 3, "w")
    finally:
        first.stop(grace=0)
    second = start_second()  # same seed, same database: must not start the sequence again
    try:
        after = acquired_params(second.address, spec.name, 3, "w")
    finally:
        second.stop(grace=0)
    assert not [p for p in after if p in before]


def test_two_replicas_on_one_database_hand_out_different_configurations(
    tmp_path: Path, lora_spec: StudySpec, postgres_url: str
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(12, 0))
    a = server_with_study(tmp_path / "a", spec, storage_url=postgres_url)
    b = start_server(tmp_path / "b", storage_url=postgres_url, tracking_uri="")
    try:
        handed: list[dict[str, object]] = []
        for _ in range(3):  # alternate, as a load balancer would
            handed += acquired_params(a.address, spec.name, 2, "wa")
            handed += acquired_params(b.address, spec.name, 2, "wb")
    finally:
        a.stop(grace=0)
        b.stop(grace=0)
    assert len(handed) == 12
    assert len({tuple(sorted(p.items())) for p in handed}) == 12  # no configuration twice
