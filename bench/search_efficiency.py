"""Search efficiency: hypervolume against cumulative compute, replayed from recorded curves.

Replays the table of real tiny-run learning curves that ``bench/record_curves.py`` wrote
(``bench/data/curves.jsonl.gz``) in simulated time: no training, a "trial" reads its rung and
final metrics from the table and costs what the recorded run cost up to where it stopped.
Per stage (the study settings of ``configs/<stage>.yaml``, or ``--specs DIR``: objectives,
search space, fidelity rungs and reduction factor), six methods, each over ``--seeds``
seeds:

  stagetune      the server itself, minus gRPC: its StudyService and TrialService over a
                 SQLite store, with the Optuna policy (the suggestion pool sampling the
                 study's MO-TPE ahead on its own thread, MO-ASHA at every rung below the
                 last, on the objectives the rung report carries), called as a worker calls
                 it (acquire, report_progress at each rung, complete or fail);
  syne_moasha    Syne Tune's ``MOASHA`` (``make bench-deps``): random configurations, its
                 own multi-objective asynchronous successive halving on the same rungs and
                 reduction factor, on the objectives a rung carries;
  motpe          the server's TPE sampler (``make_sampler``), every trial at full budget;
  nsga2          the server's NSGA-II sampler, full budget;
  random         random search, full budget;
  asha_weighted  TPE (constant liar) on the mean of the objectives min-max normalised over
                 the table, with Optuna's SuccessiveHalvingPruner (same first rung and
                 reduction factor), reported at the same rungs (on the objectives a rung
                 carries).

Simulated time, asynchronous: every method has ``--workers`` workers (4, as a deployed
study has several); a trial's clock is its recorded device-seconds, so a rung report
arrives when the recorded run reached that rung, and a worker asks for its next trial as
soon as its last one ends or is stopped. The Optuna methods ask and tell in that order;
running trials are pending (TPE's constant liar counts them). The server's pool samples
ahead on its own thread, as deployed, so its replays are not bit-for-bit repeatable.

Sampled configurations are mapped to the nearest recorded one (L1 over parameters scaled to
[0, 1], log scale where the spec is log; a categorical mismatch counts 1); the sft and dpo
tables hold their whole grid, so there it is only rounding to the grid. Where the table
holds several training seeds of a configuration, each trial draws one of them.

Compute is counted in two units: ``device-s``, the recorded device-seconds of the run up to
its last rung (stopped) or to its end (completed, final measurements included), which holds
each trial's fixed costs (model loading, data preparation, final latency measurement: on
these tiny models most of a trial); and ``steps``, training steps run, the cost model of real
runs where training dominates. Every method gets the same budget in both units: what
``--trials`` full-budget trials cost (``--trials`` times the table's mean full-run
device-seconds; ``--trials`` times the last rung's steps); trials are handed out until both
are spent, and the ones running then finish and count (for every method alike).

Hypervolume: ``objectives.pareto.hypervolume`` over the final objective vectors of completed
trials, with one reference per stage (the table's nadir plus 10% of its ideal-nadir range),
divided by the hypervolume of the table's own Pareto front (1.0 = the best any method can do).
The *expected* final HV scores the configurations a method completed on their mean final
vector over the table's training seeds instead of the run drawn, normalised by the HV of
every configuration's mean: where an objective is mostly run-to-run noise (decode latency
on sft), the drawn HV rewards completing many runs (more draws), the expected one what
was found.
Reported per stage and method (medians over seeds): final normalised HV and the fraction of
the budget after which HV first reaches 95% of full-budget NSGA-II's final HV (median over
seeds); the target is stagetune reaching it within 30% of NSGA-II's compute.

    OMP_NUM_THREADS=1 .venv/bin/python bench/search_efficiency.py --seeds 10

writes bench/results/search_efficiency.md and bench/results/search_efficiency.png.
"""

from __future__ import annotations

import argparse
import heapq
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "proto"), str(REPO / "bench")]

import optuna  # noqa: E402
from optuna.distributions import BaseDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from record_curves import DEFAULT_OUT, config_key, load_table  # noqa: E402
from results_file import provenance  # noqa: E402

