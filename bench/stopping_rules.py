"""Which rung rule lets the server end at MO-TPE's front: candidates raced side by side.

MO-ASHA with MO-TPE reaches a good front fastest, but ended below MO-TPE run at full
budget on the same compute (``bench/search_efficiency.py``). Each candidate is a setting
of the server's rung decision (``rung_decision`` in server/asha.py, as the policy calls
it); everything else is the search-efficiency race's stagetune arm: the server's
services, its pool and MO-TPE, 4 asynchronous workers in simulated time, the same recorded
tables, budget and seeds. MO-TPE and NSGA-II at full budget run beside them.

  paper          MO-ASHA as published: the top ceil(n / eta) of the n trials at the rung
                 continue (front, then crowding distance); all continue while n < eta
  front          the server's rule: the same, but a trial no other trial at the rung
                 dominates always continues (``keep_front``)
  paper+wait     the paper's rule with ``fidelity.min_reports`` = 4 * eta: nothing stops
                 until that many trials reported at the rung
  front+wait     the server's rule with min_reports = 4 * eta (what the packaged sft,
                 pretrain_proxy, dpo and grpo configs set)
  front+wait+grace
                 front+wait with a grace period: min_steps times eta, so the config's
                 first rung stops nothing (the recorded run had dpo's first rung at 8;
                 configs/dpo.yaml has it at 16 since, where this leaves no rung to stop at)
  front+wait+brackets
                 front+wait with fidelity.brackets = 3, asynchronous Hyperband's hedge over
                 shared rungs: trial n is in bracket n % 3; bracket b is not stopped at its
                 first b rungs (with the tables' two decision rungs, bracket 2 always runs
                 in full)

The study configs are ``configs/<stage>.yaml`` with ``min_reports`` set by the candidate.
Reported per stage and candidate: median final hypervolume (normalised by the table's
front) with IQR, the same for the expected final hypervolume (each configuration completed
scored on its mean over the table's training seeds: ``bench/search_efficiency.py``), and
the compute after which the median run first reaches 95% of NSGA-II's final hypervolume
(device-s and steps; target <= 30%). Bold marks a candidate at or above MO-TPE's median
in that column. The candidates were chosen on these same tables: there
is no held-out race.

    make bench-deps && OMP_NUM_THREADS=1 .venv/bin/python bench/stopping_rules.py --seeds 10

Writes bench/results/stopping_rules.{md,json}, tagged with the commit and versions (~11 min
on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
from record_curves import DEFAULT_OUT, load_table
from results_file import provenance, write_results
from search_efficiency import (
    REPO,
    TARGET_SHARE,
    UNITS,
    Table,
    _iqr,
    _pct,
    curve,
    first_reach,
    load_stage,
    replay,
)

import stagetune.server.optuna_policy as optuna_policy
from stagetune.server.asha import rung_decision


@dataclass(frozen=True)
class Candidate:
    keep_front: bool
    wait: bool  # min_reports = 4 * reduction_factor (else 0: the factor itself)
    grace: bool = False  # min_steps times the reduction factor: the first rung stops nothing
    brackets: int = 1  # fidelity.brackets: bracket b (trial number % brackets) skips b rungs


CANDIDATES = {
    "paper": Candidate(keep_front=False, wait=False),
    "front": Candidate(keep_front=True, wait=False),
    "paper+wait": Candidate(keep_front=False, wait=True),
    "front+wait": Candidate(keep_front=True, wait=True),
    "front+wait+grace": Candidate(keep_front=True, wait=True, grace=True),
    "front+wait+brackets": Candidate(keep_front=True, wait=True, brackets=3),
}


def _with(table: Table, c: Candidate) -> Table:
    fidelity = table.spec.fidelity
    wait = math.ceil(4 * fidelity.reduction_factor) if c.wait else 0
    start = fidelity.min_steps
    if c.grace:
        start = int(round(start * fidelity.reduction_factor))
    fidelity = replace(fidelity, min_reports=wait, min_steps=start)
    # At most one bracket a rung (what validation allows): dpo's config has two rungs.
    fidelity = replace(fidelity, brackets=min(c.brackets, len(fidelity.rungs())))
    return replace(table, spec=replace(table.spec, fidelity=fidelity))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=60, help="budget: this many full runs")
    parser.add_argument("--stages", nargs="+", default=["sft", "pretrain_proxy", "dpo"])
    parser.add_argument(
        "--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES)
    )
    args = parser.parse_args()
    started = time.perf_counter()
    rows = load_table(DEFAULT_OUT)
    record: dict[str, Any] = {
        **provenance(("optuna", "numpy", "moocore")),
        "seeds": args.seeds,
        "trials": args.trials,
        "stages": {},
    }
    lines = [
        "# Rung rules raced: the server's arm per candidate, MO-TPE and NSGA-II at full budget",
        "",
        f"commit {record['commit']}, "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + f"; {args.seeds} seeds, budget {args.trials} full runs, 4 asynchronous workers, "
        "simulated time; the table `bench/data/curves.jsonl.gz`.",
        "",
    ]
    for stage in args.stages:
        table = load_stage(stage, rows, args.trials, REPO / "configs")
        curves: dict[tuple[str, str], np.ndarray] = {}
        expected: dict[str, list[float]] = {}
        for arm in ["nsga2", "motpe", *args.candidates]:
            if arm in ("nsga2", "motpe"):
                traces = [replay(table, arm, seed, args.trials) for seed in range(args.seeds)]
            else:
                c = CANDIDATES[arm]
                rule = partial(rung_decision, keep_front=c.keep_front)
                optuna_policy.__dict__["rung_decision"] = rule  # what decide() calls
                raced = _with(table, c)
                try:
                    traces = [
                        replay(raced, "stagetune", seed, args.trials) for seed in range(args.seeds)
                    ]
                finally:
                    optuna_policy.__dict__["rung_decision"] = rung_decision
            for u in UNITS:
                curves[arm, u] = np.array([curve(t, u, table.budget[u]) for t in traces])
            expected[arm] = [t.expected_hv for t in traces]
            print(f"{stage} {arm}: {time.perf_counter() - started:.0f} s", flush=True)
        target = {u: TARGET_SHARE * float(np.median(curves["nsga2", u][:, -1])) for u in UNITS}
        motpe = float(np.median(curves["motpe", "device-s"][:, -1]))
        motpe_expected = float(np.median(expected["motpe"]))
        out: dict[str, Any] = {}
        lines += [
            f"## {stage}",
            "",
            "| arm | final HV median [IQR] | expected final HV | to 95% NSGA-II, device-s "
            "| steps |",
            "|---|---|---|---|---|",
        ]
        for arm in ["motpe", *args.candidates]:
            final = curves[arm, "device-s"][:, -1]
            q1, q2, q3 = (float(x) for x in np.percentile(final, [25, 50, 75]))
            reach = {
                u: float(np.median([first_reach(c, target[u]) for c in curves[arm, u]]))
                for u in UNITS
            }
            e1, e2, e3 = (float(x) for x in np.percentile(expected[arm], [25, 50, 75]))
            out[arm] = {"final_hv": [q1, q2, q3], "expected_hv": [e1, e2, e3], "reach": reach}
            hv, ev = _iqr(final), _iqr(expected[arm])
            if arm != "motpe" and q2 >= motpe:
                hv = f"**{hv}**"
            if arm != "motpe" and e2 >= motpe_expected:
                ev = f"**{ev}**"
            lines.append(
                f"| {arm} | {hv} | {ev} | {_pct(reach['device-s'])} | {_pct(reach['steps'])} |"
            )
        lines.append("")
        record["stages"][stage] = out
    lines.append(f"({time.perf_counter() - started:.0f} s; `{' '.join(sys.argv)}`)")
    print("\n".join(lines))
    write_results("stopping_rules", record, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
