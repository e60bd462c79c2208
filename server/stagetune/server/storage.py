"""Storage: Optuna's RDB storage (SQLite or PostgreSQL) as the single source of truth.

Everything the service knows lives here, so a restarted server continues every study.
``StudyStore`` reads and writes domain records (server/records.py) through typed methods:
studies here, trials in its ``TrialStore`` half (server/trial_store.py). Where each fact
is kept is ``attributes.py``'s business, the SQL over Optuna's tables ``optuna_rdb.py``'s,
and what a database failure means to the caller ``database.py``'s (``Unavailable`` while
serving, never ``INTERNAL``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
from google.protobuf import json_format
from optuna.trial import FrozenTrial, TrialState

from stagetune.contract.errors import AlreadyExists, NotFound
from stagetune.contract.spec import StudySpec, spec_from_proto, spec_to_proto
from stagetune.server import attributes as at
from stagetune.server import optuna_rdb as rdb
from stagetune.server.database import open_database, storage_errors
from stagetune.server.records import StudyHead, StudyRecord, StudyStateName, TrialStateName
from stagetune.server.trial_store import STATE_NAME, TrialStore, trial_state
from stagetune.v1 import types_pb2 as pb

_log = logging.getLogger(__name__)

__all__ = ["StudyStore", "Counts", "StudyTally"]


@dataclass(frozen=True)
class Counts:
    """A study's trial counts, read with two aggregate queries instead of its trials."""

    total: int
    waiting: int
    running: int
    budget_used: int  # first attempts created so far (retries excluded)


@dataclass(frozen=True)
class StudyTally:
    """A study as a metrics scrape reads it (``StudyStore.tallies``)."""

    spec: StudySpec
    state: StudyStateName
    created: datetime
    trials: dict[TrialStateName, int]  # every state, zeros included
    hypervolume: float


def _effective_state(
    stored: StudyStateName,
    spec: StudySpec,
    used: int,
    trials: dict[TrialStateName, int],
    spent: Callable[[], float] = lambda: 0.0,
) -> StudyStateName:
    """A running study whose budget is handed out and of which nothing runs or waits is
    done; so is one that spent its device-hours (``spent()``: its device-seconds, read only
    when that decides) and runs nothing: what waits is never handed out."""
    if stored != "running" or trials["running"] > 0:
        return stored
    if used >= spec.budget.max_trials and trials["waiting"] == 0:
        return "done"
    limit = spec.budget.max_device_seconds
    return "done" if limit is not None and spent() >= limit else stored


def _spent(trials: list[FrozenTrial]) -> float:
    """Device-seconds the trials reported (``attributes.device_seconds`` each)."""
    total = 0.0
    for t in trials:
        ua = t.user_attrs
        rungs = [v for k, v in ua.items() if k.startswith(at.RUNG_PREFIX)]
        total += at.device_seconds(ua.get(at.METRICS), rungs)
    return total


def _no_trials() -> dict[TrialStateName, int]:
    counts: dict[TrialStateName, int] = dict.fromkeys(STATE_NAME.values(), 0)
    counts["infeasible"] = 0
    return counts


def _now() -> datetime:
    return datetime.now(UTC)


