"""The suggestion pool: acquires are served from suggestions computed ahead, the in-memory
mirror learns every result, and a restarted server rebuilds it from the database."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from optuna.trial import FrozenTrial, TrialState, create_trial

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import BudgetSpec, ConstraintSpec, StudySpec, value_from_proto
from stagetune.objectives.pareto import non_dominated_ranks
from stagetune.server import attributes as at
from stagetune.server.app import StagetuneServer
from stagetune.server.pool import MirrorView, SuggestionPool, bounded_history
from tests.conftest import objective_metrics, start_server


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def mirror_states(pool: SuggestionPool, study: str) -> dict[TrialState, int]:
    view = pool.inspect(study)
    return {TrialState[k]: n for k, n in view.states.items()} if view is not None else {}


def mirror(pool: SuggestionPool, study: str) -> MirrorView:
    view = pool.inspect(study)
    assert view is not None, f"no mirror of {study}"
    return view


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
    """A server (tracking off, its suggestion engine in a process of its own: the same
    engine as on a thread, and its process's messages) on which ``spec`` has been
    created."""
    srv = start_server(path, tracking_uri="", sampler_process=True, **settings)
    try:
        with StudyClient(srv.address, retries=0) as sc:
            sc.create_study(spec)
    except BaseException:
        srv.stop(grace=0)
        raise
    return srv


def pool_server(
    path: Path, lora_spec: StudySpec
) -> tuple[StudySpec, StagetuneServer, SuggestionPool]:
    """A 20-trial study on its own server, and that server's pool."""
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(20, 0))
    srv = server_with_study(path, spec)
    return spec, srv, srv.service.policy.pool


