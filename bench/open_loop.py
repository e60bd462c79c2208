"""10,000 one-second trials on 16 workers: the shape of Ray Tune's scalability figure.

Ray Tune's docs report 10,000 trials of 1 s on one 16-CPU node in 715 s against an ideal
625 s: 14% overhead. This runs the same shape against the service, side by side in one
run, each arm with a fresh database:

  stagetune/sqlite      16 workers -> stagetune server -> SQLite (WAL), MLflow on (SQLite)
  stagetune-sampler-process/sqlite   the same, sampling in a process of its own
                        (serve --sampler-process) instead of a thread of the server
  optuna-rdb/sqlite     16 workers sample locally -> SQLite (WAL) directly
  stagetune/postgresql  the same as stagetune/sqlite on PostgreSQL (storage and MLflow)
  optuna-proxy/sqlite   16 workers -> Optuna's GrpcStorageProxy -> SQLite (WAL)
  optuna-rdb/postgresql the same as optuna-rdb/sqlite on PostgreSQL

Every arm: multi-objective TPE (multivariate, constant liar) on 3 objectives over the
same 4-parameter space. A trial "runs" 1 s at full budget, sleeping, with one rung at half
of it. stagetune's arms run MO-ASHA (rungs at steps 2 and 4, reduction factor 2): a trial
reports eval_loss and peak memory at the rung and stops there when MO-ASHA says so.
Optuna has no multi-objective pruner: its workers write the rung as an intermediate
attribute and stop each trial at the rung with probability 1/2 (seeded), the fraction
MO-ASHA stops at factor 2, so both kinds of arm do about the same work. MLflow tracking is
on for stagetune's arms and absent from Optuna's (it has none built in).

Overhead = wall / (work / workers) - 1, where work is the seconds the trials actually
slept (10,000 s when no trial stops; Ray Tune's formula). Also reported: acquire (ask)
latency p50/p99, stagetune's sampling time per suggestion (done ahead of acquire), and how
long after the last completion MLflow holds every trial (every trial's run ended, counted
in the tracking database), and after how long the tracker has nothing left (the front's
last rewrite, which waits up to the tracker's 10-s front interval); at most 15 minutes of
waiting. An arm that passes --max-minutes is stopped and reported on the trials it
finished, saying so. Results are written after every arm, so a run cut short keeps the
arms it finished.

    .venv/bin/python bench/open_loop.py                       # ~1 h on a 2-core CPU
    .venv/bin/python bench/open_loop.py --trials 500 --arms stagetune/sqlite   # a quick look

PostgreSQL: --postgres (default: the project's test server, postgres@127.0.0.1:5432);
each arm gets a fresh database, dropped afterwards. Writes bench/results/open_loop.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from results_file import provenance, write_results
from service_throughput import (
    _percentiles,
    _search_space,
    _values,
    _wal,
    load_optuna_study,
    optuna_study_storage,
    start_workers,
)

if TYPE_CHECKING:
    from stagetune.contract.spec import StudySpec

ROOT = Path(__file__).resolve().parent.parent
ARMS = [
    "stagetune/sqlite",
    "stagetune-sampler-process/sqlite",
    "optuna-rdb/sqlite",
    "stagetune/postgresql",
    "optuna-proxy/sqlite",
    "optuna-rdb/postgresql",
]
RUNG, FULL = 2, 4  # steps: one rung at half the trial, then the end


def _metrics(v: list[float]) -> dict[str, float]:
    return {"eval_loss": v[0], "decode_latency_ms": v[1], "peak_memory_mb": v[2]}


def _stagetune_worker(
    address: str, wid: int, secs: float, deadline: float, ready: Any, out: Any
) -> None:
    import grpc

    from stagetune.contract.client import WorkerClient
    from stagetune.v1 import worker_service_pb2 as ws

    rng = random.Random(wid)
    lat: list[float] = []
    work = 0.0
    ended: dict[str, int] = {"complete": 0, "stopped": 0}
    reasons: dict[str, int] = {}
    me = f"bench-{wid}"
    with WorkerClient(address, timeout=120, retries=20, backoff=0.2) as client:
        grpc.channel_ready_future(client._channel).result(timeout=60)
        ready.wait()
        while time.time() < deadline:
            t = time.perf_counter()
            got = client.acquire(me, study_name="bench")
            if isinstance(got, ws.NoTrial):
                reasons[got.reason] = reasons.get(got.reason, 0) + 1
                break
            lat.append(time.perf_counter() - t)
            trial = got.trial.trial_id
            v = _values(rng)
            time.sleep(secs * RUNG / FULL)
            work += secs * RUNG / FULL
            rung = {"eval_loss": v[0], "peak_memory_mb": v[2]}
            if client.report_progress(trial, me, RUNG, rung).stop:
                ended["stopped"] += 1
                continue
            time.sleep(secs * (FULL - RUNG) / FULL)
            work += secs * (FULL - RUNG) / FULL
            client.complete(trial, me, _metrics(v))
            ended["complete"] += 1
    out.put((lat, work, ended, reasons, time.perf_counter()))


def _optuna_worker(
    spec: tuple[str, Any],
    wid: int,
    left: Any,
    secs: float,
    deadline: float,
    ready: Any,
    out: Any,
) -> None:
    from optuna.trial import TrialState

    study = load_optuna_study(spec, "bench", wid)
    rng, coin = random.Random(wid), random.Random(10_000 + wid)
    lat: list[float] = []
    work = 0.0
    ended: dict[str, int] = {"complete": 0, "stopped": 0}
    space = _search_space()
    ready.wait()
    while time.time() < deadline:
        with left.get_lock():
            if left.value <= 0:
                break
            left.value -= 1
        t = time.perf_counter()
        trial = study.ask(space)
        lat.append(time.perf_counter() - t)
        v = _values(rng)
        time.sleep(secs * RUNG / FULL)
        work += secs * RUNG / FULL
        trial.set_user_attr(f"rung_{RUNG}", {"eval_loss": v[0], "peak_memory_mb": v[2]})
        if coin.random() < 0.5:
            study.tell(trial, state=TrialState.PRUNED)
            ended["stopped"] += 1
            continue
        time.sleep(secs * (FULL - RUNG) / FULL)
        work += secs * (FULL - RUNG) / FULL
        study.tell(trial, v)
        ended["complete"] += 1
    out.put((lat, work, ended, {}, time.perf_counter()))


def _run(target: Any, args_of: Any, k: int) -> dict[str, Any]:
    """k worker processes; the clock starts once every one is connected."""
    procs, out, start = start_workers(target, args_of, k)
    lat: list[float] = []
    work, last = 0.0, start
    ended = {"complete": 0, "stopped": 0}
    reasons: dict[str, int] = {}
    for _ in procs:
        got_lat, got_work, got_ended, got_reasons, finished = out.get()
        lat += got_lat
        work += got_work
        last = max(last, finished)
        for key, n in got_ended.items():
            ended[key] += n
        for key, n in got_reasons.items():
            reasons[key] = reasons.get(key, 0) + n
    for p in procs:
        p.join()
    return {
        "wall_seconds": last - start,
        "work_seconds": work,
        "latencies": lat,
        "ended": ended,
        "no_trial_reasons": reasons,
        "last_completion": last,
    }


@contextmanager
def _database(kind: str, tmp: Path, name: str, admin: str) -> Iterator[str]:
    """A fresh database URL of the kind (SQLite file in WAL mode, or a new PostgreSQL
    database, dropped afterwards)."""
    if kind == "sqlite":
        path = tmp / f"{name}.db"
        _wal(path)
        yield f"sqlite:///{path}"
        return
    import sqlalchemy

    db = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(f"{admin}/test", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{db}"')
    try:
        yield f"{admin}/{db}"
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        engine.dispose()


def _ended_runs(tracking: str) -> int:
    """Trial runs that have ended, counted in the tracking database itself (a search
    through MLflow's client would load 10,000 runs every poll)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(tracking)
    try:
        with engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "WHERE t.key = 'stagetune.kind' AND t.value = 'trial' "
                    "AND r.end_time IS NOT NULL"
                ).scalar_one()
            )
    finally:
        engine.dispose()


