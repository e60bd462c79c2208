"""The policy: the only code that asks Optuna for configurations and tells it results.

The server, not the worker, owns sampling: ``ask`` proposes a configuration (or pops a
queued retry) and ``tell_*`` records an outcome. ``decide`` answers a rung report with
continue or stop. Samplers are built from the study spec and cached per study; with a seed
they are reproducible for a given history.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from stagetune.contract.errors import Unavailable
from stagetune.contract.spec import CategoricalParam, FloatParam, ParamValue, StudySpec
from stagetune.server import storage as st
from stagetune.server.asha import rung_decision
from stagetune.server.pool import SuggestionPool
from stagetune.server.records import TrialRecord
from stagetune.server.storage import StudyStore, storage_errors

__all__ = ["OptunaPolicy", "make_sampler", "distributions_of"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def constraint_values(spec: StudySpec, trial: FrozenTrial) -> list[float]:
    """Optuna's constraint convention, one value per constraint of the study, <= 0 when
    met: how far the trial's final metrics (or, for a trial stopped at a rung, its last
    rung's) lie outside each limit. A metric never measured counts as met."""
    ua = trial.user_attrs
    metrics: dict[str, float] = dict(ua.get(st.METRICS) or {})
    if not metrics:
        rungs = st.rung_records(ua)
        metrics = dict(rungs[-1].metrics) if rungs else {}
    return [c.excess(metrics[c.metric]) if c.metric in metrics else 0.0 for c in spec.constraints]


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The sampler a study's spec asks for.

    Small budgets get fewer random start-up trials (a third of the budget, 3 to 10) so the
    model-based part of TPE/NSGA-II has trials left to act on. With constraints, TPE and
    NSGA-II get them as Optuna constraints: they learn where the infeasible region is.
    """
    seed = spec.sampler.seed
    budget = spec.budget.max_trials
    constraints = partial(constraint_values, spec) if spec.constraints else None
    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed,
            population_size=max(4, min(50, budget // 3)),
            constraints_func=constraints,
        )
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        constant_liar=True,  # running trials count as bad guesses: parallel asks spread out
        n_startup_trials=max(3, min(10, budget // 3)),
        constraints_func=constraints,
    )


def distributions_of(spec: StudySpec) -> dict[str, BaseDistribution]:
    dists: dict[str, BaseDistribution] = {}
    for p in spec.search_space:
        if isinstance(p, FloatParam):
            dists[p.name] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            dists[p.name] = CategoricalDistribution(list(p.choices))
        else:
            dists[p.name] = IntDistribution(p.low, p.high, log=p.log, step=p.step)
    return dists


class OptunaPolicy:
    """Ask/tell over the study store. Callers hold the study's lock around each call.

    New configurations come from a pool of suggestions computed in the background
    (server/pool.py); queued trials (retries, warm-start points) are handed out first.
    """

    def __init__(self, store: StudyStore, *, pool_size: int = 8) -> None:
        self._store = store
        self._studies: dict[str, optuna.Study] = {}
        self._lock = threading.Lock()
        self.pool = SuggestionPool(store, make_sampler, distributions_of, size=pool_size)

    def close(self) -> None:
        self.pool.close()

    def _study(self, spec: StudySpec) -> optuna.Study:
        with self._lock:
            study = self._studies.get(spec.name)
            if study is None:
                study = optuna.load_study(
                    study_name=spec.name,
                    storage=self._store.optuna_storage,
                    sampler=make_sampler(spec),
                )
                self._studies[spec.name] = study
            return study

    @storage_errors
    def ask(self, spec: StudySpec, attrs: dict[str, Any], queued: bool) -> TrialRecord:
        """Start a trial: a queued one (retry, warm start) if ``queued``, else the next
        ready suggestion. ``attrs`` (worker, lease) are on the trial returned."""
        if queued:
            trial = self._study(spec).ask(fixed_distributions=distributions_of(spec))
            trial_id = trial._trial_id
            existing = self._store.optuna_storage.get_trial(trial_id).user_attrs
            base: dict[str, Any] = {st.STUDY: spec.name}
            if st.ATTEMPT not in existing:
                base[st.ATTEMPT] = 1
            self._store.set_trial_attrs(trial_id, {**base, **attrs})
            self.pool.started(spec.name, trial_id, dict(trial.params))
            return self._store.trial(trial_id)
        try:
            suggestion = self.pool.pop(spec)
        except TimeoutError:
            raise Unavailable(f"the sampler of {spec.name} is busy; retry") from None
        try:
            record = self._store.create_running_trial(
                spec.name,
                suggestion.params,
                distributions_of(spec),
                attrs,
                suggestion.system_attrs,
            )
        except BaseException:
            self.pool.bind(spec.name, suggestion, None)
            raise
        self.pool.bind(spec.name, suggestion, record.trial_id)
        return record

    def can_ask_new(self, spec: StudySpec, budget_used: int) -> bool:
        return budget_used < spec.budget.max_trials

    def tell_complete(
        self,
        spec: StudySpec,
        trial: TrialRecord,
        values: Sequence[float],
        attrs: dict[str, Any],
    ) -> None:
        self._tell(spec, trial, TrialState.COMPLETE, attrs, values)

    def tell_stopped(self, spec: StudySpec, trial: TrialRecord, attrs: dict[str, Any]) -> None:
        self._tell(spec, trial, TrialState.PRUNED, attrs)

    def tell_failed(self, spec: StudySpec, trial: TrialRecord, attrs: dict[str, Any]) -> None:
        self._tell(spec, trial, TrialState.FAIL, attrs)

    def _tell(
        self,
        spec: StudySpec,
        trial: TrialRecord,
        state: TrialState,
        attrs: dict[str, Any],
        values: Sequence[float] | None = None,
    ) -> None:
        """Record the outcome with its attributes in the database (one transaction); the
        mirror's sampler learns it from there, constraint values included, in the
        background."""
        self._store.finish_trial(trial.trial_id, state, values, attrs)
        self.pool.finished(spec.name, trial.trial_id, values, attrs)

    @storage_errors
    def seed(self, spec: StudySpec, params: dict[str, ParamValue], source: str) -> None:
        """Queue a warm-start configuration as a first attempt (it counts in the budget)."""
        self._study(spec).enqueue_trial(
            dict(params), user_attrs={st.STUDY: spec.name, st.ATTEMPT: 1, st.SEED: source}
        )

    @storage_errors
    def requeue(self, spec: StudySpec, params: dict[str, ParamValue], attempt: int) -> None:
        """Queue the same params as a new attempt; the next ``ask`` hands it out first."""
        self._study(spec).enqueue_trial(
            dict(params), user_attrs={st.STUDY: spec.name, st.ATTEMPT: attempt}
        )

    def decide(
        self, spec: StudySpec, trial: TrialRecord, step: int, metrics: dict[str, float]
    ) -> tuple[bool, str]:
        """Continue or stop a trial after a rung report: (stop?, reason).

        With ``early_stopping: mo_asha``: MO-ASHA (server/asha.py) over the study's
        objectives that the rung report carries (eval_loss and peak_memory_mb, say; decode
        latency is only measured at the end), against every other trial of the study that
        reported at the same step. The last rung always continues: the trial then
        completes with its full measurements.
        """
        rungs = spec.fidelity.rungs()
        if spec.early_stopping != "mo_asha" or step not in rungs[:-1]:
            return False, ""
        objectives = [o for o in spec.objectives if o.metric in metrics]
        if not objectives:
            return False, ""
        names = [o.metric for o in objectives]
        others: list[list[float]] = []
        other_ids: list[int] = []
        # Infeasible trials (outside the constraints) are not rivals.
        for trial_id, reported in self._store.rung_metrics(spec.name, step):
            if trial_id != trial.trial_id and set(names) <= set(reported):
                others.append([reported[n] for n in names])
                other_ids.append(trial_id)
        own = [metrics[n] for n in names]
        directions = [o.direction for o in objectives]
        d = rung_decision(own, others, directions, spec.fidelity.reduction_factor)
        if not d.stop:
            return False, ""
        beaten = ", ".join(str(other_ids[i]) for i in d.dominated_by[:10]) or "none"
        return True, (
            f"stopped at rung {step}: place {d.position + 1} of {d.n} (top {d.keep} continue) "
            f"by non-dominated sorting on {', '.join(names)}; front rank {d.rank}; "
            f"dominated by trials {beaten}"
        )
