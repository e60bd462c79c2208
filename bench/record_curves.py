"""Record the learning-curve table that ``bench/search_efficiency.py`` replays.

For each stage (default ``sft``, ``pretrain_proxy`` and ``dpo``) the search space of
``configs/<stage>.yaml`` (or of ``--specs DIR/<stage>.yaml``) is discretised into a finite
grid: a log-scaled float gets ``--log-levels`` geometric values, a linear float
``--lin-levels`` evenly spaced values, an int every value (at most 8), a categorical its
choices. Up to ``--configs`` grid points per stage (the whole grid when it is smaller, else
a seeded random sample) are trained for real,
with the stage's own runner and the config's ``runner`` section (the tiny model, synthetic
arithmetic data), one after the other, with a rung report at every step of ``--rungs``,
once per training seed of ``--trial-seeds`` (the replay draws one of them per trial, so
that re-running a configuration tells a method something new).

What a row holds, per configuration and training seed:
  rungs  what the runner reports at each rung step, exactly as a worker would send it to the
         server: the quality metric (eval_loss), peak_memory_mb (the trial's peak RSS so
         far) and device_seconds (the trial's clock so far, model loading included);
  final  the trial's final metrics (TrialResult.metrics): the quality metric at the last
         rung plus decode_latency_ms, ttft_ms, tokens_per_second, the final peak memory and
         device_seconds, measured once at the end as a real trial does.
Decode latency is not available at intermediate rungs (the runner measures it only at the
end), so the replay, like the server, decides at a rung on the objectives the rung carries.

Every trial runs in a child process forked from this one after the heavy imports, so each
trial has its own peak RSS (the child resets its high-water mark through
``/proc/self/clear_refs`` first) while import costs are paid once. ``device_seconds`` starts
at the runner's entry: process start-up is not counted, for any method alike.

Rows are appended to a gzip'd JSON-lines file, one per configuration and seed, each tagged
with the commit and the versions of torch, transformers, trl, peft and accelerate, so an
interrupted run resumes where it stopped (runs already recorded are skipped)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/record_curves.py   # 3 training seeds

The committed table has three training seeds a configuration: the whole sft grid (48),
200 of the 576 pretrain_proxy grid points and 100 of the 4,608 dpo grid points (dpo's
space moves memory and cost: batch size, LoRA rank or none, gradient checkpointing). It
was recorded as two processes side by side on 2 CPU cores, ``--stages sft pretrain_proxy``
and ``--stages dpo --configs 100``, each into its own file, then concatenated (gzip
members concatenate): about 70 minutes.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto")]

from results_file import provenance  # noqa: E402

from stagetune.contract.spec import (  # noqa: E402
    CategoricalParam,
    FloatParam,
    IntParam,
    ParamSpec,
    ParamValue,
    StudySpec,
    load_spec_file,
)

DEFAULT_OUT = REPO / "bench" / "data" / "curves.jsonl.gz"

__all__ = ["config_key", "grid_values", "load_table", "main"]


def grid_values(p: ParamSpec, log_levels: int, lin_levels: int) -> list[ParamValue]:
    """The discrete values one search-space parameter takes in the table."""
    if isinstance(p, CategoricalParam):
        return list(p.choices)
    if isinstance(p, IntParam):
        count = (p.high - p.low) // p.step + 1
        if count <= 8:
            return list(range(p.low, p.high + 1, p.step))
        return sorted({int(round(p.low + i * (p.high - p.low) / 7)) for i in range(8)})
    assert isinstance(p, FloatParam)
    if p.log:
        ratio = math.log(p.high / p.low)
        return [
            float(f"{p.low * math.exp(ratio * i / (log_levels - 1)):.3g}")
            for i in range(log_levels)
        ]
    return [
        float(f"{p.low + (p.high - p.low) * i / (lin_levels - 1):.3g}") for i in range(lin_levels)
    ]


def config_key(params: dict[str, ParamValue]) -> str:
    """A configuration's identity in the table."""
    return json.dumps(params, sort_keys=True)


def load_table(path: Path) -> list[dict[str, Any]]:
    """Every row of a recorded table (gzip'd JSON lines; appended members read as one)."""
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def configurations(
    spec: StudySpec, limit: int, log_levels: int, lin_levels: int, seed: int
) -> tuple[dict[str, list[ParamValue]], list[dict[str, ParamValue]]]:
    """(the grid, the configurations to record in order): the whole grid when it has at most
    ``limit`` points, else a seeded sample; shuffled either way, so a partial recording is a
    random subset."""
    grid = {p.name: grid_values(p, log_levels, lin_levels) for p in spec.search_space}
    names = list(grid)
    points = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]
    rng = random.Random(seed)
    rng.shuffle(points)
    return grid, points[:limit]


