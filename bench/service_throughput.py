"""Service throughput: K polling workers running zero-cost trials, side by side.

Compares, in one run, on the same machine, sampler and storage kind:
  stagetune     workers -> stagetune server (server-side sampling) -> SQLite
  optuna-proxy  workers sample locally -> Optuna GrpcStorageProxy -> SQLite
  optuna-rdb    workers sample locally -> SQLite directly
Each worker is its own process and loops acquire/ask -> complete/tell with random
3-objective results (multi-objective TPE, constant liar) until the budget is spent.
Reports trials/s and acquire (ask) latency p50/p99.

Like for like: every SQLite database runs in WAL mode (stagetune's server sets it; the
Optuna arms' file is switched to WAL before the run), and MLflow tracking is off for every
arm (Optuna has none to turn on); `stagetune+mlflow` is the stagetune arm with its MLflow
store on. Optuna's ask samples inside the call; stagetune samples ahead on its suggestion
thread, so its acquire latency excludes sampling: the time each suggestion took the sampler
is reported beside it (sample p50/p99).

    .venv/bin/python bench/service_throughput.py --workers 4 16 --trials 100 300
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stagetune.trainer.assignment import free_port

DIRECTIONS: list[Any] = ["minimize", "minimize", "minimize"]


def _search_space() -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    return {
        "learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
        "lora_r": IntDistribution(2, 32, log=True),
        "lora_alpha": CategoricalDistribution([8, 16, 32, 64]),
        "lora_dropout": FloatDistribution(0.0, 0.2),
    }


def _values(rng: random.Random) -> list[float]:
    return [rng.uniform(1, 5), rng.uniform(1, 10), rng.uniform(100, 800)]


def _stagetune_worker(
    address: str, study: str, wid: int, trial_seconds: float, ready: Any, out: Any
) -> None:
    import grpc

    from stagetune.contract.client import WorkerClient
    from stagetune.v1 import worker_service_pb2 as ws

    rng = random.Random(wid)
    lat: list[float] = []
    with WorkerClient(address, timeout=60) as client:
        grpc.channel_ready_future(client._channel).result(timeout=60)
        ready.wait()  # every worker is up: the clock starts now
        while True:
            t = time.perf_counter()
            got = client.acquire(f"bench-{wid}", study_name=study)
            lat.append(time.perf_counter() - t)
            if isinstance(got, ws.NoTrial):
                lat.pop()
                break
            time.sleep(trial_seconds)  # the trial "runs"
            v = _values(rng)
            metrics = {"eval_loss": v[0], "decode_latency_ms": v[1], "peak_memory_mb": v[2]}
            client.complete(got.trial.trial_id, f"bench-{wid}", metrics)
    out.put(lat)


def connect_args(url: str) -> dict[str, Any]:
    """SQLite waits for its write lock up to 60 s (16 writers queue on it); others as is."""
    return {"timeout": 60} if url.startswith("sqlite") else {}


@contextmanager
def optuna_study_storage(url: str, proxy: bool) -> Iterator[tuple[str, Any]]:
    """Create the Optuna study "bench" at ``url`` and yield where its workers reach it:
    ``("rdb", url)`` directly, or ``("proxy", port)`` through Optuna's GrpcStorageProxy
    server, started here and stopped after."""
    import optuna
    from optuna.storages._grpc.server import make_server

    rdb = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args(url)})
    optuna.create_study(study_name="bench", storage=rdb, directions=DIRECTIONS)
    server = None
    where: tuple[str, Any] = ("rdb", url)
    if proxy:
        port = free_port()
        server = make_server(rdb, "127.0.0.1", port)
        server.start()
        where = ("proxy", port)
    try:
        yield where
    finally:
        if server is not None:
            server.stop(0)
        rdb.remove_session()
        rdb.engine.dispose()


def load_optuna_study(storage_spec: tuple[str, Any], study: str, wid: int) -> Any:
    """A worker's own handle on the Optuna study: on the database directly (``("rdb",
    url)``) or through the gRPC proxy (``("proxy", port)``), with its own TPE sampler
    (multivariate, constant liar), seeded by the worker's index."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kind, where = storage_spec
    storage: Any
    if kind == "proxy":
        storage = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=where)
    else:
        engine = {"connect_args": connect_args(where)}
        storage = optuna.storages.RDBStorage(where, engine_kwargs=engine)
    sampler = optuna.samplers.TPESampler(seed=wid, multivariate=True, constant_liar=True)
    return optuna.load_study(study_name=study, storage=storage, sampler=sampler)


def _optuna_worker(
    storage_spec: tuple[str, Any],
    study: str,
    wid: int,
    left: Any,
    trial_seconds: float,
    ready: Any,
    out: Any,
) -> None:
    s = load_optuna_study(storage_spec, study, wid)
    rng = random.Random(wid)
    lat: list[float] = []
    space = _search_space()
    ready.wait()  # every worker is up: the clock starts now
    while True:
        with left.get_lock():
            if left.value <= 0:
                break
            left.value -= 1
        t = time.perf_counter()
        trial = s.ask(space)
        lat.append(time.perf_counter() - t)
        time.sleep(trial_seconds)  # the trial "runs"
        s.tell(trial, _values(rng))
    out.put(lat)