def _mlflow_runs_ended(tracking: str) -> tuple[int, int]:
    """(trial runs, of which ended) in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs, ended, token = 0, 0, None
    while True:
        page = client.search_runs(
            exps, "tags.`stagetune.kind` = 'trial'", max_results=50_000, page_token=token
        )
        runs += len(page)
        ended += sum(r.info.end_time is not None for r in page)
        token = page.token
        if not token:
            return runs, ended


def bench_spec(n: int) -> StudySpec:
    """The study every stagetune arm runs: the lora config's space and objectives, n
    trials, MO-ASHA with one rung at step RUNG of FULL, reduction factor 2."""
    from stagetune.contract.spec import BudgetSpec, FidelitySpec, load_spec_file

    spec = load_spec_file(ROOT / "configs" / "lora.yaml")
    return dataclasses.replace(
        spec,
        name="bench",
        budget=BudgetSpec(n, 0),
        early_stopping="mo_asha",
        fidelity=FidelitySpec(min_steps=RUNG, max_steps=FULL, reduction_factor=2),
    )


def arm_stagetune(
    kind: str,
    tmp: Path,
    k: int,
    n: int,
    secs: float,
    minutes: float,
    admin: str,
    sampler_process: bool = False,
) -> dict[str, Any]:
    from stagetune.contract.client import StudyClient
    from stagetune.server.app import ServerSettings, make_server
    from stagetune.server.optuna_policy import OptunaPolicy

    spec = bench_spec(n)
    with _database(kind, tmp, "st", admin) as storage, _database(kind, tmp, "ml", admin) as ml:
        tracking = ml
        settings = ServerSettings(
            port=0,
            data_dir=tmp,
            storage_url=storage,
            tracking_uri=tracking,
            sampler_process=sampler_process,
        )
        server = make_server(settings).start()
        try:
            with StudyClient(server.address) as sc:
                sc.create_study(spec)
            deadline = time.time() + minutes * 60
            got = _run(_stagetune_worker, lambda i, ctx: (server.address, i, secs, deadline), k)
            tracker = server.service.tracker
            done = got["ended"]["complete"] + got["ended"]["stopped"]
            until = time.perf_counter() + 15 * 60
            while _ended_runs(tracking) < done and time.perf_counter() < until:
                time.sleep(0.5)
            # Every trial's run ended, its final metrics and tags written.
            got["mlflow_lag_seconds"] = time.perf_counter() - got["last_completion"]
            while tracker.backlog() > 0 and time.perf_counter() < until:
                time.sleep(0.5)
            # Then the rest: the front's last rewrite (rank tags, CSV, plot).
            got["mlflow_drain_seconds"] = time.perf_counter() - got["last_completion"]
            got["mlflow_backlog_left"] = tracker.backlog()  # 0 unless 15 min did not drain it
            got["mlflow_runs"], got["mlflow_runs_ended"] = _mlflow_runs_ended(tracking)
            policy = server.service.policy
            assert isinstance(policy, OptunaPolicy)  # the default policy: its pool is measured
            pool = policy.pool
            got["sample_seconds"] = list(pool.sample_seconds)
            got["pool_misses"] = pool.misses
            return got
        finally:
            server.stop(5)


def arm_optuna(
    kind: str, tmp: Path, k: int, n: int, secs: float, minutes: float, admin: str, proxy: bool
) -> dict[str, Any]:
    with (
        _database(kind, tmp, "optuna", admin) as url,
        optuna_study_storage(url, proxy) as where,
    ):
        left = mp.get_context("spawn").Value("i", n)
        deadline = time.time() + minutes * 60
        return _run(_optuna_worker, lambda i, c: (where, i, left, secs, deadline), k)


def _row(arm: str, n: int, k: int, got: dict[str, Any]) -> dict[str, Any]:
    done = got["ended"]["complete"] + got["ended"]["stopped"]
    ideal = got["work_seconds"] / k
    q = _percentiles(got["latencies"])
    row = {
        "arm": arm,
        "trials_asked": n,
        "trials_done": done,
        "capped": done < n,
        "complete": got["ended"]["complete"],
        "stopped": got["ended"]["stopped"],
        "wall_seconds": got["wall_seconds"],
        "ideal_seconds": ideal,
        "overhead": got["wall_seconds"] / ideal - 1 if ideal else None,
        "acquire_p50_ms": q[0],
        "acquire_p99_ms": q[1],
        "no_trial_reasons": got["no_trial_reasons"],
    }
    if "sample_seconds" in got:
        s = _percentiles(got["sample_seconds"])
        row |= {
            "sample_p50_ms": s[0],
            "sample_p99_ms": s[1],
            "pool_misses": got["pool_misses"],
            "mlflow_lag_seconds": got["mlflow_lag_seconds"],
            "mlflow_runs": got["mlflow_runs"],
            "mlflow_runs_ended": got["mlflow_runs_ended"],
            "mlflow_drain_seconds": got["mlflow_drain_seconds"],
            "mlflow_backlog_left": got["mlflow_backlog_left"],
        }
    return row


def _markdown(record: dict[str, Any]) -> str:
    lines = [
        f"commit {record['commit']}, {record['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        f"{record['workers']} workers, trials of {record['trial_seconds']} s at full budget, "
        f"cap {record['max_minutes']} min an arm",
        "",
        "| arm | trials done (stopped) | wall s | ideal s | overhead | acquire p50 / p99 ms "
        "| sampling p50 / p99 ms | MLflow holds all, s after last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        done = f"{r['trials_done']} ({r['stopped']})" + (" capped" if r["capped"] else "")
        sample = (
            f"{r['sample_p50_ms']:.0f} / {r['sample_p99_ms']:.0f}"
            if "sample_p50_ms" in r
            else "in ask"
        )
        mlflow = "no tracking"
        if "mlflow_lag_seconds" in r:
            left = r.get("mlflow_backlog_left", 0)
            mlflow = (
                f"{r['mlflow_lag_seconds']:.0f} ({r['mlflow_runs_ended']}/{r['mlflow_runs']} "
                f"runs ended); front {'> ' if left else ''}{r['mlflow_drain_seconds']:.0f}"
                + (f", {left} events left" if left else "")
            )
        lines.append(
            f"| {r['arm']} | {done} | {r['wall_seconds']:.0f} | {r['ideal_seconds']:.0f} "
            f"| {r['overhead']:+.1%} | {r['acquire_p50_ms']:.1f} / {r['acquire_p99_ms']:.1f} "
            f"| {sample} | {mlflow} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trial-seconds", type=float, default=1.0)
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--max-minutes", type=float, default=25.0, help="cap on one arm")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    record: dict[str, Any] = {
        **provenance(("optuna", "mlflow", "grpcio", "sqlalchemy")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "workers": args.workers,
        "trial_seconds": args.trial_seconds,
        "max_minutes": args.max_minutes,
        "rows": [],
    }
    for arm in args.arms:
        system, kind = arm.split("/")
        with tempfile.TemporaryDirectory() as tmp:
            common = (kind, Path(tmp), args.workers, args.trials, args.trial_seconds)
            if system.startswith("stagetune"):
                own_process = system == "stagetune-sampler-process"
                got = arm_stagetune(*common, args.max_minutes, args.postgres, own_process)
            else:
                proxy = system == "optuna-proxy"
                got = arm_optuna(*common, args.max_minutes, args.postgres, proxy)
        row = _row(arm, args.trials, args.workers, got)
        record["rows"].append(row)
        print({k: v for k, v in row.items()}, flush=True)
        write_results("open_loop", record, _markdown(record))  # after every arm


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