from stagetune.contract.spec import (  # noqa: E402
    BudgetSpec,
    CategoricalParam,
    FloatParam,
    ParamValue,
    SamplerConfig,
    StudySpec,
    load_spec_file,
)
from stagetune.objectives.catalog import Direction  # noqa: E402
from stagetune.objectives.pareto import hypervolume  # noqa: E402
from stagetune.server.attributes import distributions_of  # noqa: E402
from stagetune.server.optuna_policy import make_sampler  # noqa: E402

METHODS = ("stagetune", "syne_moasha", "motpe", "nsga2", "random", "asha_weighted")
UNITS = ("device-s", "steps")
TARGET_SHARE = 0.95  # of NSGA-II's final hypervolume
TARGET_COMPUTE = 0.30  # of NSGA-II's compute (the whole budget)
GRID = np.linspace(0.0, 1.0, 201)  # budget fractions at which curves are compared

optuna.logging.set_verbosity(optuna.logging.ERROR)


# ---------------------------------------------------------------- the recorded table


@dataclass(frozen=True)
class Row:
    """One recorded configuration: rung metrics, final objective vector (None: failed)."""

    params: dict[str, ParamValue]
    rungs: dict[int, dict[str, float]]
    final: tuple[float, ...] | None
    cost: float  # device-seconds of the whole run (or of the failed run, as far as it got)
    # The configuration's final vector averaged over its training seeds' completed runs
    # (None: none completed): what the configuration is worth, this run's draw aside.
    expected: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Table:
    spec: StudySpec
    rows: list[Row]
    points: np.ndarray  # configurations' parameters scaled to [0, 1] (categoricals: index)
    reference: list[float]
    front_hv: float
    budget: dict[str, float]  # per unit
    configs: list[list[Row]]  # by configuration (the order of ``points``): a row per seed
    expected_hv: float = 1.0  # the HV of every configuration's expected vector

    @property
    def directions(self) -> list[Direction]:
        return self.spec.directions

    def scaled(self, params: dict[str, Any]) -> np.ndarray:
        out = []
        for p in self.spec.search_space:
            v = params[p.name]
            if isinstance(p, CategoricalParam):
                out.append(float(p.choices.index(v)))
            elif p.log:
                out.append(math.log(v / p.low) / math.log(p.high / p.low))
            else:
                out.append((v - p.low) / (p.high - p.low))
        return np.array(out)

    def nearest(self, params: dict[str, Any]) -> list[Row]:
        """The runs (one per training seed) of the recorded configuration closest to
        ``params`` (itself when recorded)."""
        want = self.scaled(params)
        categorical = np.array([isinstance(p, CategoricalParam) for p in self.spec.search_space])
        gap = np.abs(self.points - want)
        gap[:, categorical] = gap[:, categorical] > 0
        return self.configs[int(np.argmin(gap.sum(axis=1)))]


def _finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def load_stage(stage: str, rows: list[dict[str, Any]], trials: int, specs: Path) -> Table:
    spec = load_spec_file(specs / f"{stage}.yaml")
    names = spec.metric_names
    space = {p.name for p in spec.search_space}
    table: list[Row] = []
    for r in rows:
        if r["stage"] != stage or set(r["params"]) != space:  # another space's recording
            continue
        final = r["final"]
        vector = tuple(float(final[n]) for n in names) if set(names) <= set(final) else None
        ok = r["status"] == "complete" and vector is not None and _finite(vector)
        rungs = {int(x["step"]): x["metrics"] for x in r["rungs"]}
        cost = float(final["device_seconds"]) if ok else float(r["wall_seconds"])
        table.append(Row(r["params"], rungs, vector if ok else None, cost))
    if not table:
        raise SystemExit(f"no recorded rows for stage {stage}: run bench/record_curves.py")
    complete = np.array([r.final for r in table if r.final is not None])
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in spec.directions])
    as_min = complete * signs
    ideal, nadir = as_min.min(axis=0), as_min.max(axis=0)
    reference = [float(v) for v in (nadir + 0.1 * (nadir - ideal)) * signs]
    probe = Table(spec, table, np.zeros(0), reference, 1.0, {}, [])
    groups: dict[str, list[Row]] = {}
    for run in table:  # a configuration's runs, one per training seed
        groups.setdefault(config_key(run.params), []).append(run)
    configs = []
    for runs in groups.values():
        finals = [r.final for r in runs if r.final is not None]
        mean = tuple(float(v) for v in np.mean(finals, axis=0)) if finals else None
        configs.append([replace(r, expected=mean) for r in runs])
    table = [r for runs in configs for r in runs]
    expected = [runs[0].expected for runs in configs if runs[0].expected is not None]
    points = np.array([probe.scaled(g[0].params) for g in configs])
    front_hv = hypervolume(complete.tolist(), reference, spec.directions)
    full_cost = statistics.mean(r.cost for r in table if r.final is not None)
    budget = {"device-s": trials * full_cost, "steps": float(trials * spec.fidelity.max_steps)}
    expected_hv = hypervolume(expected, reference, spec.directions)
    return Table(spec, table, points, reference, front_hv, budget, configs, expected_hv)


