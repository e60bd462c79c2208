"""What the server's own work for one worker call costs as a study grows: acquire, a rung
report (with its MO-ASHA decision) and a completion, without gRPC or sampling in the way.

One server is built in this process on a fresh database (no gRPC: its ``TrialService`` is
called directly), with MLflow off and the random sampler (its suggestions are made ahead
on the pool's thread and cost next to nothing, so they do not compete for the interpreter
with the calls measured). 16 simulated workers take turns on one thread, as in
``open_loop.py``'s shape: acquire, report eval_loss and peak memory at the rung (step 2 of
4, reduction factor 2), and complete when MO-ASHA says continue. Each call is timed; the
table gives the mean and p99 per window of --window trials, so the growth with the study
shows. ``--storage postgresql`` uses a fresh database on the project's test server.

    .venv/bin/python bench/handler_costs.py                 # ~1 min on a 2-core CPU
    .venv/bin/python bench/handler_costs.py --storage postgresql

Writes bench/results/handler_costs-<storage>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from open_loop import RUNG, _database, bench_spec
from results_file import provenance, write_results
from service_throughput import _values

from stagetune.contract.spec.model import SamplerConfig
from stagetune.server.app import ServerSettings, make_server

CALLS = ("acquire", "report", "complete")


def measure(url: str, tmp: Path, n: int, workers: int) -> list[tuple[int, str, float]]:
    """(trials finished so far, call, seconds) of every call of an n-trial study."""
    spec = dataclasses.replace(bench_spec(n), sampler=SamplerConfig(kind="random", seed=0))
    server = make_server(ServerSettings(port=0, data_dir=tmp, storage_url=url, tracking_uri=""))
    server.service.create_study(spec)
    trials = server.trials
    rng = random.Random(0)
    timed: list[tuple[int, str, float]] = []
    held: list[tuple[int, str, list[float], bool]] = []  # trial, worker, values, reported
    done = issued = 0
    try:
        while done < n:
            while len(held) < workers and issued < n:
                me = f"w{issued}"
                started = time.perf_counter()
                got = trials.acquire(me, "bench")
                timed.append((done, "acquire", time.perf_counter() - started))
                issued += 1
                held.append((got.trial.trial_id, me, _values(rng), False))  # type: ignore[union-attr]
            trial, me, v, reported = held.pop(0)
            started = time.perf_counter()
            if not reported:
                rung = {"eval_loss": v[0], "peak_memory_mb": v[2]}
                stop, _, _ = trials.report_progress(trial, me, RUNG, rung)
                timed.append((done, "report", time.perf_counter() - started))
                if stop:
                    done += 1
                else:
                    held.append((trial, me, v, True))
                continue
            final = {"eval_loss": v[0], "decode_latency_ms": v[1], "peak_memory_mb": v[2]}
            trials.complete(trial, me, final)
            timed.append((done, "complete", time.perf_counter() - started))
            done += 1
    finally:
        server.stop(1)
    return timed


def _summary(timed: list[tuple[int, str, float]], window: int) -> list[dict[str, Any]]:
    rows = []
    for low in range(0, max(d for d, _, _ in timed) + 1, window):
        row: dict[str, Any] = {"trials_from": low, "trials_to": low + window}
        for call in CALLS:
            got = sorted(s for d, c, s in timed if c == call and low <= d < low + window)
            if got:
                row[f"{call}_mean_ms"] = 1e3 * sum(got) / len(got)
                row[f"{call}_p99_ms"] = 1e3 * got[min(len(got) - 1, int(0.99 * len(got)))]
        rows.append(row)
    return rows


def _markdown(record: dict[str, Any]) -> str:
    head = (
        f"commit {record['commit']}, {record['machine']}, {record['storage']}, "
        f"{record['trials']} trials, {record['workers']} simulated workers, random sampler, "
        "MLflow off\n\n"
        "| trials finished | acquire mean / p99 ms | rung report mean / p99 ms "
        "| complete mean / p99 ms |\n|---|---:|---:|---:|\n"
    )
    lines = []
    for r in record["rows"]:
        cells = [
            f"{r.get(f'{c}_mean_ms', float('nan')):.1f} / {r.get(f'{c}_p99_ms', float('nan')):.1f}"
            for c in CALLS
        ]
        lines.append(f"| {r['trials_from']:,}–{r['trials_to']:,} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        _database(args.storage, Path(tmp), "handlers", args.postgres) as url,
    ):
        timed = measure(url, Path(tmp), args.trials, args.workers)
    record = {
        **provenance(("optuna", "sqlalchemy")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "storage": args.storage,
        "trials": args.trials,
        "workers": args.workers,
        "rows": _summary(timed, args.window),
    }
    write_results(f"handler_costs-{args.storage}", record, _markdown(record))


if __name__ == "__main__":
    main()
