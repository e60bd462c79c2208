"""What one suggestion and one rung decision cost as a study grows: the server-side work
that decides whether the service keeps up at 10,000 trials.

For each study size n (completed trials with random 3-objective values on the lora
config's 4-parameter space, 16 more running):
  sample    one suggestion from the server's sampler (``make_sampler``: multivariate TPE
            with constant liar) on an in-memory study holding all n, as the suggestion
            pool asked it before its history was bounded;
  bounded   the same on the study the pool holds now (server/pool.py): once n passes
            HISTORY (1,000), ``bounded_history`` of the trials, measured at its largest,
            just before a rebuild (HISTORY plus half again);
  rebuild   that rebuild once: choosing the bounded history among all n and copying it
            into a fresh study (once every HISTORY / 2 finished trials);
  decide    one MO-ASHA rung decision (``rung_decision``) against n reports of 2
            objectives, as a rung report at a rung every trial reached is decided.
Medians of --repeats calls. One thread; nothing else should run.

    .venv/bin/python bench/sampler_scaling.py      # ~1 min

The pool samples on one thread: with 16 workers finishing about 21 trials a second (1-s
trials, half stopped at a mid rung), a suggestion must cost under ~48 ms to keep up.
Each size's trials are drawn once and shared by the columns.
Writes bench/results/sampler_scaling.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import random
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, create_trial
from results_file import provenance, write_results

from stagetune.contract.spec import BudgetSpec, StudySpec, load_spec_file
from stagetune.server.asha import rung_decision
from stagetune.server.attributes import distributions_of
from stagetune.server.optuna_policy import make_sampler
from stagetune.server.pool import HISTORY, bounded_history

ROOT = Path(__file__).resolve().parent.parent


def _spec(n: int) -> StudySpec:
    spec = load_spec_file(ROOT / "configs" / "lora.yaml")
    return dataclasses.replace(spec, budget=BudgetSpec(n + 1000, 0))


def _trials(n: int, rng: random.Random) -> list[FrozenTrial]:
    """Completed trials drawn at random: the sampler's cost depends on their number."""
    spec = _spec(n)
    dists = distributions_of(spec)
    draw = optuna.samplers.RandomSampler(seed=rng.randrange(2**31))
    seeder = optuna.create_study(directions=list(spec.directions), sampler=draw)
    trials = []
    for _ in range(n):
        t = seeder.ask(dists)
        values = [rng.uniform(1, 5), rng.uniform(1, 10), rng.uniform(100, 800)]
        trials.append(create_trial(params=t.params, distributions=dists, values=values))
    return trials


def _rebuild_ms(trials: list[FrozenTrial], repeats: int, rng: random.Random) -> float:
    spec = _spec(len(trials))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        kept = bounded_history(spec, trials, HISTORY, rng)
        study = optuna.create_study(directions=list(spec.directions), sampler=make_sampler(spec))
        study.add_trials(kept)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def _sample_ms(trials: list[FrozenTrial], repeats: int, rng: random.Random) -> float:
    spec = _spec(len(trials))
    dists = distributions_of(spec)
    study = optuna.create_study(directions=list(spec.directions), sampler=make_sampler(spec))
    study.add_trials(trials)
    running = [study.ask(dists) for _ in range(16)]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        t = study.ask(dists)
        times.append(time.perf_counter() - started)
        study.tell(t, [rng.uniform(1, 5), rng.uniform(1, 10), rng.uniform(100, 800)])
    for t in running:
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    return 1e3 * statistics.median(times)


def _decide_ms(n: int, repeats: int, rng: random.Random) -> float:
    others = [[rng.uniform(1, 5), rng.uniform(100, 800)] for _ in range(n)]
    times = []
    for _ in range(repeats):
        own = [rng.uniform(1, 5), rng.uniform(100, 800)]
        started = time.perf_counter()
        rung_decision(own, others, ["minimize", "minimize"], 2)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 3000, 10_000])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    rng = random.Random(0)
    record: dict[str, Any] = {
        **provenance(("optuna", "numpy", "moocore")),
        "machine": f"{platform.machine()}, {platform.processor() or 'CPU'}",
        "rows": [],
    }
    for n in args.sizes:
        trials = _trials(n, rng)
        held = bounded_history(_spec(n), trials, HISTORY * 3 // 2, rng)
        row = {
            "n": n,
            "sample_ms": _sample_ms(trials, args.repeats, rng),
            "bounded_ms": _sample_ms(held, args.repeats, rng),
            "rebuild_ms": _rebuild_ms(trials, args.repeats, rng) if n > HISTORY else None,
            "decide_ms": _decide_ms(n, args.repeats, rng),
        }
        record["rows"].append(row)
        print(row, flush=True)
    lines = [
        f"commit {record['commit']}, {record['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        f"Bounded history: at most {HISTORY} finished trials, {HISTORY * 3 // 2} just before"
        f" a rebuild (which comes every {HISTORY // 2} finished trials).",
        "",
        "| completed trials | one suggestion, whole history (ms) | one suggestion, bounded"
        " (ms) | one rebuild (ms) | one MO-ASHA decision (ms) |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {r['n']} | {r['sample_ms']:.1f} | {r['bounded_ms']:.1f} | "
            + ("–" if r["rebuild_ms"] is None else f"{r['rebuild_ms']:.0f}")
            + f" | {r['decide_ms']:.2f} |"
            for r in record["rows"]
        ),
    ]
    write_results("sampler_scaling", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
