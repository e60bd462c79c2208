"""Storage: Optuna's RDB storage (SQLite or PostgreSQL) as the single source of truth.

Everything the service knows lives here, so a restarted server continues every study.
Study attributes hold the spec, state and frozen hypervolume reference; trial user
attributes hold the worker, lease, attempt, rung reports and final metrics.

Database failures become ``Unavailable`` (clients retry), never ``INTERNAL``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import optuna
import sqlalchemy.exc
from google.protobuf import json_format
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session as _scoped_session
from optuna.trial import FrozenTrial, TrialState

from stagetune.contract.errors import AlreadyExists, NotFound, Unavailable
from stagetune.contract.spec import StudySpec, spec_from_proto, spec_to_proto
from stagetune.server.records import (
    RungRecord,
    StudyHead,
    StudyRecord,
    StudyStateName,
    TrialRecord,
    TrialStateName,
)
from stagetune.v1 import types_pb2 as pb

__all__ = ["StudyStore", "Counts", "storage_errors", "default_storage_url"]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

_STATE_NAME: dict[TrialState, TrialStateName] = {
    TrialState.WAITING: "waiting",
    TrialState.RUNNING: "running",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "stopped",
    TrialState.FAIL: "failed",
}

# Keys of study user attributes.
_SPEC = "st_spec"
_STATE = "st_state"
_CREATED = "st_created"
_REFERENCE = "st_reference"
_MLFLOW_EXPERIMENT = "st_mlflow_experiment_id"
_MLFLOW_RUN = "st_mlflow_run_id"
_HYPERVOLUME = "st_hypervolume"

# Keys of trial user attributes.
STUDY = "st_study"
ATTEMPT = "st_attempt"
WORKER = "st_worker"
LEASE = "st_lease"
REASON = "st_reason"
METRICS = "st_metrics"
RUN_ID = "st_mlflow_run_id"
RUNG_PREFIX = "st_rung_"
SEED = "st_seed"  # where a warm-start trial's params came from
INFEASIBLE = "st_infeasible"  # the broken constraint, or "out of memory"
REQUEST_PREFIX = "st_req_"  # idempotency key -> {"payload": fingerprint, "answer": {...}}


@dataclass(frozen=True)
class Counts:
    """A study's trial counts, read with two aggregate queries instead of its trials."""

    total: int
    waiting: int
    running: int
    budget_used: int  # first attempts created so far (retries excluded)


def running_trial(
    params: dict[str, Any],
    distributions: dict[str, BaseDistribution],
    user_attrs: dict[str, Any] | None = None,
    system_attrs: dict[str, Any] | None = None,
    start: datetime | None = None,
    number: int = -1,
    trial_id: int = -1,
) -> FrozenTrial:
    """A RUNNING Optuna trial with these params (a template, until number and id are set)."""
    return FrozenTrial(
        number=number,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=start,
        datetime_complete=None,
        params=dict(params),
        distributions={k: distributions[k] for k in params if k in distributions},
        user_attrs=dict(user_attrs or {}),
        system_attrs=dict(system_attrs or {}),
        intermediate_values={},
        trial_id=trial_id,
    )


def default_storage_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'stagetune.db').resolve()}"


# What a database that is down, unreachable or out of free connections raises.
_OUTAGES = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no free connection in the pool: busy, not broken
)


def storage_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn database outages into ``Unavailable``, so clients retry instead of giving up."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except _OUTAGES as e:
            _log.warning("storage unavailable in %s: %s", fn.__name__, e)
            raise Unavailable("storage unavailable; retry later") from None
        except optuna.exceptions.StorageInternalError as e:
            _log.warning("storage error in %s: %s", fn.__name__, e)
            raise Unavailable("storage unavailable; retry later") from None

    return wrapper


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value is not None else None


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Wait for a writer rather than failing with "database is locked".
        return {"connect_args": {"timeout": 60, "check_same_thread": False}}
    return {"pool_pre_ping": True, "pool_size": 8, "max_overflow": 16}


def rung_records(user_attrs: dict[str, Any]) -> list[RungRecord]:
    """A trial's rung reports, by step, from its user attributes."""
    return sorted(
        (
            RungRecord(int(k[len(RUNG_PREFIX) :]), v["metrics"], _ts(v["time"]) or _now())
            for k, v in user_attrs.items()
            if k.startswith(RUNG_PREFIX)
        ),
        key=lambda r: r.step,
    )


