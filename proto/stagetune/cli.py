"""The ``stagetune`` command line: serve, submit, worker, status, pareto, demo.

Heavy imports live inside each command, so ``stagetune --help`` and the CLI's own commands
start fast and the ``status``/``pareto`` commands never import torch. Errors print one line
naming the problem (and the field, for a bad config) and exit with status 2.

Client commands take ``--token`` (else ``$STAGETUNE_TOKEN``; prefer the variable: a flag
shows in ``ps``) and ``--tls-ca``/``--tls-cert``/``--tls-key`` (else ``$STAGETUNE_TLS_*``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stagetune.client import DEFAULT_ADDRESS, StudyClient
from stagetune.errors import StagetuneError
from stagetune.redact import RedactingFilter
from stagetune.spec import load_spec_file, value_from_proto
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import types_pb2 as pb

__all__ = ["main"]

_STUDY_STATE = {1: "running", 2: "stopped", 3: "done"}
_TRIAL_STATE = {
    1: "waiting",
    2: "running",
    3: "complete",
    4: "stopped",
    5: "failed",
    6: "infeasible",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _params(trial: pb.Trial) -> dict[str, Any]:
    return {k: value_from_proto(v) for k, v in sorted(trial.params.items())}


# ------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import ServerSettings, run_server

    settings = ServerSettings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        storage_url=args.storage,
        tracking_uri=args.tracking_uri,
        lease_seconds=args.lease_seconds,
        auth_file=Path(args.auth_file) if args.auth_file else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
    )
    return run_server(settings)


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """Client keyword arguments from the connection flags (None: from the environment)."""
    return {
        "token": args.token,
        "ca_cert": args.tls_ca,
        "client_cert": args.tls_cert,
        "client_key": args.tls_key,
    }


def _study_client(args: argparse.Namespace) -> StudyClient:
    return StudyClient(args.server, **_connection(args))


# ------------------------------------------------------------------ submit


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec_file(args.config)
    if args.name:
        spec = dataclasses.replace(spec, name=args.name)
    with _study_client(args) as client:
        study, created = client.create_study(spec)
    if created:
        print(f"created study {spec.name} ({spec.stage}, {spec.budget.max_trials} trials)")
    else:
        print(f"study {spec.name} already exists with this spec; nothing changed")
    if study.mlflow_run_id:
        print(f"  MLflow experiment {study.mlflow_experiment_id}, run {study.mlflow_run_id}")
    return 0


# ------------------------------------------------------------------ worker


def cmd_worker(args: argparse.Namespace) -> int:
    from trainer.worker import Worker, WorkerSettings

    settings = WorkerSettings(
        server=args.server,
        study_name=args.study or "",
        max_trials=args.max_trials,
        processes=args.processes,
        gpus=args.gpus,
        threads_per_trial=args.threads,
        work_dir=Path(args.work_dir),
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    if args.worker_id:
        settings.worker_id = args.worker_id
    worker = Worker(settings)
    worker.install_signal_handlers()
    worker.run()
    return 0


# ------------------------------------------------------------------ status / pareto


def _counts(study: pb.Study) -> str:
    c = study.counts
    return (
        f"{c.complete} complete, {c.stopped} stopped, {c.failed} failed, "
        f"{c.infeasible} infeasible, {c.running} running, {c.waiting} waiting"
    )


def _finished(study: pb.Study) -> int:
    c = study.counts
    return c.complete + c.stopped + c.failed + c.infeasible


def render_status(client: StudyClient, name: str | None) -> str:
    if not name:
        studies = client.list_studies()
        if not studies:
            return "no studies"
        rows = [
            [
                s.spec.name,
                pb.Stage.Name(s.spec.stage).removeprefix("STAGE_").lower(),
                _STUDY_STATE.get(s.state, "?"),
                f"{_finished(s)}/{s.spec.budget.max_trials}",
                _counts(s),
                s.hypervolume,
            ]
            for s in studies
        ]
        return _table(["study", "stage", "state", "finished", "trials", "hypervolume"], rows)
    study = client.get_study(name)
    trials = client.list_trials(name)
    out = [
        f"study {name}: {_STUDY_STATE.get(study.state, '?')}, {_counts(study)}, "
        f"budget {study.spec.budget.max_trials}, hypervolume {study.hypervolume:.4g}"
    ]
    metrics = [o.metric for o in study.spec.objectives]
    running = [t for t in trials if t.state == pb.TRIAL_STATE_RUNNING]
    if running:
        out.append("\nrunning:")
        rows = [
            [t.trial_id, t.number, t.attempt, t.worker_id, t.rungs[-1].step if t.rungs else 0]
            for t in running
        ]
        out.append(_table(["trial", "#", "attempt", "worker", "last rung"], rows))
    front = sorted(
        (t for t in trials if t.pareto_rank == 1), key=lambda t: list(t.objective_values)
    )
    if front:
        out.append("\nPareto front:")
        rows = [[t.trial_id, t.number, *t.objective_values] for t in front]
        out.append(_table(["trial", "#", *metrics], rows))
    ended = [
        t
        for t in trials
        if t.state in (pb.TRIAL_STATE_STOPPED, pb.TRIAL_STATE_FAILED, pb.TRIAL_STATE_INFEASIBLE)
    ]
    if ended:
        out.append("\nstopped / failed / infeasible:")
        rows = [
            [t.trial_id, _TRIAL_STATE[t.state], t.reason.splitlines()[0][:80] if t.reason else ""]
            for t in ended[-10:]
        ]
        out.append(_table(["trial", "state", "reason"], rows))
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        print(render_status(client, args.study))
    return 0


def render_pareto(front: ss.GetParetoFrontResponse, fmt: str) -> str:
    metrics = [o.metric for o in front.objectives]
    rows: list[dict[str, Any]] = []
    for t in front.trials:
        rows.append(
            {
                "trial_id": t.trial_id,
                "number": t.number,
                "knee": t.trial_id == front.knee_trial_id,
                "objectives": dict(zip(metrics, t.objective_values, strict=True)),
                "params": _params(t),
                "mlflow_run_id": t.mlflow_run_id,
            }
        )
    if fmt == "json":
        return json.dumps(
            {
                "objectives": [
                    {"metric": o.metric, "direction": pb.Direction.Name(o.direction)[10:].lower()}
                    for o in front.objectives
                ],
                "hypervolume": front.hypervolume,
                "knee_trial_id": front.knee_trial_id,
                "trials": rows,
            },
            indent=2,
        )
    names = sorted({k for r in rows for k in r["params"]})
    table_rows = [
        [
            r["trial_id"],
            r["number"],
            *r["objectives"].values(),
            *(r["params"].get(n, "") for n in names),
            "*" if r["knee"] else "",
        ]
        for r in rows
    ]
    headers = ["trial_id", "number", *metrics, *names, "knee"]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(headers)
        writer.writerows([[*row[:-1], bool(row[-1])] for row in table_rows])
        return buf.getvalue().rstrip("\n")
    if not rows:
        return "the Pareto front is empty: no trial has completed yet"
    return _table(headers, table_rows) + f"\n\nhypervolume {front.hypervolume:.4g}; * = knee point"


def cmd_pareto(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        print(render_pareto(client.pareto_front(args.study), args.format))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        study = client.stop_study(args.study)
    print(f"study {args.study}: {_STUDY_STATE.get(study.state, '?')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stagetune.demo import run_demo

    return run_demo(Path(args.dir), Path(args.config), workers=args.workers, trials=args.trials)


# ------------------------------------------------------------------ parser


def _repo_config(name: str) -> str:
    here = Path(__file__).resolve().parents[2] / "configs" / name
    return str(here if here.exists() else Path("configs") / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagetune", description="Tune every stage of an LLM's life."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=DEFAULT_ADDRESS, help="server address (host:port)")
        p.add_argument("--token", help="bearer token (default: $STAGETUNE_TOKEN)")
        p.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server: turns TLS on")
        p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS; TLS on")
        p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
        return p

    p = sub.add_parser("serve", help="run the optimisation service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--data-dir", default="stagetune-data", help="default storage/MLflow folder")
    p.add_argument("--storage", help="SQLAlchemy URL (default: SQLite in --data-dir)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in --data-dir)")
    p.add_argument("--lease-seconds", type=float, default=120.0, help="trial lease length")
    p.add_argument("--auth-file", help="token file (YAML): require tokens, roles and teams")
    p.add_argument("--tls-cert", help="server certificate chain (PEM): serve TLS only")
    p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-client-ca", help="CA (PEM): require client certificates it signed")
    p.set_defaults(fn=cmd_serve)

    p = with_server(sub.add_parser("submit", help="create a study from a YAML config"))
    p.add_argument("config", help="study config, e.g. configs/lora.yaml")
    p.add_argument("--name", help="override the study name in the config")
    p.set_defaults(fn=cmd_submit)

    p = with_server(sub.add_parser("worker", help="poll the server and run trials"))
    p.add_argument("--study", help="only run trials of this study; exit when it is finished")
    p.add_argument("--max-trials", type=int, help="exit after this many trials")
    p.add_argument("--processes", type=int, default=1, help="accelerate processes per trial")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per trial (0 = CPU)")
    p.add_argument("--threads", type=int, help="CPU threads per trial process")
    p.add_argument("--worker-id", help="stable worker identity (default: host-pid)")
    p.add_argument("--work-dir", default="stagetune-data/work", help="trial scratch folder")
    p.set_defaults(fn=cmd_worker)

    p = with_server(sub.add_parser("status", help="studies, or one study's trials"))
    p.add_argument("study", nargs="?")
    p.set_defaults(fn=cmd_status)

    p = with_server(sub.add_parser("pareto", help="print a study's Pareto front"))
    p.add_argument("study")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(fn=cmd_pareto)

    p = with_server(sub.add_parser("stop", help="stop handing out a study's trials"))
    p.add_argument("study")
    p.set_defaults(fn=cmd_stop)

    p = sub.add_parser("demo", help="run a small real study on CPU, end to end")
    p.add_argument("--dir", default="stagetune-demo", help="working folder (recreated)")
    p.add_argument("--config", default=_repo_config("lora.yaml"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, help="override the config's max_trials")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no secret reaches a log line
    try:
        return int(args.fn(args))
    except StagetuneError as e:
        print(f"stagetune {args.command}: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
