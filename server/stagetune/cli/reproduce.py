"""``stagetune reproduce STUDY TRIAL``: re-run a trial from what the server recorded and
compare every metric with the recorded value.

What a re-run is made of, all read through the server's study RPCs (``get_study``,
``list_trials``): the study spec (stage, ``runner`` section, fidelity, hence the rung steps),
the trial's params, and its seed (the ``seed`` metric every trial reports at each rung and
at the end; the worker's rule, ``sampler.seed + trial number``, for a trial that predates
it). The trial is launched as a CPU worker launches one (``accelerate launch ... run_trial``)
with no server to report to, so the study is untouched; a trial the server stopped at a rung
is stopped at the same step (``run_trial --stop-after``), after the same learning-rate
schedule.

Which metrics must match: all but ``TIMING_METRICS`` (decode latency, time to first token,
throughput, wall and device seconds, peak memory: properties of the machine and its load,
printed but not compared). Measured on CPU, the others (losses, perplexity, exact match,
reward accuracy and margin, mean reward, parameter counts, the seed, the data split and
overlap counts) come back bit-identical, also with another thread count; the default
tolerance (``rtol`` 1e-6, ``atol`` 1e-9) only absorbs other CPU kernels on another machine.
Every difference is printed; the exit status is 1 when one is beyond the tolerance.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stagetune.contract.client import StudyClient
from stagetune.contract.errors import InvalidArgument
from stagetune.contract.names import TRIAL_STATES
from stagetune.contract.spec import spec_from_proto
from stagetune.contract.stages import STAGES
from stagetune.trainer.assignment import Assignment, TrialResult, trial_seed
from stagetune.trainer.trial_launch import launch_command, uses_deepspeed
from stagetune.v1 import types_pb2 as pb

__all__ = [
    "TIMING_METRICS",
    "Comparison",
    "compare_metrics",
    "recorded_assignment",
    "render_comparison",
    "reproduce_trial",
]

#: Metrics that measure the machine (time, memory) rather than the training: never equal
#: twice, so shown but not compared.
TIMING_METRICS = frozenset(
    {
        "decode_latency_ms",
        "ttft_ms",
        "tokens_per_second",
        "wall_seconds",
        "device_seconds",
        "peak_memory_mb",
    }
)


@dataclass(frozen=True)
class Comparison:
    """One metric at one step (``None``: the final value): recorded vs re-run."""

    metric: str
    step: int | None
    recorded: float
    rerun: float | None  # None: the re-run did not report it
    verdict: str  # "exact" | "within tolerance" | "DIFFERS" | "MISSING" | "not compared"

    @property
    def difference(self) -> float | None:
        return None if self.rerun is None else self.rerun - self.recorded

    @property
    def failed(self) -> bool:
        return self.verdict in ("DIFFERS", "MISSING")


def _seed(spec_seed: int | None, trial: pb.Trial) -> int:
    for metrics in [trial.metrics, *(r.metrics for r in trial.rungs)]:
        if "seed" in metrics:
            return int(metrics["seed"])
    return trial_seed(spec_seed, trial.number)


def recorded_assignment(
    study: pb.Study, trial: pb.Trial, folder: Path
) -> tuple[Assignment, int | None]:
    """The assignment the worker ran ``trial`` with, writing into ``folder``, and the step
    to stop at (the last recorded rung of a trial that did not complete; None otherwise)."""
    spec = spec_from_proto(study.spec)
    if spec.stage not in STAGES:
        raise InvalidArgument(
            "study", f"{spec.stage} studies run a script of their workers' own; not re-run here"
        )
    stop_after = None
    if trial.state != pb.TRIAL_STATE_COMPLETE:
        if not trial.rungs:
            state = TRIAL_STATES.from_proto.get(trial.state, "unknown")
            raise InvalidArgument(
                "trial", f"trial {trial.trial_id} is {state} and recorded no metrics to compare"
            )
        stop_after = int(trial.rungs[-1].step)
    assignment = Assignment.of_trial(
        spec,
        trial,
        spec.fidelity.rungs(),
        folder,
        seed=_seed(spec.sampler.seed, trial),
        worker_id="reproduce",
    )
    return assignment, stop_after


def _verdict(metric: str, recorded: float, rerun: float | None, rtol: float, atol: float) -> str:
    if metric in TIMING_METRICS:
        return "not compared"
    if rerun is None:
        return "MISSING"
    if rerun == recorded:
        return "exact"
    if math.isclose(rerun, recorded, rel_tol=rtol, abs_tol=atol):
        return "within tolerance"
    return "DIFFERS"


def compare_metrics(
    trial: pb.Trial, rerun: TrialResult, rtol: float = 1e-6, atol: float = 1e-9
) -> list[Comparison]:
    """Every metric the server recorded for ``trial`` (each rung's, then the final ones)
    against the re-run's; a metric only the re-run has is left out."""
    rerun_rungs: dict[int, Mapping[str, float]] = {
        int(r["step"]): r["metrics"] for r in rerun.rungs
    }
    out: list[Comparison] = []
    recorded: list[tuple[int | None, Mapping[str, float], Mapping[str, float]]] = [
        (int(r.step), r.metrics, rerun_rungs.get(int(r.step), {})) for r in trial.rungs
    ]
    if trial.state == pb.TRIAL_STATE_COMPLETE:
        recorded.append((None, trial.metrics, rerun.metrics))
    for step, theirs, ours in recorded:
        for metric in sorted(theirs):
            value = ours.get(metric)
            verdict = _verdict(metric, theirs[metric], value, rtol, atol)
            out.append(Comparison(metric, step, theirs[metric], value, verdict))
    return out


def render_comparison(rows: list[Comparison], rtol: float, atol: float) -> str:
    table = [("metric", "step", "recorded", "re-run", "difference", "")]
    for c in rows:
        diff = c.difference
        table.append(
            (
                c.metric,
                "final" if c.step is None else str(c.step),
                f"{c.recorded:.10g}",
                "-" if c.rerun is None else f"{c.rerun:.10g}",
                "-" if diff is None else ("0" if diff == 0 else f"{diff:+.3g}"),
                c.verdict,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    compared = [c for c in rows if c.verdict != "not compared"]
    counts = {
        v: sum(c.verdict == v for c in compared)
        for v in ("exact", "within tolerance", "DIFFERS", "MISSING")
    }
    lines.append(
        f"{len(compared)} compared: {counts['exact']} exact, {counts['within tolerance']} "
        f"within rtol={rtol:g} atol={atol:g}, {counts['DIFFERS']} differ, "
        f"{counts['MISSING']} missing; {len(rows) - len(compared)} timing/memory values "
        "not compared"
    )
    return "\n".join(lines)


def _environment(gpus: str, threads: int | None) -> dict[str, str]:
    """A trial's environment as a worker sets it: offline hubs, the chosen devices."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES=gpus,
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def reproduce_trial(
    client: StudyClient,
    study_name: str,
    trial_id: int,
    work_dir: Path,
    *,
    processes: int | None = None,
    gpus: str = "",
    threads: int | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    say: Callable[[str], None] = print,
) -> int:
    """Re-run one trial locally and print the comparison; 0 when every compared metric is
    within the tolerance, 1 otherwise (or when the re-run fails)."""
    study = client.get_study(study_name)
    trial = next((t for t in client.list_trials(study_name) if t.trial_id == trial_id), None)
    if trial is None:
        raise InvalidArgument("trial", f"study {study_name} has no trial {trial_id}")
    folder = (work_dir / study_name / f"trial-{trial_id}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    a, stop_after = recorded_assignment(study, trial, folder)
    for stale in (Path(a.result_path), folder / "assignment.json"):
        stale.unlink(missing_ok=True)
    a.write(folder / "assignment.json")
    state = TRIAL_STATES.from_proto.get(trial.state, "unknown")
    params = ", ".join(f"{k}={v}" for k, v in sorted(a.params.items()))
    say(
        f"{study_name} trial {trial_id} (#{trial.number}, {state}): seed {a.seed}, "
        f"rungs {a.rung_steps}" + (f", stopped at {stop_after}" if stop_after else "")
    )
    say(f"  params: {params or '(none)'}")
    n = processes or int(a.runner.get("processes", 1))
    cmd = launch_command(folder / "assignment.json", n, cpu=not gpus, deepspeed=uses_deepspeed(a))
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    log_path = folder / "trial.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        code = subprocess.call(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=_environment(gpus, threads)
        )
    seconds = time.monotonic() - started
    result = TrialResult.read(Path(a.result_path)) if Path(a.result_path).exists() else None
    if result is None or result.status not in ("complete", "stopped"):
        reason = result.reason.splitlines()[0] if result is not None and result.reason else ""
        say(f"  re-run failed (exit {code}) after {seconds:.1f} s: {reason} (log: {log_path})")
        return 1
    say(f"  re-run {result.status} in {seconds:.1f} s (log and outputs: {folder})")
    rows = compare_metrics(trial, result, rtol, atol)
    say(render_comparison(rows, rtol, atol))
    return 1 if any(c.failed for c in rows) else 0