# ---------------------------------------------------------------- one replayed study


@dataclass
class Trace:
    """A method's run: after each trial, the compute spent so far and the normalised HV."""

    spent: dict[str, list[float]]
    hv: list[float]
    trials: int = 0
    stopped: int = 0
    # At the end: the HV of the expected vectors of the configurations completed (each
    # scored on its mean over training seeds, not the one run drawn), normalised by the
    # table's expected front. Noise in a run's objectives (decode latency is mostly noise
    # on sft) raises the drawn HV of a method that completes more runs, whatever it
    # learned; this one scores what was found.
    expected_hv: float = 0.0


def _weighted(table: Table, metrics: dict[str, float], lo: np.ndarray, hi: np.ndarray) -> float:
    """Mean of the objectives ``metrics`` carries, each min-max normalised (0 = best)."""
    parts = []
    for i, o in enumerate(table.spec.objectives):
        if o.metric in metrics:
            x = (metrics[o.metric] - lo[i]) / (hi[i] - lo[i] or 1.0)
            parts.append(x if o.direction == "minimize" else 1.0 - x)
    return float(np.mean(parts))


def _study(table: Table, method: str, seed: int, trials: int) -> optuna.Study:
    spec = replace(table.spec, budget=BudgetSpec(max_trials=trials))
    if method == "asha_weighted":
        first, *_ = spec.fidelity.rungs()
        return optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
            pruner=optuna.pruners.SuccessiveHalvingPruner(
                min_resource=first, reduction_factor=int(spec.fidelity.reduction_factor)
            ),
        )
    kind = {"random": "random", "nsga2": "nsga2"}.get(method, "tpe")
    sampler = make_sampler(replace(spec, sampler=SamplerConfig(kind=kind, seed=seed)))  # type: ignore[arg-type]
    return optuna.create_study(sampler=sampler, directions=list(spec.directions))


class _Optuna:
    """An Optuna method in the replay: ask, report at rungs (weighted-sum ASHA only), tell."""

    def __init__(self, table: Table, method: str, seed: int, trials: int) -> None:
        self.table, self.method = table, method
        self.study = _study(table, method, seed, trials)
        self.dists: dict[str, BaseDistribution] = distributions_of(table.spec)
        finals = np.array([r.final for r in table.rows if r.final is not None])
        self.lo, self.hi = finals.min(axis=0), finals.max(axis=0)

    def start(self, worker: int) -> tuple[Any, dict[str, Any]]:
        trial = self.study.ask(fixed_distributions=self.dists)
        return trial, trial.params

    def rung(self, trial: Any, step: int, metrics: dict[str, float]) -> bool:
        if self.method != "asha_weighted":
            return False
        trial.report(_weighted(self.table, metrics, self.lo, self.hi), step)
        return bool(trial.should_prune())

    def end(self, trial: Any, row: Row, stopped: bool) -> None:
        if stopped:
            self.study.tell(trial, state=TrialState.PRUNED)
        elif row.final is None:
            self.study.tell(trial, state=TrialState.FAIL)
        elif self.method == "asha_weighted":
            final = dict(zip(self.table.spec.metric_names, row.final, strict=True))
            self.study.tell(trial, _weighted(self.table, final, self.lo, self.hi))
        else:
            self.study.tell(trial, list(row.final))

    def close(self) -> None:
        pass


