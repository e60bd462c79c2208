"""The study service: the use cases of teams (create, read, stop a study; list its
trials and its Pareto front), and what both services share: per-study locks, the policy,
the fronts and the tracker.

The worker's use cases are ``TrialService`` (server/trial_service.py). Both sit between
the servicers (wire) and the policy/storage/tracking layers; they never see a proto,
never import Optuna or MLflow, and never name a stored attribute (the store's typed
methods do). Every state change goes to the store first; the policy learns it and the
tracker is told afterwards, and tracking failures never reach the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from stagetune.contract.spec import StudySpec, validate_spec
from stagetune.objectives.pareto import knee_point
from stagetune.server.front import StudyFronts, ranked
from stagetune.server.policy import Policy
from stagetune.server.records import StudyRecord, TrialRecord, TrialStateName
from stagetune.server.storage import StudyStore
from stagetune.server.tracking import NullTracker, Tracker
from stagetune.server.warmstart import warm_start_seeds

__all__ = ["StudyService", "ParetoView"]


@dataclass(frozen=True)
class ParetoView:
    spec: StudySpec
    front: list[TrialRecord]
    hypervolume: float
    knee_trial_id: int


class StudyService:
    """Use cases of teams, over the store, the policy and the tracker it is given."""

    def __init__(self, store: StudyStore, policy: Policy, tracker: Tracker | None = None) -> None:
        self.store = store
        self.policy = policy
        self.tracker: Tracker = tracker or NullTracker()
        self.fronts = StudyFronts(store, self.tracker)
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()

    def close(self) -> None:
        """Stop background work (the policy's); called once the server drained."""
        self.policy.close()

    def lock(self, study_name: str) -> threading.RLock:
        """The study's lock, held around every change to its state and its trials."""
        with self._locks_guard:
            return self._locks.setdefault(study_name, threading.RLock())

    # ------------------------------------------------------------ studies

    def create_study(self, spec: StudySpec, team: str = "") -> tuple[StudyRecord, bool]:
        """Create a study (``team``: its owner, when the caller has one)."""
        validate_spec(spec)  # raises before anything is written
        seeds = warm_start_seeds(spec, self.store)  # so do unknown or mismatched sources
        record, created = self.store.create_study(spec, team)
        if created and seeds:
            with self.lock(spec.name):
                for source, params in seeds:
                    self.policy.enqueue(spec, params, attempt=1, source=source)
            record = self.store.get_study(spec.name)
        if created or not record.mlflow_run_id:
            # A slow tracking server answers after this call returns: stored when it does.
            late = functools.partial(self.store.set_study_tracking, spec.name)
            experiment_id, run_id = self.tracker.study_created(spec, on_late=late)
            if run_id:
                self.store.set_study_tracking(spec.name, experiment_id, run_id)
                record = dataclasses.replace(
                    record, mlflow_experiment_id=experiment_id, mlflow_run_id=run_id
                )
        return record, created

    def get_study(self, name: str) -> StudyRecord:
        return self.store.get_study(name)

    def list_studies(self) -> list[StudyRecord]:
        return self.store.list_studies()

    def stop_study(self, name: str) -> StudyRecord:
        with self.lock(name):
            record = self.store.get_study(name)
            if record.state == "running":
                self.store.set_study_state(name, "stopped")
            return self.store.get_study(name)

    def list_trials(
        self, name: str, states: Iterable[TrialStateName] | None = None
    ) -> list[TrialRecord]:
        spec = self.store.get_study(name).spec
        wanted = set(states or ())
        return [t for t in ranked(spec, self.store.trials(name)) if not wanted or t.state in wanted]

    def pareto_front(self, name: str) -> ParetoView:
        record = self.store.get_study(name)
        trials = ranked(record.spec, self.store.trials(name, ["complete"]))
        front = sorted((t for t in trials if t.pareto_rank == 1), key=lambda t: t.values)
        knee = 0
        if front:
            knee = front[knee_point([t.values for t in front], record.spec.directions)].trial_id
        return ParetoView(record.spec, front, record.hypervolume, knee)
