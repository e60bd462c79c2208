"""``stagetune demo``: one small real study on CPU, end to end.

Starts the service (SQLite + local MLflow store under one folder), submits the demo LoRA
study, runs local workers as separate processes until the study is finished, then prints
the Pareto front and the command that opens the MLflow UI on the result.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stagetune.cli.render import render_pareto, render_status
from stagetune.contract.client import StudyClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec import BudgetSpec, load_spec_file

__all__ = ["run_demo"]

_MARKER = ".stagetune-demo"


def _fresh_dir(path: Path) -> None:
    if path.exists():
        if not (path / _MARKER).exists():
            raise InvalidArgument(
                "--dir", f"{path} exists and was not made by the demo; pick another"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / _MARKER).touch()


def run_demo(work: Path, config: Path, *, workers: int = 2, trials: int | None = None) -> int:
    from stagetune.server.app import ServerSettings, make_server

    started = time.monotonic()
    spec = load_spec_file(config)
    if trials is not None:
        spec = dataclasses.replace(spec, budget=BudgetSpec(trials, spec.budget.max_retries))
    work = work.resolve()
    _fresh_dir(work)
    print(
        f"stagetune demo: study {spec.name} ({spec.stage}), {spec.budget.max_trials} trials, "
        f"{workers} workers, in {work}",
        flush=True,
    )
    server = make_server(ServerSettings(host="127.0.0.1", port=0, data_dir=work)).start()
    print(
        f"server on {server.address}; storage {server.settings.resolved_storage_url()}", flush=True
    )
    env = dict(os.environ, STAGETUNE_CACHE=str(work / "cache"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with StudyClient(server.address) as client:
            client.create_study(spec)
            threads = max(1, (os.cpu_count() or 2) // workers)
            for i in range(workers):
                cmd = [
                    sys.executable,
                    "-m",
                    "stagetune.cli",
                    "worker",
                    "--server",
                    server.address,
                    "--study",
                    spec.name,
                    "--threads",
                    str(threads),
                    "--work-dir",
                    str(work / "work"),
                    "--worker-id",
                    f"demo-worker-{i}",
                ]
                procs.append(subprocess.Popen(cmd, env=env))
            last = ""
            while any(p.poll() is None for p in procs):
                time.sleep(2)
                c = client.get_study(spec.name).counts
                line = (
                    f"progress: {c.complete} complete, {c.stopped} stopped, "
                    f"{c.failed} failed, {c.running} running "
                    f"[{time.monotonic() - started:.0f}s]"
                )
                counts = line.split(" [")[0]
                if counts != last:
                    print(line, flush=True)
                    last = counts
            server.tracker.flush(timeout=120)
            print()
            print(render_status(client, spec.name))
            print()
            print(render_pareto(client.pareto_front(spec.name), "table"))
            study = client.get_study(spec.name)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        server.stop(grace=5)
    wall = time.monotonic() - started
    tracking = server.settings.resolved_tracking_uri()
    print(f"\n{study.counts.complete} trials complete in {wall:.0f}s wall time.")
    print("Open the MLflow UI on the result with:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000")
    print("Then browse experiment stagetune/" + spec.stage + f", parent run {spec.name}.")
    return 0 if study.counts.complete > 0 else 1