class _Server:
    """stagetune as deployed, minus gRPC: the server's own services in this process (a
    SQLite store, the Optuna policy with its suggestion pool and MO-ASHA), called as the
    worker calls them (acquire, a rung report at each rung, complete or fail). The
    sampler is the study's MO-TPE with the seed; the pool samples ahead on its own thread
    as in the server, so a replay is not bit-for-bit repeatable."""

    def __init__(self, table: Table, seed: int, trials: int) -> None:
        import tempfile

        from stagetune.server.optuna_policy import OptunaPolicy
        from stagetune.server.service import StudyService
        from stagetune.server.storage import StudyStore
        from stagetune.server.trial_service import TrialService

        self._tmp = tempfile.TemporaryDirectory()
        self.spec = replace(
            table.spec,
            name=f"race-{seed}",
            sampler=SamplerConfig(kind="tpe", seed=seed),
            # A budget in trials would end a study whose stopped trials cost little: the
            # replay spends compute instead. MO-TPE's start-up trials (a third of the
            # budget, at most 10) are the same 10 as motpe's.
            budget=BudgetSpec(max_trials=100 * trials, max_retries=0),
            early_stopping="mo_asha",
        )
        self.store = StudyStore(f"sqlite:///{self._tmp.name}/race.db")
        self.studies = StudyService(self.store, OptunaPolicy(self.store))
        self.service = TrialService(self.studies)
        self.studies.create_study(self.spec)

    def start(self, worker: int) -> tuple[Any, dict[str, Any]]:
        from stagetune.server.trial_service import Acquired

        got = self.service.acquire(f"w{worker}", self.spec.name)
        if not isinstance(got, Acquired):
            raise RuntimeError(f"the server handed out no trial: {got.reason}")
        return (got.trial.trial_id, f"w{worker}"), dict(got.trial.params)

    def rung(self, handle: tuple[int, str], step: int, metrics: dict[str, float]) -> bool:
        trial_id, worker = handle
        stop, _, _ = self.service.report_progress(trial_id, worker, step, metrics)
        return stop

    def end(self, handle: tuple[int, str], row: Row, stopped: bool) -> None:
        trial_id, worker = handle
        if stopped:
            return  # the server stopped it when it said so
        if row.final is None:
            self.service.fail(trial_id, worker, "crash", "the recorded run failed")
        else:
            final = dict(zip(self.spec.metric_names, row.final, strict=True))
            self.service.complete(trial_id, worker, final)

    def close(self) -> None:
        self.studies.close()
        self.store.optuna_storage.engine.dispose()
        self._tmp.cleanup()