class StudyStore(TrialStore):
    """Studies and trials in an Optuna RDB storage, read and written as domain records
    (the trials' half is ``TrialStore``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.optuna_storage = open_database(url)
        self._create_lock = threading.Lock()
        self._specs: dict[str, StudySpec] = {}  # parsed spec by its JSON: specs never change
        self._ids: dict[str, int] = {}  # study id by name: studies are never renamed
        self._trial_study: dict[int, str] = {}  # study name by trial id
        self._rungs = {}
        self._rungs_lock = threading.Lock()
        self.postgres = url.startswith("postgresql")

    # ------------------------------------------------------------ studies

    def _study_id(self, name: str) -> int:
        found = self._ids.get(name)
        if found is not None:
            return found
        try:
            study_id = self.optuna_storage.get_study_id_from_name(name)
        except KeyError:
            raise NotFound(f"study {name!r} not found") from None
        self._ids[name] = study_id
        return study_id

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the study's database-wide lock: on PostgreSQL a session advisory lock,
        so server replicas sharing the database count and create trials one at a time
        (budgets stay exact across replicas). SQLite serves one server process, whose
        per-study locks already serialise this."""
        if not self.postgres:
            yield
            return
        key = zlib.crc32(name.encode()) - (1 << 31)  # a signed 32-bit advisory key
        with rdb.advisory_lock(self.optuna_storage, key):
            yield

    @storage_errors
    def create_study(self, spec: StudySpec, team: str = "") -> tuple[StudyRecord, bool]:
        """Create the study, or return the existing equal one. A different spec: AlreadyExists.
        ``team`` (the owner, if any) is written with it, before anyone can see it."""
        spec_json = json_format.MessageToJson(spec_to_proto(spec), sort_keys=True)
        with self._create_lock:
            found = self._found(spec.name)
            if found is not None and not found[1]:
                self._clear_unfinished(spec.name, found[0])
            elif found is not None:
                existing = self.get_study(spec.name)
                if existing.spec.canonical_json() != spec.canonical_json():
                    raise AlreadyExists(
                        f"study {spec.name!r} exists with a different spec; "
                        "choose another name or submit the same spec"
                    )
                return existing, False
            directions = [optuna.study.StudyDirection[d.upper()] for d in spec.directions]
            study_id = self.optuna_storage.create_new_study(directions, spec.name)
            try:
                s = self.optuna_storage
                s.set_study_user_attr(study_id, at.SPEC, spec_json)
                s.set_study_user_attr(study_id, at.CREATED, _now().timestamp())
                if team:
                    s.set_study_user_attr(study_id, at.TEAM, team)
                s.set_study_user_attr(study_id, at.STATE, "running")
                # optuna-dashboard and Optuna's own plots name the objectives from this
                # (else "Objective 0/1/2"). Public API, marked experimental since Optuna 3.2.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.Study(spec.name, s).set_metric_names(spec.metric_names)
            except Exception:
                # A half-written study would block the name forever: remove it.
                self.optuna_storage.delete_study(study_id)
                self._ids.pop(spec.name, None)
                raise
        return self.get_study(spec.name), True

    def _found(self, name: str) -> tuple[int, bool] | None:
        """(Optuna's study id, whether its spec is written) for ``name``; None: no row. The
        spec is the first write after Optuna's row: without it, a creation was cut short."""
        try:
            study_id = self._study_id(name)
        except NotFound:
            return None
        return study_id, at.SPEC in rdb.study_attrs(self.optuna_storage, study_id, [at.SPEC])

    def _clear_unfinished(self, name: str, study_id: int) -> None:
        """Remove a study whose creation was cut short (the server killed between Optuna's
        row and the spec): invisible to ``study_exists``, it would hold the name forever."""
        _log.warning("study %r: removing a creation cut short (no spec written)", name)
        self.optuna_storage.delete_study(study_id)
        self._ids.pop(name, None)

    @storage_errors
    def study_exists(self, name: str) -> bool:
        """Whether the study exists: its spec is stored (a creation cut short by a crash
        does not count)."""
        found = self._found(name)
        return found is not None and found[1]

    @storage_errors
    def owner(self, name: str) -> str | None:
        """The team a study belongs to; None if it has none or does not exist."""
        try:
            team = rdb.study_attrs(self.optuna_storage, self._study_id(name), [at.TEAM])
        except NotFound:
            return None
        found = team.get(at.TEAM)
        return found if isinstance(found, str) and found else None

    @storage_errors
    def owners(self) -> dict[str, str]:
        """Study name -> owning team, for every study that has one."""
        found: dict[str, str] = {}
        for s in self.optuna_storage.get_all_studies():
            team = s.user_attrs.get(at.TEAM)
            if isinstance(team, str) and team:
                found[s.study_name] = team
        return found

    def _spec(self, spec_json: str) -> StudySpec:
        spec = self._specs.get(spec_json)
        if spec is None:
            spec = spec_from_proto(json_format.Parse(spec_json, pb.StudySpec()))
            self._specs[spec_json] = spec
        return spec

    @storage_errors
    def study_head(self, name: str) -> StudyHead:
        """Spec, stored state and reference of a study, without reading its trials (or
        its other attributes: one query for the three it needs)."""
        keys = [at.SPEC, at.STATE, at.REFERENCE]
        attrs = rdb.study_attrs(self.optuna_storage, self._study_id(name), keys)
        if at.SPEC not in attrs:
            raise NotFound(f"study {name!r} not found")
        return self._head(attrs)

    def _head(self, attrs: dict[str, Any]) -> StudyHead:
        ref = attrs.get(at.REFERENCE)
        return StudyHead(
            self._spec(attrs[at.SPEC]),
            attrs.get(at.STATE, "running"),
            tuple(ref) if ref is not None else None,
        )

    def _record(self, study_id: int, attrs: dict[str, Any]) -> StudyRecord:
        spec = self._spec(attrs[at.SPEC])
        trials = self.optuna_storage.get_all_trials(study_id, deepcopy=False)
        counts = _no_trials()
        used = 0
        for t in trials:
            counts[trial_state(t)] += 1
            used += int(t.user_attrs.get(at.ATTEMPT, 1)) == 1
        state = _effective_state(
            attrs.get(at.STATE, "running"), spec, used, counts, lambda: _spent(trials)
        )
        ref = attrs.get(at.REFERENCE)
        return StudyRecord(
            spec=spec,
            state=state,
            created=at.timestamp(attrs.get(at.CREATED)) or _now(),
            counts=counts,
            budget_used=used,
            reference=tuple(ref) if ref is not None else None,
            mlflow_experiment_id=attrs.get(at.MLFLOW_EXPERIMENT, ""),
            mlflow_run_id=attrs.get(at.MLFLOW_RUN, ""),
            hypervolume=float(attrs.get(at.HYPERVOLUME, 0.0)),
        )

    @storage_errors
    def get_study(self, name: str) -> StudyRecord:
        study_id = self._study_id(name)
        attrs = self.optuna_storage.get_study_user_attrs(study_id)
        if at.SPEC not in attrs:
            raise NotFound(f"study {name!r} not found")
        return self._record(study_id, attrs)

    @storage_errors
    def study_heads(self) -> list[tuple[StudyHead, datetime]]:
        """Every study's head and creation time, without reading any trial."""
        heads = []
        for s in self.optuna_storage.get_all_studies():
            attrs = s.user_attrs
            if at.SPEC in attrs:
                self._ids.setdefault(s.study_name, rdb.study_id(s))
                heads.append((self._head(attrs), at.timestamp(attrs.get(at.CREATED)) or _now()))
        return heads

    @storage_errors
    def list_studies(self) -> list[StudyRecord]:
        records = [
            self._record(rdb.study_id(s), s.user_attrs)
            for s in self.optuna_storage.get_all_studies()
            if at.SPEC in s.user_attrs
        ]
        return sorted(records, key=lambda r: r.created, reverse=True)

    @storage_errors
    def tallies(self) -> list[StudyTally]:
        """Every study's state, trial counts by state and hypervolume, in a fixed number of
        queries whatever the number of studies and trials (what a metrics scrape reads)."""
        rows = rdb.trial_counts_by_study(
            self.optuna_storage, at.INFEASIBLE, at.ATTEMPT, other_than=1
        )
        counts: dict[int, dict[TrialStateName, int]] = {}
        used: dict[int, int] = {}
        for study_id, optuna_state, infeasible, retry, n in rows:
            name = STATE_NAME[optuna_state]
            if infeasible and name in ("complete", "stopped", "failed"):
                name = "infeasible"
            counts.setdefault(study_id, _no_trials())[name] += n
            used[study_id] = used.get(study_id, 0) + (0 if retry else n)
        tallies = []
        for s in self.optuna_storage.get_all_studies():
            attrs = s.user_attrs
            if at.SPEC not in attrs:
                continue
            study_id = rdb.study_id(s)
            trials = counts.get(study_id, _no_trials())
            spec = self._spec(attrs[at.SPEC])
            state = _effective_state(
                attrs.get(at.STATE, "running"),
                spec,
                used.get(study_id, 0),
                trials,
                functools.partial(self.device_seconds, s.study_name, spec.fidelity.rungs()),
            )
            created = at.timestamp(attrs.get(at.CREATED)) or _now()
            hypervolume = float(attrs.get(at.HYPERVOLUME, 0.0))
            tallies.append(StudyTally(spec, state, created, trials, hypervolume))
        return tallies

    @storage_errors
    def counts(self, name: str) -> Counts:
        study_id = self._study_id(name)
        states = rdb.trial_counts(self.optuna_storage, study_id)
        retries = rdb.count_trials_with_attr(
            self.optuna_storage, study_id, at.ATTEMPT, other_than=1
        )
        total = sum(states.values())
        return Counts(
            total=total,
            waiting=states.get(TrialState.WAITING, 0),
            running=states.get(TrialState.RUNNING, 0),
            budget_used=total - retries,
        )

    @storage_errors
    def set_study_state(self, name: str, state: StudyStateName) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), at.STATE, state)

    @storage_errors
    def set_reference(self, name: str, reference: Iterable[float]) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), at.REFERENCE, list(reference))

    @storage_errors
    def set_hypervolume(self, name: str, value: float) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), at.HYPERVOLUME, value)

    @storage_errors
    def set_study_tracking(self, name: str, experiment_id: str, run_id: str) -> None:
        study_id = self._study_id(name)
        self.optuna_storage.set_study_user_attr(study_id, at.MLFLOW_EXPERIMENT, experiment_id)
        self.optuna_storage.set_study_user_attr(study_id, at.MLFLOW_RUN, run_id)
