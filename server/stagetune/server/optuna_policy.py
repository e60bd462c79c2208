"""``OptunaPolicy``: the server's default policy, Optuna's samplers and MO-ASHA.

New configurations come from a pool of suggestions computed in the background
(server/pool.py), each asked from an in-memory mirror of the study with the sampler its
spec names; queued trials (retries, warm-start points) are Optuna WAITING trials, started
with Optuna's own ``ask``. Rung reports are answered by MO-ASHA (server/asha.py). Samplers
are built from the study spec and cached per study; with a seed they are reproducible
for a given history.
"""

from __future__ import annotations

import threading
from functools import partial

import optuna

from stagetune.contract.errors import Unavailable
from stagetune.contract.spec import ParamValue, StudySpec
from stagetune.server import attributes as at
from stagetune.server import optuna_rdb as rdb
from stagetune.server.asha import rung_decision
from stagetune.server.attributes import constraint_values, distributions_of
from stagetune.server.database import storage_errors
from stagetune.server.policy import Policy
from stagetune.server.pool import SuggestionPool
from stagetune.server.records import TrialLease, TrialOutcome, TrialRecord
from stagetune.server.storage import StudyStore

__all__ = ["OptunaPolicy", "make_sampler", "constraint_values"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


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


class OptunaPolicy(Policy):
    """Optuna's samplers over the study store, with MO-ASHA early stopping."""

    def __init__(
        self, store: StudyStore, *, pool_size: int = 8, sampler_process: bool = False
    ) -> None:
        self._store = store
        self._studies: dict[str, optuna.Study] = {}
        self._lock = threading.Lock()
        self.pool = SuggestionPool(store, make_sampler, size=pool_size, process=sampler_process)

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
    def ask(self, spec: StudySpec, lease: TrialLease, *, queued: bool) -> TrialRecord:
        if queued:
            trial = self._study(spec).ask(fixed_distributions=distributions_of(spec))
            record = self._store.hold_queued(rdb.trial_id(trial), spec.name, lease)
            self.pool.started(spec.name, record.trial_id, dict(trial.params))
            return record
        try:
            suggestion = self.pool.pop(spec)
        except TimeoutError:
            raise Unavailable(f"the sampler of {spec.name} is busy; retry") from None
        try:
            record = self._store.create_running_trial(
                spec, suggestion.params, lease, suggestion.system_attrs
            )
        except BaseException:
            self.pool.bind(spec.name, suggestion, None)
            raise
        self.pool.bind(spec.name, suggestion, record.trial_id)
        return record

    def tell(self, spec: StudySpec, trial: TrialRecord, outcome: TrialOutcome) -> None:
        """The mirror's sampler learns the outcome, constraint values included, in the
        background."""
        self.pool.finished(spec.name, trial.trial_id, outcome)

    @storage_errors
    def enqueue(
        self, spec: StudySpec, params: dict[str, ParamValue], *, attempt: int, source: str = ""
    ) -> None:
        self._study(spec).enqueue_trial(
            dict(params), user_attrs=at.queued_attrs(spec.name, attempt, source)
        )

    def decide(
        self, spec: StudySpec, trial: TrialRecord, step: int, metrics: dict[str, float]
    ) -> tuple[bool, str]:
        """With ``early_stopping: mo_asha``: MO-ASHA (server/asha.py) over the study's
        objectives that the rung report carries (eval_loss and peak_memory_mb, say; decode
        latency is only measured at the end), against every other trial of the study that
        reported at the same step. The last rung always continues: the trial then
        completes with its full measurements. With ``fidelity.brackets`` > 1, a trial is
        not stopped at its bracket's first rungs (``FidelitySpec.stops_at``).
        """
        if spec.early_stopping != "mo_asha" or not spec.fidelity.stops_at(step, trial.number):
            return False, ""
        objectives = [o for o in spec.objectives if o.metric in metrics]
        if not objectives:
            return False, ""
        names = [o.metric for o in objectives]
        # Infeasible trials (outside the constraints) are not rivals.
        other_ids, others = self._store.rung_rivals(spec.name, step, names, trial.trial_id)
        own = [metrics[n] for n in names]
        directions = [o.direction for o in objectives]
        fidelity = spec.fidelity
        d = rung_decision(
            own, others, directions, fidelity.reduction_factor, fidelity.reports_to_stop
        )
        if not d.stop:
            return False, ""
        beaten = ", ".join(str(other_ids[i]) for i in d.dominated_by[:10]) or "none"
        return True, (
            f"stopped at rung {step}: place {d.position + 1} of {d.n} (top {d.keep} continue) "
            f"by non-dominated sorting on {', '.join(names)}; front rank {d.rank}; "
            f"dominated by trials {beaten}"
        )