class _SyneTune:
    """Syne Tune's ``MOASHA`` (random configurations, multi-objective asynchronous
    successive halving by non-dominated sorting), given each rung's report as a trial
    result. Its rungs are the study's (grace period the first rung, the same reduction
    factor, ``max_t`` the last rung); it ranks on the objectives a rung report carries, as
    the server does, each turned to minimisation."""

    def __init__(self, table: Table, seed: int) -> None:
        from syne_tune import config_space as cs
        from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA

        np.random.seed(seed)  # MOASHA draws configurations and brackets from numpy's state
        space: dict[str, Any] = {}
        for p in table.spec.search_space:
            if isinstance(p, CategoricalParam):
                space[p.name] = cs.choice(list(p.choices))
            elif isinstance(p, FloatParam):
                space[p.name] = (cs.loguniform if p.log else cs.uniform)(p.low, p.high)
            else:
                space[p.name] = (cs.lograndint if p.log else cs.randint)(p.low, p.high)
        first = table.spec.fidelity.rungs()[0]
        carried = set.intersection(*(set(r.rungs.get(first, {})) for r in table.rows if r.rungs))
        self.signs = {
            o.metric: 1.0 if o.direction == "minimize" else -1.0
            for o in table.spec.objectives
            if o.metric in carried
        }
        self.last = table.spec.fidelity.max_steps
        self.names = table.spec.metric_names
        self.scheduler = MOASHA(
            space,
            metrics=list(self.signs),
            do_minimize=True,
            time_attr="step",
            max_t=self.last,
            grace_period=table.spec.fidelity.min_steps,
            reduction_factor=table.spec.fidelity.reduction_factor,
            random_seed=seed,
        )
        self.count = 0

    def _result(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        return {"step": step, **{m: sign * metrics[m] for m, sign in self.signs.items()}}

    def start(self, worker: int) -> tuple[Any, dict[str, Any]]:
        from datetime import datetime

        from syne_tune.backend.trial_status import Trial

        suggestion = self.scheduler.suggest()
        assert suggestion is not None and suggestion.config is not None
        trial = Trial(trial_id=self.count, config=suggestion.config, creation_time=datetime.now())
        self.count += 1
        self.scheduler.on_trial_add(trial)
        return trial, dict(suggestion.config)

    def rung(self, trial: Any, step: int, metrics: dict[str, float]) -> bool:
        from syne_tune.optimizer.scheduler import SchedulerDecision

        decision = self.scheduler.on_trial_result(trial, self._result(step, metrics))
        return bool(decision == SchedulerDecision.STOP)

    def end(self, trial: Any, row: Row, stopped: bool) -> None:
        if stopped or row.final is None:
            self.scheduler.on_trial_remove(trial)
        else:
            final = dict(zip(self.names, row.final, strict=True))
            self.scheduler.on_trial_complete(trial, self._result(self.last, final))

    def close(self) -> None:
        pass


@dataclass(order=True)
class _Running:
    """A trial in flight in simulated time: its next event is at ``due``."""

    due: float
    seq: int
    worker: int = field(compare=False)
    handle: Any = field(compare=False)
    row: Row = field(compare=False)
    started: float = field(compare=False)
    steps: list[int] = field(compare=False)  # rungs still to report, in order


def replay(table: Table, method: str, seed: int, trials: int, workers: int = 4) -> Trace:
    """Run one method with one seed on ``workers`` asynchronous workers in simulated time
    (a trial's clock is its recorded device-seconds), handing out trials until the budget
    is spent in every unit; trials already running then finish and count."""
    spec = table.spec
    searcher: Any
    if method == "stagetune":
        searcher = _Server(table, seed, trials)
    elif method == "syne_moasha":
        searcher = _SyneTune(table, seed)
    else:
        searcher = _Optuna(table, method, seed, trials)
    last = spec.fidelity.rungs()[-1]
    done: list[tuple[float, ...]] = []
    found: list[tuple[float, ...]] = []  # their configurations' expected vectors
    trace = Trace({u: [0.0] for u in UNITS}, [0.0])
    spent = dict.fromkeys(UNITS, 0.0)
    heap: list[_Running] = []
    free, now, seq = list(range(workers)), 0.0, 0
    draw = random.Random(seed)  # which recorded training seed a trial gets

    def schedule(t: _Running) -> None:
        nonlocal seq
        seq += 1
        step = t.steps[0] if t.steps else None
        at = t.row.rungs[step]["device_seconds"] if step is not None else t.row.cost
        t.due, t.seq = max(now, t.started + at), seq
        heapq.heappush(heap, t)

    def finish(t: _Running, stopped_at: int | None) -> None:
        searcher.end(t.handle, t.row, stopped_at is not None)
        if stopped_at is not None:
            trace.stopped += 1
            cost = {"device-s": t.row.rungs[stopped_at]["device_seconds"], "steps": stopped_at}
        elif t.row.final is None:
            cost = {"device-s": t.row.cost, "steps": float(max(t.row.rungs, default=0))}
        else:
            done.append(t.row.final)
            if t.row.expected is not None:
                found.append(t.row.expected)
            cost = {"device-s": t.row.cost, "steps": float(last)}
        trace.trials += 1
        for u in UNITS:
            spent[u] += cost[u]
            trace.spent[u].append(spent[u])
        hv = hypervolume(done, table.reference, table.directions) if done else 0.0
        trace.hv.append(hv / table.front_hv)
        free.append(t.worker)

    try:
        while True:
            while free and any(spent[u] < table.budget[u] for u in UNITS):
                worker = free.pop(0)
                handle, params = searcher.start(worker)
                row = draw.choice(table.nearest(params))  # one of its training seeds
                steps = []
                for step in spec.fidelity.rungs()[:-1]:
                    if step not in row.rungs:  # the recorded run failed before this rung
                        break
                    steps.append(step)
                schedule(_Running(0.0, 0, worker, handle, row, now, steps))
            if not heap:
                if found:
                    hv = hypervolume(found, table.reference, table.directions)
                    trace.expected_hv = hv / table.expected_hv
                return trace
            t = heapq.heappop(heap)
            now = t.due
            if not t.steps:
                finish(t, None)
                continue
            step = t.steps.pop(0)
            if searcher.rung(t.handle, step, t.row.rungs[step]):
                finish(t, step)
            else:
                schedule(t)  # its next rung, or its end
    finally:
        searcher.close()


def curve(trace: Trace, unit: str, budget: float) -> np.ndarray:
    """Normalised HV at each budget fraction of GRID (the last trial finished by then)."""
    ends = np.array(trace.spent[unit]) / budget
    idx = np.searchsorted(ends, GRID, side="right") - 1
    return np.array(trace.hv)[idx]


_TABLES: dict[str, Table] = {}  # filled before the replay processes fork


def _job(args: tuple[str, str, int, int, int]) -> tuple[str, str, int, Trace]:
    stage, method, seed, trials, workers = args
    return stage, method, seed, replay(_TABLES[stage], method, seed, trials, workers)


# ---------------------------------------------------------------- report


def first_reach(hv: np.ndarray, target: float) -> float:
    """Smallest budget fraction at which ``hv`` reaches ``target`` (inf: never)."""
    hit = np.nonzero(hv >= target)[0]
    return float(GRID[hit[0]]) if len(hit) else math.inf


def _pct(x: float) -> str:
    return "never" if math.isinf(x) else f"{100 * x:.0f}%"


def _iqr(values: Sequence[float] | np.ndarray) -> str:
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return f"{q2:.3f} [{q1:.3f}, {q3:.3f}]"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their mean rank (what Spearman's correlation needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, tie = np.unique(x, return_inverse=True)
    return (np.bincount(tie, ranks) / np.bincount(tie))[tie]


def signal(table: Table) -> str:
    """How much each objective tells early about its final value: Spearman correlation of
    its value at the first rung with its final value over the completed runs, and how far
    its final values spread (an objective the space cannot move is noise)."""
    first = table.spec.fidelity.rungs()[0]
    done = [r for r in table.rows if r.final is not None]
    parts = []
    for i, name in enumerate(table.spec.metric_names):
        finals = np.array([r.final[i] for r in done if r.final is not None])
        distinct = len(np.unique(finals))
        spread = f"final {finals.min():.4g} to {finals.max():.4g}, {distinct} distinct"
        early = [
            (r.rungs[first][name], r.final[i])
            for r in done
            if r.final is not None and name in r.rungs.get(first, {})
        ]
        if len(early) < 3:
            parts.append(f"{name}: not reported at step {first}; {spread}")
            continue
        a, b = (np.array(col, dtype=float) for col in zip(*early, strict=True))
        rho = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1]) if a.std() and b.std() else math.nan
        parts.append(f"{name}: step {first} vs final Spearman {rho:.2f}; {spread}")
    return "Signal in the table: " + "; ".join(parts) + "."


