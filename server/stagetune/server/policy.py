"""The policy: how a study's trials are chosen and when they are stopped.

This is the seam between the study service and a search algorithm, in the manner of OSS
Vizier's Pythia policies: the server is handed a ``PolicyFactory`` when it is built
(``make_server(settings, policy_factory=...)``), calls it once with the ``StudyStore``,
and from then on asks the policy it got for every decision of every study. The service
keeps everything else: validation, the per-study locks, leases, idempotency, budgets,
hard constraints, what is stored when a trial ends, the Pareto front and tracking.
``OptunaPolicy`` (server/optuna_policy.py: Optuna's samplers and MO-ASHA) is the one
the server uses unless told otherwise.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from stagetune.contract.spec import ParamValue, StudySpec
from stagetune.server.records import TrialLease, TrialOutcome, TrialRecord
from stagetune.server.storage import StudyStore

__all__ = ["Policy", "PolicyFactory"]


class Policy(abc.ABC):
    """Proposes configurations, learns outcomes and answers rung reports for every study
    of one server.

    Calling conventions. The study service calls each method with the study's per-study
    lock held: calls for one study never overlap, calls for different studies may run
    concurrently on different threads. The service has validated what it passes in: the
    spec is the study's stored spec, metrics are finite and bounded, ``trial`` is the
    trial as stored just before the call. A method that cannot answer because something
    it needs is briefly out of reach raises ``stagetune.contract.errors.Unavailable``: the
    caller's RPC fails with UNAVAILABLE and the client retries. Anything else it raises
    is a server bug (INTERNAL, logged). A policy reads the study's data only through the
    ``StudyStore`` its factory was given; it keeps no state the store cannot rebuild, so a
    restarted server (or a second replica sharing the database) carries on.

    The queue. A study's WAITING trials (``StudyStore.counts(...).waiting``) are its
    queue: warm-start seeds and retries put there by ``enqueue``, handed out before any
    new configuration. The service counts the budget (``spec.budget.max_trials`` first
    attempts; retries do not count) and asks for a new configuration only within it.
    """

    @abc.abstractmethod
    def ask(self, spec: StudySpec, lease: TrialLease, *, queued: bool) -> TrialRecord:
        """Start a trial of ``spec``'s study, held by ``lease``, and return it as stored.

        With ``queued`` the study has WAITING trials: start one of them (the oldest
        first), completing any params the queued point left out. Otherwise propose a new
        configuration within ``spec.search_space`` and create it as a RUNNING first
        attempt (``StudyStore.create_running_trial``). The trial must be in the store,
        RUNNING and held by ``lease.worker_id``, when this returns. Raise ``Unavailable``
        when no configuration can be had now (the worker asks again).
        """

    @abc.abstractmethod
    def enqueue(
        self, spec: StudySpec, params: dict[str, ParamValue], *, attempt: int, source: str = ""
    ) -> None:
        """Queue ``params`` as a WAITING trial that a later ``ask(queued=True)`` starts.

        ``attempt == 1``: a warm-start seed (``source`` says where it came from, e.g.
        ``defaults:lora`` or ``study:NAME#3``), queued when the study is created; its
        params may leave out some of the search space. ``attempt > 1``: a retry of a
        failed attempt with exactly these params.
        """

    @abc.abstractmethod
    def tell(self, spec: StudySpec, trial: TrialRecord, outcome: TrialOutcome) -> None:
        """Learn how ``trial`` ended. The service has already stored ``outcome`` (state,
        objective values, final metrics, infeasibility) before this call, so a policy
        that learns only from the store may do nothing here. The trial has ended either
        way: a problem learning it is the policy's to log, not to raise."""

    @abc.abstractmethod
    def decide(
        self, spec: StudySpec, trial: TrialRecord, step: int, metrics: dict[str, float]
    ) -> tuple[bool, str]:
        """Continue or stop ``trial`` after its report at rung ``step`` (one of
        ``spec.fidelity.rungs()``; already stored, so it is among the study's reports at
        ``step``): returns (stop?, reason). The reason reaches the worker and the trial's
        record, and should say why in words a person can check. Hard constraints and
        stopped studies are the service's: a policy is asked only when neither applies.
        """

    def close(self) -> None:  # noqa: B027 (a hook: most policies have nothing to stop)
        """Stop background work. Called once, after the server stopped serving."""


PolicyFactory = Callable[[StudyStore], Policy]
"""Builds the server's policy from its store (``OptunaPolicy`` is one)."""