def _state(t: FrozenTrial) -> TrialStateName:
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and t.user_attrs.get(
        INFEASIBLE
    ):
        return "infeasible"
    return _STATE_NAME[t.state]


class StudyStore:
    """Studies and trials in an Optuna RDB storage, read and written as domain records."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.optuna_storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        except _OUTAGES as e:
            raise Unavailable(
                f"cannot open storage: {e.orig if hasattr(e, 'orig') else e}"
            ) from None
        if url.startswith("sqlite"):
            with self.optuna_storage.engine.connect() as conn:
                # WAL lets readers proceed while one writer commits; it persists in the file.
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        self._create_lock = threading.Lock()
        self._specs: dict[str, StudySpec] = {}  # parsed spec by its JSON: specs never change
        self._ids: dict[str, int] = {}  # study id by name: studies are never renamed
        self._trial_study: dict[int, str] = {}  # study name by trial id
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
        with self.optuna_storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()

    @storage_errors
    def create_study(
        self, spec: StudySpec, attrs: dict[str, Any] | None = None
    ) -> tuple[StudyRecord, bool]:
        """Create the study, or return the existing equal one. A different spec: AlreadyExists.
        ``attrs`` (the owning team, say) are written with it, before anyone can see it."""
        spec_json = json_format.MessageToJson(spec_to_proto(spec), sort_keys=True)
        with self._create_lock:
            try:
                study_id = self.optuna_storage.get_study_id_from_name(spec.name)
            except KeyError:
                study_id = None
            if study_id is not None:
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
                s.set_study_user_attr(study_id, _SPEC, spec_json)
                s.set_study_user_attr(study_id, _CREATED, _now().timestamp())
                for key, value in (attrs or {}).items():
                    s.set_study_user_attr(study_id, key, value)
                s.set_study_user_attr(study_id, _STATE, "running")
            except Exception:
                # A half-written study would block the name forever: remove it.
                self.optuna_storage.delete_study(study_id)
                raise
        return self.get_study(spec.name), True

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
        sua = models.StudyUserAttributeModel
        query = sqlalchemy.select(sua.key, sua.value_json).where(
            sua.study_id == self._study_id(name), sua.key.in_([_SPEC, _STATE, _REFERENCE])
        )
        with self.optuna_storage.engine.connect() as conn:
            attrs = {key: json.loads(value) for key, value in conn.execute(query)}
        if _SPEC not in attrs:
            raise NotFound(f"study {name!r} not found")
        return self._head(attrs)

    def _head(self, attrs: dict[str, Any]) -> StudyHead:
        ref = attrs.get(_REFERENCE)
        return StudyHead(
            self._spec(attrs[_SPEC]),
            attrs.get(_STATE, "running"),
            tuple(ref) if ref is not None else None,
        )

    def _record(self, study_id: int, attrs: dict[str, Any]) -> StudyRecord:
        spec = self._spec(attrs[_SPEC])
        trials = self.optuna_storage.get_all_trials(study_id, deepcopy=False)
        counts: dict[TrialStateName, int] = dict.fromkeys(_STATE_NAME.values(), 0)
        counts["infeasible"] = 0
        used = 0
        for t in trials:
            counts[_state(t)] += 1
            used += int(t.user_attrs.get(ATTEMPT, 1)) == 1
        state: StudyStateName = attrs.get(_STATE, "running")
        if (
            state == "running"
            and used >= spec.budget.max_trials
            and counts["running"] == 0
            and counts["waiting"] == 0
        ):
            state = "done"
        ref = attrs.get(_REFERENCE)
        return StudyRecord(
            spec=spec,
            state=state,
            created=_ts(attrs.get(_CREATED)) or _now(),
            counts=counts,
            budget_used=used,
            reference=tuple(ref) if ref is not None else None,
            mlflow_experiment_id=attrs.get(_MLFLOW_EXPERIMENT, ""),
            mlflow_run_id=attrs.get(_MLFLOW_RUN, ""),
            hypervolume=float(attrs.get(_HYPERVOLUME, 0.0)),
        )

    @storage_errors
    def get_study(self, name: str) -> StudyRecord:
        study_id = self._study_id(name)
        attrs = self.optuna_storage.get_study_user_attrs(study_id)
        if _SPEC not in attrs:
            raise NotFound(f"study {name!r} not found")
        return self._record(study_id, attrs)

    @storage_errors
    def study_heads(self) -> list[tuple[StudyHead, datetime]]:
        """Every study's head and creation time, without reading any trial."""
        heads = []
        for s in self.optuna_storage.get_all_studies():
            attrs = s.user_attrs
            if _SPEC in attrs:
                self._ids.setdefault(s.study_name, s._study_id)
                heads.append((self._head(attrs), _ts(attrs.get(_CREATED)) or _now()))
        return heads

    @storage_errors
    def counts(self, name: str) -> Counts:
        study_id = self._study_id(name)
        t, ua = models.TrialModel, models.TrialUserAttributeModel
        by_state = (
            sqlalchemy.select(t.state, sqlalchemy.func.count())
            .where(t.study_id == study_id)
            .group_by(t.state)
        )
        retries = (
            sqlalchemy.select(sqlalchemy.func.count())
            .select_from(ua)
            .join(t, t.trial_id == ua.trial_id)
            .where(t.study_id == study_id, ua.key == ATTEMPT, ua.value_json != "1")
        )
        with self.optuna_storage.engine.connect() as conn:
            states = {state: int(n) for state, n in conn.execute(by_state)}
            n_retries = int(conn.execute(retries).scalar_one())
        total = sum(states.values())
        return Counts(
            total=total,
            waiting=states.get(TrialState.WAITING, 0),
            running=states.get(TrialState.RUNNING, 0),
            budget_used=total - n_retries,
        )

    @storage_errors
    def held_trial(self, name: str, worker_id: str) -> int | None:
        """The id of a running trial of the study that ``worker_id`` holds, if any."""
        t, ua = models.TrialModel, models.TrialUserAttributeModel
        query = (
            sqlalchemy.select(t.trial_id)
            .join(ua, t.trial_id == ua.trial_id)
            .where(
                t.study_id == self._study_id(name),
                t.state == TrialState.RUNNING,
                ua.key == WORKER,
                ua.value_json == json.dumps(worker_id),
            )
            .limit(1)
        )
        with self.optuna_storage.engine.connect() as conn:
            found = conn.execute(query).scalar_one_or_none()
        return None if found is None else int(found)

    @storage_errors
    def count_complete(self, name: str) -> int:
        """How many trials of the study are COMPLETE (feasible or not)."""
        t = models.TrialModel
        query = (
            sqlalchemy.select(sqlalchemy.func.count())
            .select_from(t)
            .where(t.study_id == self._study_id(name), t.state == TrialState.COMPLETE)
        )
        with self.optuna_storage.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    @storage_errors
    def complete_values(self, name: str) -> list[tuple[int, tuple[float, ...]]]:
        """(trial id, objective values) of every COMPLETE trial that is not infeasible,
        read with two light queries (the Pareto front needs nothing else)."""
        study_id = self._study_id(name)
        t, v, ua = models.TrialModel, models.TrialValueModel, models.TrialUserAttributeModel
        rows = (
            sqlalchemy.select(v.trial_id, v.objective, v.value, v.value_type)
            .join(t, t.trial_id == v.trial_id)
            .where(t.study_id == study_id, t.state == TrialState.COMPLETE)
        )
        infeasible = (
            sqlalchemy.select(ua.trial_id)
            .join(t, t.trial_id == ua.trial_id)
            .where(t.study_id == study_id, ua.key == INFEASIBLE)
        )
        values: dict[int, dict[int, float]] = {}
        with self.optuna_storage.engine.connect() as conn:
            for trial_id, objective, value, kind in conn.execute(rows):
                stored = models.TrialValueModel.stored_repr_to_value(value, kind)
                values.setdefault(int(trial_id), {})[int(objective)] = stored
            excluded = {int(i) for (i,) in conn.execute(infeasible)}
        return [
            (i, tuple(vals[k] for k in sorted(vals)))
            for i, vals in sorted(values.items())
            if i not in excluded
        ]

    @storage_errors
    def rung_metrics(self, name: str, step: int) -> list[tuple[int, dict[str, float]]]:
        """(trial id, metrics) of every trial of the study that reported at ``step``,
        infeasible ones excluded: what MO-ASHA ranks a rung report against."""
        study_id = self._study_id(name)
        t, ua = models.TrialModel, models.TrialUserAttributeModel
        rows = (
            sqlalchemy.select(ua.trial_id, ua.key, ua.value_json)
            .join(t, t.trial_id == ua.trial_id)
            .where(t.study_id == study_id, ua.key.in_([f"{RUNG_PREFIX}{step}", INFEASIBLE]))
        )
        reports: dict[int, dict[str, float]] = {}
        excluded: set[int] = set()
        with self.optuna_storage.engine.connect() as conn:
            for trial_id, key, value_json in conn.execute(rows):
                if key == INFEASIBLE:
                    excluded.add(int(trial_id))
                else:
                    reports[int(trial_id)] = dict(json.loads(value_json).get("metrics", {}))
        return [(i, m) for i, m in sorted(reports.items()) if i not in excluded]

    @storage_errors
    def create_running_trial(
        self,
        name: str,
        params: dict[str, Any],
        distributions: dict[str, BaseDistribution],
        attrs: dict[str, Any],
        system_attrs: dict[str, Any],
    ) -> TrialRecord:
        """Insert a RUNNING trial with its params and attributes in one transaction
        (``system_attrs``: what the sampler noted when it proposed the params)."""
        study_id = self._study_id(name)
        user_attrs = {STUDY: name, ATTEMPT: 1, **attrs}
        dists = {k: distributions[k] for k in params}
        started = _now()
        # Optuna's create_new_trial checks each param against earlier trials' distributions
        # and writes each attribute with its own lookups (25 queries for a LoRA trial);
        # the spec fixed the distributions, so the rows go in as three bulk inserts.
        with _scoped_session(self.optuna_storage.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            row = models.TrialModel(
                study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=started
            )
            session.add(row)
            session.flush()
            trial_id = int(row.trial_id)
            if params:
                session.execute(
                    sqlalchemy.insert(models.TrialParamModel),
                    [
                        {
                            "trial_id": trial_id,
                            "param_name": k,
                            "param_value": dists[k].to_internal_repr(v),
                            "distribution_json": distribution_to_json(dists[k]),
                        }
                        for k, v in params.items()
                    ],
                )
            for model, values in (
                (models.TrialUserAttributeModel, user_attrs),
                (models.TrialSystemAttributeModel, system_attrs),
            ):
                if values:
                    session.execute(
                        sqlalchemy.insert(model),
                        [
                            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                            for k, v in values.items()
                        ],
                    )
            row.number = row.count_past_trials(session)
            number = int(row.number)
        self._trial_study[trial_id] = name
        frozen = running_trial(
            params, dists, user_attrs, system_attrs, started, number=number, trial_id=trial_id
        )
        return self._trial_record(name, frozen)

    @storage_errors
    def list_studies(self) -> list[StudyRecord]:
        records = [
            self._record(s._study_id, s.user_attrs)
            for s in self.optuna_storage.get_all_studies()
            if _SPEC in s.user_attrs
        ]
        return sorted(records, key=lambda r: r.created, reverse=True)

    @storage_errors
    def set_study_state(self, name: str, state: StudyStateName) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), _STATE, state)

    @storage_errors
    def set_reference(self, name: str, reference: Iterable[float]) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), _REFERENCE, list(reference))

    @storage_errors
    def set_hypervolume(self, name: str, value: float) -> None:
        self.optuna_storage.set_study_user_attr(self._study_id(name), _HYPERVOLUME, value)

    @storage_errors
    def set_study_tracking(self, name: str, experiment_id: str, run_id: str) -> None:
        study_id = self._study_id(name)
        self.optuna_storage.set_study_user_attr(study_id, _MLFLOW_EXPERIMENT, experiment_id)
        self.optuna_storage.set_study_user_attr(study_id, _MLFLOW_RUN, run_id)

    # ------------------------------------------------------------ trials

    def _trial_record(self, study_name: str, t: FrozenTrial) -> TrialRecord:
        ua = t.user_attrs
        rungs = rung_records(ua)
        return TrialRecord(
            trial_id=t._trial_id,
            number=t.number,
            study_name=study_name,
            state=_state(t),
            params=dict(t.params),
            attempt=int(ua.get(ATTEMPT, 1)),
            metrics=dict(ua.get(METRICS, {})),
            values=tuple(t.values) if t.state == TrialState.COMPLETE and t.values else (),
            rungs=tuple(rungs),
            worker_id=ua.get(WORKER, ""),
            start=t.datetime_start.astimezone(UTC) if t.datetime_start else None,
            end=t.datetime_complete.astimezone(UTC) if t.datetime_complete else None,
            lease_expires=_ts(ua.get(LEASE)) if t.state == TrialState.RUNNING else None,
            reason=ua.get(REASON, ""),
            mlflow_run_id=ua.get(RUN_ID, ""),
        )

    @storage_errors
    def trials(
        self, study_name: str, states: Iterable[TrialStateName] | None = None
    ) -> list[TrialRecord]:
        study_id = self._study_id(study_name)
        wanted = set(states or ())
        # An infeasible trial is COMPLETE, PRUNED or FAIL in Optuna, marked by an attribute.
        names = wanted | ({"complete", "stopped", "failed"} if "infeasible" in wanted else set())
        optuna_states = tuple(s for s, n in _STATE_NAME.items() if n in names) if wanted else None
        records = [
            self._trial_record(study_name, t)
            for t in self.optuna_storage.get_all_trials(
                study_id, deepcopy=False, states=optuna_states
            )
        ]
        return [r for r in records if r.state in wanted] if wanted else records

    @storage_errors
    def trial(self, trial_id: int) -> TrialRecord:
        try:
            t = self.optuna_storage.get_trial(trial_id)
        except KeyError:
            raise NotFound(f"trial {trial_id} not found") from None
        return self._trial_record(str(t.user_attrs.get(STUDY, "")), t)

    @storage_errors
    def study_of(self, trial_id: int) -> str:
        """The name of the trial's study (trials never move: remembered once read)."""
        found = self._trial_study.get(trial_id)
        if found is None:
            ua = models.TrialUserAttributeModel
            query = sqlalchemy.select(ua.value_json).where(ua.trial_id == trial_id, ua.key == STUDY)
            with self.optuna_storage.engine.connect() as conn:
                value = conn.execute(query).scalar_one_or_none()
            if value is None:
                raise NotFound(f"trial {trial_id} not found")
            found = str(json.loads(value))
            if len(self._trial_study) > 100_000:
                self._trial_study.clear()
            self._trial_study[trial_id] = found
        return found

    @storage_errors
    def request(self, trial_id: int, request_id: str) -> dict[str, Any] | None:
        """What was recorded for this idempotency key of the trial, if anything."""
        ua = models.TrialUserAttributeModel
        query = sqlalchemy.select(ua.value_json).where(
            ua.trial_id == trial_id, ua.key == REQUEST_PREFIX + request_id
        )
        with self.optuna_storage.engine.connect() as conn:
            value = conn.execute(query).scalar_one_or_none()
        found = json.loads(value) if value is not None else None
        return dict(found) if isinstance(found, dict) else None

    @storage_errors
    def set_trial_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Write the attributes in one transaction (all or none). A finished trial is
        frozen, as in Optuna: ``UpdateFinishedTrialError``, nothing written. The trial's
        row is locked first (PostgreSQL), so a finish by another replica cannot land
        between the check and the write."""
        rdb = self.optuna_storage
        with _scoped_session(rdb.scoped_session) as session:
            models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            for key, value in attrs.items():
                rdb._set_trial_attr_without_commit(
                    session, models.TrialUserAttributeModel, trial_id, key, value
                )

    @storage_errors
    def finish_trial(
        self,
        trial_id: int,
        state: TrialState,
        values: Sequence[float] | None = None,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        """End a running trial: its attributes (metrics, reason, idempotency answer), final
        values and state in one transaction, so a crash leaves all of it or none."""
        rdb = self.optuna_storage
        with _scoped_session(rdb.scoped_session) as session:
            row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
            rdb.check_trial_is_updatable(trial_id, row.state)  # type: ignore[arg-type]
            for key, value in (attrs or {}).items():
                rdb._set_trial_attr_without_commit(
                    session, models.TrialUserAttributeModel, trial_id, key, value
                )
            for objective, v in enumerate(values or ()):
                rdb._set_trial_value_without_commit(session, row, objective, v)
            row.state = state
            row.datetime_complete = _now()

    @storage_errors
    def annotate_trial(self, trial_id: int, attrs: dict[str, Any]) -> bool:
        """Like ``set_trial_attrs``, but a trial that already finished is left as it is
        (Optuna freezes finished trials); returns whether the attributes were written."""
        try:
            self.set_trial_attrs(trial_id, attrs)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    @storage_errors
    def record_rung(self, trial_id: int, step: int, metrics: dict[str, float]) -> None:
        self.optuna_storage.set_trial_user_attr(
            trial_id, f"{RUNG_PREFIX}{step}", {"metrics": metrics, "time": _now().timestamp()}
        )