def summarise(
    tables: dict[str, Table], curves: dict[tuple[str, str, str], np.ndarray], traces: Any
) -> tuple[str, list[str]]:
    """The markdown report and its target-check lines."""
    lines: list[str] = []
    verdicts: list[str] = []
    for stage, table in tables.items():
        objectives = ", ".join(f"{o.metric} ({o.direction[:3]})" for o in table.spec.objectives)
        budgets = ", ".join(f"{v:.0f} {u}" for u, v in table.budget.items())
        first = table.spec.fidelity.rungs()[0]
        early = statistics.median(
            r.rungs[first]["device_seconds"] / r.cost for r in table.rows if r.final is not None
        )
        lines += [
            f"### {stage}",
            "",
            f"{len(table.configs)} recorded configurations ({len(table.rows)} runs); objectives "
            f"{objectives}; rungs "
            f"{table.spec.fidelity.rungs()} (reduction factor "
            f"{table.spec.fidelity.reduction_factor:g}); budget {budgets}. A run stopped at "
            f"step {first} costs {early:.0%} of a full run in device-s, "
            f"{first / table.spec.fidelity.max_steps:.0%} in steps (median over the table).",
            "",
            signal(table),
            "",
            "| method | final HV (median [IQR]) | expected final HV | trials | stopped | "
            + " | ".join(f"to 95% NSGA-II ({u})" for u in UNITS)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(UNITS),
        ]
        targets = {
            u: TARGET_SHARE * float(np.median(curves[stage, "nsga2", u][:, -1])) for u in UNITS
        }
        reach: dict[tuple[str, str], float] = {}
        medians: dict[str, dict[str, float]] = {"final HV": {}, "expected final HV": {}}
        for method in METHODS:
            runs = traces[stage, method]
            cells = []
            for u in UNITS:
                fracs = [first_reach(c, targets[u]) for c in curves[stage, method, u]]
                reach[method, u] = float(np.median(fracs))
                hits = sum(not math.isinf(f) for f in fracs)
                cells.append(f"{_pct(reach[method, u])} ({hits}/{len(fracs)} seeds)")
            final = [c[-1] for c in curves[stage, method, "device-s"]]
            expected = [t.expected_hv for t in runs]
            medians["final HV"][method] = float(np.median(final))
            medians["expected final HV"][method] = float(np.median(expected))
            lines.append(
                f"| {method} | {_iqr(final)} | {_iqr(expected)} | "
                f"{statistics.median(t.trials for t in runs):.0f} | "
                f"{statistics.median(t.stopped for t in runs):.0f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
        for kind, score in medians.items():
            ours, theirs = score["stagetune"], score["motpe"]
            verdicts.append(
                f"- {stage}, {kind}: stagetune {ours:.3f} against MO-TPE at full budget "
                f"{theirs:.3f} (medians): target (at least MO-TPE's) "
                f"{'MET' if ours >= theirs else 'NOT met'}"
            )
        for u in UNITS:
            ok = reach["stagetune", u] <= TARGET_COMPUTE
            verdicts.append(
                f"- {stage}, {u}: stagetune reaches 95% of NSGA-II's final HV "
                f"(= {targets[u]:.3f}) after {_pct(reach['stagetune', u])} of NSGA-II's compute "
                f"(median): target (<= 30%) {'MET' if ok else 'NOT met'}"
            )
    return "\n".join(lines), verdicts


def plot(
    tables: dict[str, Table], curves: dict[tuple[str, str, str], np.ndarray], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(UNITS), len(tables), figsize=(5 * len(tables), 4 * len(UNITS)), squeeze=False
    )
    for col, (stage, table) in enumerate(tables.items()):
        for row, unit in enumerate(UNITS):
            ax = axes[row][col]
            x = GRID * table.budget[unit]
            for method in METHODS:
                q1, q2, q3 = np.percentile(curves[stage, method, unit], [25, 50, 75], axis=0)
                (line,) = ax.plot(x, q2, label=method, drawstyle="steps-post")
                ax.fill_between(x, q1, q3, step="post", alpha=0.2, color=line.get_color())
            target = TARGET_SHARE * float(np.median(curves[stage, "nsga2", unit][:, -1]))
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
            ax.axvline(TARGET_COMPUTE * table.budget[unit], color="grey", linestyle=":")
            ax.set_title(f"{stage}")
            ax.set_xlabel(f"cumulative compute ({unit})")
            ax.set_ylabel("normalised hypervolume")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        "Normalised hypervolume vs compute, median and IQR over seeds\n"
        "dashed: 95% of NSGA-II's final HV; dotted: 30% of the budget"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Optuna {optuna.__version__}"
    )