def start_workers(target: Any, args_of: Any, k: int) -> tuple[list[Any], Any, float]:
    """Start k worker processes (``target(*args_of(i, ctx), ready, out)``) and wait until
    every one is connected; returns them, the queue they report on, and when the clock
    starts (process start-up and imports are not the service's cost)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Barrier(k + 1)
    procs = [ctx.Process(target=target, args=(*args_of(i, ctx), ready, out)) for i in range(k)]
    for p in procs:
        p.start()
    ready.wait()
    return procs, out, time.perf_counter()


def _run_workers(target: Any, args_of: Any, k: int) -> tuple[float, list[float]]:
    """k workers' wall time and acquire latencies, timing the work only."""
    procs, out, start = start_workers(target, args_of, k)
    lat: list[float] = []
    for _ in procs:
        lat += out.get()
    for p in procs:
        p.join()
    return time.perf_counter() - start, lat


def _wal(path: Path) -> None:
    """Switch a SQLite file to WAL (persistent: every later connection uses it)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")


def bench_stagetune(
    tmp: Path, k: int, n: int, secs: float, tracking: bool = False
) -> tuple[float, list[float], list[float]]:
    import dataclasses

    from stagetune.contract.client import StudyClient
    from stagetune.contract.spec import BudgetSpec, load_spec_file
    from stagetune.server.app import ServerSettings, make_server
    from stagetune.server.optuna_policy import OptunaPolicy

    spec = load_spec_file(Path(__file__).resolve().parents[1] / "configs" / "lora.yaml")
    spec = dataclasses.replace(spec, name="bench", budget=BudgetSpec(n, 0))
    uri = f"sqlite:///{tmp / 'mlflow.db'}" if tracking else ""
    server = make_server(ServerSettings(port=0, data_dir=tmp, tracking_uri=uri)).start()
    try:
        with StudyClient(server.address) as sc:
            sc.create_study(spec)
        result = _run_workers(
            _stagetune_worker, lambda i, ctx: (server.address, "bench", i, secs), k
        )
        policy = server.service.policy
        assert isinstance(policy, OptunaPolicy)  # the default policy: its pool is measured
        pool = policy.pool
        print(f"stagetune: {pool.misses} acquire(s) found no ready suggestion and waited")
        return (*result, list(pool.sample_seconds))
    finally:
        server.stop(0)


def bench_optuna(
    tmp: Path, k: int, n: int, secs: float, proxy: bool
) -> tuple[float, list[float], list[float]]:
    _wal(tmp / "optuna.db")
    with optuna_study_storage(f"sqlite:///{tmp / 'optuna.db'}", proxy) as spec:
        left = mp.get_context("spawn").Value("i", n)
        wall, lat = _run_workers(_optuna_worker, lambda i, c: (spec, "bench", i, left, secs), k)
        return wall, lat, []  # sampling is inside ask


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--trials", type=int, nargs="+", default=[100])
    parser.add_argument(
        "--systems",
        nargs="+",
        default=["stagetune", "stagetune+mlflow", "optuna-proxy", "optuna-rdb"],
    )
    parser.add_argument(
        "--trial-seconds",
        type=float,
        default=0.0,
        help="how long each trial 'runs' between acquire and complete (0: zero-cost trials, "
        "a closed loop that saturates the service; >0: the load real trials put on it)",
    )
    args = parser.parse_args()
    rows = []
    for n in args.trials:
        for k in args.workers:
            for system in args.systems:
                with tempfile.TemporaryDirectory() as tmp:
                    if system.startswith("stagetune"):
                        tracked = system == "stagetune+mlflow"
                        wall, lat, sample = bench_stagetune(
                            Path(tmp), k, n, args.trial_seconds, tracked
                        )
                    else:
                        proxy = system == "optuna-proxy"
                        wall, lat, sample = bench_optuna(Path(tmp), k, n, args.trial_seconds, proxy)
                q = _percentiles(lat)
                s = _percentiles(sample) if sample else None
                row = (n, k, system, len(lat) / wall, q, s)
                rows.append(row)
                print(
                    f"trials={n:5d} workers={k:3d} {system:16s} {row[3]:7.1f} trials/s  "
                    f"acquire p50 {q[0]:7.1f} ms  p99 {q[1]:7.1f} ms"
                    + (f"  sample p50 {s[0]:.1f} ms p99 {s[1]:.1f} ms" if s else ""),
                    flush=True,
                )
    print(
        "\n| trials | workers | system | trials/s | acquire p50 (ms) | acquire p99 (ms) "
        "| sample p50 / p99 (ms) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n, k, system, tps, q, s in rows:
        sampled = f"{s[0]:.1f} / {s[1]:.1f}" if s else "in acquire"
        print(f"| {n} | {k} | {system} | {tps:.1f} | {q[0]:.1f} | {q[1]:.1f} | {sampled} |")


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99, in milliseconds."""
    q = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else [seconds[0]] * 99
    return q[49] * 1e3, q[98] * 1e3


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