def test_acquires_pop_ready_suggestions_and_the_mirror_learns_each_result(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, srv, pool = pool_server(tmp_path, lora_spec)
    try:
        run_trials(srv.address, spec.name, 1)  # the first acquire builds the mirror
        eventually(lambda: len(pool.ready(spec.name)) == pool.size)
        misses = pool.misses
        run_trials(srv.address, spec.name, 5)
        assert pool.misses == misses  # every acquire was a pop: nothing waited
        # The six results reach the mirror's sampler; the ready suggestions run there.
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 6)
        eventually(
            lambda: mirror_states(pool, spec.name).get(TrialState.RUNNING, 0) >= pool.size - 1
        )
        eventually(lambda: len(pool.ready(spec.name)) == pool.size)
        next_up = pool.ready(spec.name)[0].params
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
    return (
        spec,
        first,
        lambda: start_server(tmp_path / "b", storage_url=db, tracking_uri="", sampler_process=True),
    )


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
        assert mirror(pool, spec.name).known == 6
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
        built = mirror(pool, spec.name).generation
        run_trials(b.address, spec.name, 3, worker="other-replica")
        run_trials(a.address, spec.name, 1)  # a pop lets the refill loop notice
        eventually(lambda: mirror(pool, spec.name).generation > built)
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 6)
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_a_killed_suggestion_engine_is_started_again_and_the_study_goes_on(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, srv, pool = pool_server(tmp_path, lora_spec)
    try:
        ids = run_trials(srv.address, spec.name, 3)
        pid = pool.engine_pid
        assert pid is not None and pid != os.getpid()  # the engine has its own process
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        eventually(lambda: pool.engine_pid not in (None, pid))
        assert pool.restarts == 1
        ids += run_trials(srv.address, spec.name, 2, worker="after-kill")
        assert len(set(ids)) == 5  # no trial handed out twice
        # The new engine rebuilt the mirror from the database: nothing reported was lost.
        eventually(lambda: mirror_states(pool, spec.name).get(TrialState.COMPLETE) == 5)
    finally:
        srv.stop(grace=0)


def test_a_study_nobody_asks_for_is_forgotten_and_rebuilt_when_asked_again(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(10, 0))
    srv = server_with_study(tmp_path, spec)
    pool = srv.service.policy.pool
    try:
        run_trials(srv.address, spec.name, 2)
        pool.configure(idle_seconds=0.3)  # as if ten idle minutes had passed
        eventually(lambda: pool.inspect(spec.name) is None)
        assert pool.ready(spec.name) == []  # its ready suggestions went with it
        pool.configure(idle_seconds=600.0)
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


def test_a_bounded_history_holds_the_best_layers_whole_and_a_sample_of_the_rest(
    lora_spec: StudySpec,
) -> None:
    rng = random.Random(0)
    trials: list[FrozenTrial] = []
    for i in range(400):
        if i % 10 == 0:  # stopped at a rung: never among the best, may be sampled
            trials.append(create_trial(state=TrialState.PRUNED))
        else:
            values = [rng.uniform(1, 5), rng.uniform(1, 10), rng.uniform(100, 800)]
            trials.append(create_trial(values=values))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranks = non_dominated_ranks([t.values for t in complete], lora_spec.directions)
    layers = 1  # the fewest whole layers holding a quarter of the history (80)
    while sum(r <= layers for r in ranks) < 20:
        layers += 1
    best = {id(t) for t, r in zip(complete, ranks, strict=True) if r <= layers}
    assert len(best) <= 40  # else this would check the cut at half, not whole layers

    kept = bounded_history(lora_spec, trials, 80, random.Random(1))

    assert len(kept) == 80
    position = {id(t): i for i, t in enumerate(trials)}
    assert [position[id(t)] for t in kept] == sorted(position[id(t)] for t in kept)
    assert best <= {id(t) for t in kept}  # whole layers: TPE's good group is among them
    # The rest is a sample of every other trial, not the next layers: some lie far down.
    rank_of = {id(t): r for t, r in zip(complete, ranks, strict=True)}
    assert max(rank_of.get(id(t), 0) for t in kept) > layers + 3
    assert any(t.state == TrialState.PRUNED for t in kept)
    assert bounded_history(lora_spec, trials, 0, rng) == trials  # 0: no bound
    assert bounded_history(lora_spec, trials[:80], 80, rng) == trials[:80]


def test_an_infeasible_trial_is_not_kept_as_one_of_the_best(lora_spec: StudySpec) -> None:
    spec = dataclasses.replace(lora_spec, constraints=(ConstraintSpec("peak_memory_mb", max=900),))
    over = {at.METRICS: {"peak_memory_mb": 10_000.0}}  # far above the limit
    trials = [create_trial(values=[0.1, 0.1, 1.0], user_attrs=over)]
    trials += [create_trial(values=[1.0 + i, 5.0, 500.0 - i]) for i in range(99)]
    kept = [bounded_history(spec, trials, 10, random.Random(seed)) for seed in range(20)]
    # It dominates every other trial; were it counted among the best it would be in all
    # 20. It is only ever drawn in the random part (5 of 95 places).
    assert sum(trials[0] in k for k in kept) <= 5
    assert all(trials[1] in k for k in kept)  # the feasible front's first trial is best


def test_a_large_studys_mirror_is_rebuilt_on_a_bounded_history_and_keeps_suggesting(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    spec, first, start_second = two_servers_on(tmp_path, lora_spec, 60)
    try:
        pool = first.service.policy.pool
        pool.configure(history=10)
        run_trials(first.address, spec.name, 30)
        # Rebuilt on a bounded history, maybe more than once, every trial known.
        eventually(lambda: mirror(pool, spec.name).known >= 30)
        view = mirror(pool, spec.name)
        assert view.generation > 1
        assert view.finished <= 10 + 10 // 2 + 1
    finally:
        first.stop(grace=0)
    second = start_second()
    try:
        second.service.policy.pool.configure(history=10)
        run_trials(second.address, spec.name, 2, worker="after-restart")
        # Built from the database on the bound: ten of the 30, then the two new results.
        eventually(
            lambda: (
                mirror_states(second.service.policy.pool, spec.name).get(TrialState.COMPLETE) == 12
            )
        )
        assert mirror(second.service.policy.pool, spec.name).known >= 32
    finally:
        second.stop(grace=0)