def _child(stage: str, assignment: Any, out: str) -> None:
    """Run one trial in a forked child and write its outcome as JSON to ``out``."""
    from stagetune.trainer.run_trial import _runner
    from stagetune.trainer.rungs import NullReporter

    quiet = os.open(os.devnull, os.O_WRONLY)  # the Trainer's own logging: keep progress clear
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    try:  # a fresh peak RSS for this trial (Linux >= 4.0); else the parent's peak leaks in
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    runner = _runner(stage)
    assert runner is not None, stage
    reporter = NullReporter()
    try:
        result = runner(assignment, reporter)
        row = {
            "status": result.status,
            "final": result.metrics,
            "rungs": result.rungs,
            "reason": result.reason,
        }
    except Exception as e:  # recorded, not fatal: the replay treats it as a failed trial
        row = {"status": "error", "final": {}, "rungs": [], "reason": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(row))


#: What trained the rows: recorded in every row, with the commit.
RECORDED_WITH = ("torch", "transformers", "trl", "peft", "accelerate")


def record_one(
    spec: StudySpec,
    params: dict[str, ParamValue],
    rungs: list[int],
    work: Path,
    seed: int,
    tag: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one configuration in a forked child; its table row."""
    from stagetune.trainer.assignment import Assignment

    work.mkdir(parents=True, exist_ok=True)
    a = Assignment(
        trial_id=0,
        study_name=f"bench-{spec.stage}",
        number=0,
        attempt=1,
        stage=spec.stage,
        params=dict(params),
        runner=dict(spec.runner),
        rung_steps=list(rungs),
        objectives=spec.metric_names,
        output_dir=str(work / "out"),
        result_path=str(work / "result.json"),
        seed=seed,
    )
    out = work / "row.json"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = mp.get_context("fork").Process(target=_child, args=(spec.stage, a, str(out)))
    proc.start()
    proc.join(timeout=600)
    if proc.is_alive():
        proc.kill()
        proc.join()
    wall = time.perf_counter() - started
    if out.exists():
        row: dict[str, Any] = json.loads(out.read_text())
    else:
        row = {"status": "error", "final": {}, "rungs": [], "reason": f"exit {proc.exitcode}"}
    return {
        "stage": spec.stage,
        "key": config_key(params),
        "params": params,
        "seed": seed,
        "rung_steps": rungs,
        "wall_seconds": wall,
        **row,
        **(tag or {}),  # commit and versions
    }


def _describe(row: dict[str, Any], spec: StudySpec) -> str:
    if row["status"] != "complete":
        return f"{row['status']}: {row['reason'][:120]}"
    final = row["final"]
    names = dict.fromkeys([*spec.metric_names, "device_seconds"])
    return "  ".join(f"{n}={final[n]:.4g}" for n in names if n in final)


def record_stage(
    spec: StudySpec,
    args: argparse.Namespace,
    done: set[tuple[str, str, int]],
    work: Path,
    tag: dict[str, Any],
) -> None:
    grid, todo = configurations(spec, args.configs, args.log_levels, args.lin_levels, args.seed)
    size = math.prod(len(v) for v in grid.values())
    seeds = args.trial_seeds
    print(
        f"== {spec.stage}: grid {size} points; recording {len(todo)} with training seeds "
        f"{seeds}; rungs {args.rungs}"
    )
    for name, values in grid.items():
        print(f"   {name}: {values}")
    started = time.perf_counter()
    fresh = 0
    runs = [(params, seed) for params in todo for seed in seeds]
    for i, (params, seed) in enumerate(runs, 1):
        if (spec.stage, config_key(params), seed) in done:
            continue
        row = record_one(spec, params, args.rungs, work / spec.stage / str(i), seed, tag)
        with gzip.open(args.out, "at") as f:  # one gzip member per row: safe to interrupt
            f.write(json.dumps(row, sort_keys=True) + "\n")
        fresh += 1
        elapsed = time.perf_counter() - started
        left = sum((spec.stage, config_key(p), s) not in done for p, s in runs[i:])
        eta = elapsed / fresh * left
        print(
            f"[{spec.stage} {i}/{len(runs)}] {config_key(params)} seed {seed}\n"
            f"    {_describe(row, spec)}  ({row['wall_seconds']:.1f} s; "
            f"elapsed {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left)",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=["sft", "pretrain_proxy", "dpo"])
    parser.add_argument("--configs", type=int, default=200, help="most configurations per stage")
    parser.add_argument("--rungs", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--log-levels", type=int, default=8, help="values of a log float")
    parser.add_argument("--lin-levels", type=int, default=2, help="values of a linear float")
    parser.add_argument("--seed", type=int, default=0, help="seed of the configuration sample")
    parser.add_argument(
        "--trial-seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds: a run each"
    )
    parser.add_argument(
        "--specs", type=Path, default=REPO / "configs", help="folder of <stage>.yaml study configs"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["stage"], r["key"], int(r.get("seed", 0))) for r in load_table(args.out)}
    print(f"{args.out}: {len(done)} rows already recorded", flush=True)

    from stagetune.trainer.run_trial import _runner

    tag = provenance(RECORDED_WITH)
    print(f"recording at commit {tag['commit']}: {tag['versions']}", flush=True)

    for stage in args.stages:  # the heavy imports, once, before the first fork
        _runner(stage)
    with tempfile.TemporaryDirectory(prefix="stagetune-record-") as tmp:
        for stage in args.stages:
            spec = load_spec_file(args.specs / f"{stage}.yaml")
            record_stage(spec, args, done, Path(tmp), tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