def recorded_with(rows: list[dict[str, Any]]) -> str:
    """The commits and library versions the table's rows were trained with (rows recorded
    before rows were tagged count as untagged)."""
    tags: dict[str, int] = {}
    for r in rows:
        versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
        key = f"commit {r['commit']} ({versions})" if "commit" in r else "untagged"
        tags[key] = tags.get(key, 0) + 1
    return "; ".join(f"{n} rows at {key}" for key, n in tags.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=60, help="budget: this many full runs")
    parser.add_argument("--stages", nargs="+", default=["sft", "pretrain_proxy", "dpo"])
    parser.add_argument("--table", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--specs", type=Path, default=REPO / "configs", help="folder of <stage>.yaml study configs"
    )
    parser.add_argument("--jobs", type=int, default=1, help="replay processes")
    parser.add_argument("--workers", type=int, default=4, help="asynchronous workers a method has")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = load_table(args.table)
    stages = [s for s in args.stages if any(r["stage"] == s for r in rows)]
    tables = {s: load_stage(s, rows, args.trials, args.specs) for s in stages}
    _TABLES.update(tables)
    jobs = [
        (s, m, seed, args.trials, args.workers)
        for s in stages
        for m in METHODS
        for seed in range(args.seeds)
    ]
    traces: dict[tuple[str, str], list[Trace]] = {(s, m): [] for s in stages for m in METHODS}
    with mp.get_context("fork").Pool(args.jobs) as pool:
        for i, (stage, method, seed, trace) in enumerate(pool.imap(_job, jobs), 1):
            traces[stage, method].append(trace)
            print(
                f"[{i}/{len(jobs)}] {stage} {method} seed {seed}: {trace.trials} trials "
                f"({trace.stopped} stopped), HV {trace.hv[-1]:.3f}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    curves = {
        (s, m, u): np.array([curve(t, u, tables[s].budget[u]) for t in traces[s, m]])
        for s in stages
        for m in METHODS
        for u in UNITS
    }
    report, verdicts = summarise(tables, curves, traces)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(tables, curves, args.out / "search_efficiency.png")
    command = " ".join(
        ["OMP_NUM_THREADS=1 .venv/bin/python bench/search_efficiency.py", *sys.argv[1:]]
    )
    tag = provenance(("optuna", "numpy", "moocore", "syne-tune"))
    table_name = args.table.relative_to(REPO) if args.table.is_relative_to(REPO) else args.table
    recorded = {s: sum(r["wall_seconds"] for r in rows if r["stage"] == s) / 60 for s in stages}
    text = "\n".join(
        [
            "# Search efficiency: hypervolume against cumulative compute",
            "",
            f"Command: `{command}` ({time.perf_counter() - started:.0f} s)  ",
            f"Table: `{table_name}` (recording: "
            + ", ".join(f"{s} {m:.1f} min" for s, m in recorded.items())
            + ")  ",
            f"Recorded with: {recorded_with(rows)}  ",
            f"Machine: {_machine()}  ",
            f"Commit {tag['commit']}, "
            + ", ".join(f"{k} {v}" for k, v in tag["versions"].items())
            + "  ",
            f"{args.seeds} seeds; simulated time, {args.workers} asynchronous workers a method; "
            "HV normalised by the "
            "table's own Pareto front; compute fractions are of the budget, which is "
            "NSGA-II's whole compute. Method details: `bench/search_efficiency.py`.",
            "",
            report,
            "## Targets: 95% of NSGA-II's final HV within 30% of its compute; final HV at least "
            "MO-TPE's (medians over seeds)",
            "",
            *verdicts,
            "",
            "![HV vs compute](search_efficiency.png)",
            "",
        ]
    )
    (args.out / "search_efficiency.md").write_text(text)
    print()
    print(report)
    print("\n".join(verdicts))
    print(f"\nwrote {args.out / 'search_efficiency.md'} and search_efficiency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
