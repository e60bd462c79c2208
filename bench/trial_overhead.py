"""A trial's fixed cost, warm host against cold start, per stage, side by side in one run.

Fixed cost = from the assignment's arrival at the worker to the trial's first training
step (start), plus from the end of training to the result reported to the server
(finish). Both come from the worker (``TrialOutcome.start_seconds``/``finish_seconds``):
the trial records when its first step began and when training ended. What lies between
(training steps and rung evaluations) is the trial's work; the finish includes measuring
decode latency and memory, which every trial reports.

Settings, the same for both arms: one `stagetune serve` (SQLite, MLflow on), one worker
per arm (the same threads), the packaged config of each stage with a tiny random-init
Llama (hidden 32, 1 layer) on synthetic arithmetic data, rungs at 2 and 4 steps, no early
stopping, --trials trials a stage and arm, arms alternating stage by stage. The warm
worker's host starts once (its start is reported apart). Then a long trial (the lora
stage, --long-steps steps, about a minute here) for the share of fixed cost in a
60-second trial. Peak memory (on CPU the trial process's peak RSS) is shown for both arms:
a forked trial's count includes the host's resident pages it shares.

    .venv/bin/python bench/trial_overhead.py            # ~10 min on a 2-core CPU

Writes bench/results/trial_overhead.{md,json}, tagged with the commit and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_file import provenance, write_results

from stagetune.trainer.assignment import free_port

STAGES = ["pretrain_proxy", "sft", "lora", "dpo", "grpo"]
TARGET_SECONDS = 1.0
TARGET_SHARE = 0.03


def _spec(stage: str, name: str, trials: int, steps: tuple[int, int], cache: Path) -> Any:
    from stagetune.contract.packaged import packaged_path
    from stagetune.contract.spec import BudgetSpec, FidelitySpec, SamplerConfig, load_spec_file

    spec = load_spec_file(packaged_path(f"{stage}.yaml"))
    return dataclasses.replace(
        spec,
        name=name,
        budget=BudgetSpec(trials, 0),
        fidelity=FidelitySpec(steps[0], steps[1], 2),
        early_stopping="none",
        sampler=SamplerConfig(kind="random", seed=1),
        runner={
            "model": {
                "tiny": {
                    "hidden_size": 32,
                    "num_layers": 1,
                    "num_heads": 2,
                    "intermediate_size": 64,
                }
            },
            "data": {"synthetic": "arithmetic", "train_size": 32, "eval_size": 8},
            "training": {"per_device_train_batch_size": 4, "max_length": 32},
            "cache_dir": str(cache),
        },
    )


def _run(address: str, spec: Any, arm: str, settings: dict[str, Any], host: Any) -> list[Any]:
    """One study of ``spec`` run to its end by a new worker of arm ``arm`` (the warm arm's
    workers share one host, as one long-lived worker would)."""
    from stagetune.contract.client import StudyClient
    from stagetune.trainer.worker import Worker, WorkerSettings

    with StudyClient(address, timeout=30) as client:
        client.create_study(spec)
    worker = Worker(WorkerSettings(study_name=spec.name, cold=arm == "cold", **settings), host=host)
    outcomes = worker.run()
    bad = [o for o in outcomes if o.outcome != "complete"]
    if bad:
        raise SystemExit(f"{spec.name}: {bad[0].outcome}: {bad[0].detail}")
    with StudyClient(address, timeout=30) as client:
        memory = {t.trial_id: t.metrics["peak_memory_mb"] for t in client.list_trials(spec.name)}
    return [dataclasses.replace(o, detail=str(memory[o.trial_id])) for o in outcomes]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _row(outcomes: list[Any]) -> dict[str, float]:
    start = [o.start_seconds for o in outcomes]
    finish = [o.finish_seconds for o in outcomes]
    wall = [o.seconds for o in outcomes]
    return {
        "start": _median(start),
        "finish": _median(finish),
        "fixed": _median([s + f for s, f in zip(start, finish, strict=True)]),
        "wall": _median(wall),
        "peak_memory_mb": _median([float(o.detail) for o in outcomes]),
        "n": len(outcomes),
    }


def _bold_lower(a: float, b: float) -> tuple[str, str]:
    """Both values, the lower one (the row's winner) in bold."""
    fa, fb = f"{a:.2f}", f"{b:.2f}"
    return (f"**{fa}**", fb) if a < b else (fa, f"**{fb}**")


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"commit {r['commit']}, {r['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"warm host start (imports, once per worker): {r['host_start_seconds']:.1f} s",
        "",
        "| stage | cold start | cold finish | cold fixed | warm start | warm finish "
        "| warm fixed | trial wall cold / warm | peak MiB cold / warm | warm fixed ≤ 1 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in r["stages"]:
        c, w = r["stages"][stage]["cold"], r["stages"][stage]["warm"]
        met = "met" if w["fixed"] <= TARGET_SECONDS else "not met"
        cf, wf = _bold_lower(c["fixed"], w["fixed"])
        lines.append(
            f"| {stage} | {c['start']:.2f} | {c['finish']:.2f} | {cf} "
            f"| {w['start']:.2f} | {w['finish']:.2f} | {wf} "
            f"| {c['wall']:.1f} / {w['wall']:.1f} "
            f"| {c['peak_memory_mb']:.0f} / {w['peak_memory_mb']:.0f} | {met} |"
        )
    if r.get("long"):
        c, w = r["long"]["cold"], r["long"]["warm"]
        share = {k: v["fixed"] / v["wall"] for k, v in r["long"].items() if k in ("cold", "warm")}
        met = "met" if share["warm"] <= TARGET_SHARE else "not met"
        lines += [
            "",
            f"long trial (lora, {r['long']['steps']} steps): fixed cost / trial wall time",
            "",
            "| arm | fixed s | trial wall s | share | target ≤ 3% |",
            "|---|---|---|---|---|",
            f"| cold | {c['fixed']:.2f} | {c['wall']:.1f} | {share['cold']:.1%} | |",
            f"| warm | {w['fixed']:.2f} | {w['wall']:.1f} | {share['warm']:.1%} | {met} |",
        ]
    lines.append("\n(medians over each arm's trials; seconds)")
    return "\n".join(lines) + "\n"


def main() -> None:
    from stagetune.trainer.worker import Worker, WorkerSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per stage and arm")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--long-steps", type=int, default=5000, help="0: no long trial")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stagetune-overhead-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "stagetune"), "serve", "--port", str(port)]
        + ["--data-dir", str(tmp / "server")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = {
        "server": address,
        "threads_per_trial": args.threads,
        "poll_interval": 0.2,
    }
    time.sleep(5)  # the server's start
    started = time.monotonic()
    host = Worker(WorkerSettings(**settings, work_dir=tmp / "warm")).warm_host()
    host.ready()
    host_start = time.monotonic() - started
    record: dict[str, Any] = {
        **provenance(("torch", "transformers", "trl", "peft", "accelerate")),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, "
        f"{args.threads} threads per trial",
        "host_start_seconds": host_start,
        "stages": {},
    }
    try:
        for stage in args.stages:
            record["stages"][stage] = {}
            for arm in ("cold", "warm"):
                spec = _spec(stage, f"{stage}-{arm}", args.trials, (2, 4), tmp / "cache")
                outcomes = _run(address, spec, arm, {**settings, "work_dir": tmp / arm}, host)
                record["stages"][stage][arm] = _row(outcomes)
                print(stage, arm, record["stages"][stage][arm], flush=True)
        if args.long_steps:
            steps = (args.long_steps // 2, args.long_steps)
            record["long"] = {"steps": args.long_steps}
            for arm in ("cold", "warm"):
                spec = _spec("lora", f"long-{arm}", 1, steps, tmp / "cache")
                outcomes = _run(address, spec, arm, {**settings, "work_dir": tmp / arm}, host)
                record["long"][arm] = _row(outcomes)
                print("long", arm, record["long"][arm], flush=True)
    finally:
        server.terminate()
        server.wait(30)
    write_results("trial_overhead", record, _markdown(record))


if __name__ == "__main__":
    main()
