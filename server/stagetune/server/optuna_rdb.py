"""Every use of Optuna's private storage internals, in one module.

The server reads and writes Optuna's RDB tables itself where the public storage API costs
a query per attribute or has no such query: trial counts by state in one aggregate, a
trial inserted with its params and attributes in three bulk statements, a trial's
attributes, values and state written in one transaction, attribute lookups by key across
a study. Its calls go through plain SQLAlchemy statements, built once with bound
parameters, not Optuna's ORM sessions: at thousands of trials the ORM's per-object work
was most of a worker call's cost. That needs names Optuna keeps private: the tables and
columns of the models of ``optuna.storages._rdb.models`` and their stored-value
converters, ``RDBStorage.check_trial_is_updatable`` and ``RDBStorage.engine``, and the
ids ``Study._study_id`` and ``FrozenTrial._trial_id``. No other module of the server uses
any of them.

``INTERNALS`` names each with what this module relies on (a call's shape, a model's
columns, an attribute); ``internals_problems()`` checks them against the installed Optuna.
``tests/test_optuna_rdb.py`` runs it and round-trips every function here against
Optuna's public reads, and ``open_storage`` refuses to start on a mismatch: an Optuna
release that changes one fails loudly, naming it, and never writes a malformed row.

Everything here speaks Optuna's terms (study and trial ids, ``TrialState``, attribute
values as JSON); the store (server/storage.py, server/trial_store.py) maps them to the
service's records. The module is over the ~400-line guideline on purpose: the inventory of
what is relied on sits beside the code that relies on it, so a change to a use shows the
check that must change with it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
import sqlalchemy.orm
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb import storage as rdb_storage
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "INTERNALS",
    "Internal",
    "internals_problems",
    "open_storage",
    "advisory_lock",
    "study_id",
    "trial_id",
    "storage_of",
    "study_attrs",
    "trial_counts",
    "trial_counts_by_study",
    "count_trials_with_attr",
    "count_in_state",
    "running_trial_with_attr",
    "trial_attrs_in_study",
    "trial_attrs_after",
    "count_trial_attrs",
    "trials_with_attr",
    "complete_values",
    "trial_attr",
    "get_trial",
    "insert_running_trial",
    "set_trial_attrs",
    "finish_trial",
]

# ------------------------------------------------------------------ what is relied on


@dataclass(frozen=True)
class Internal:
    """One private Optuna name this module uses, and a check that it still holds:
    ``check()`` returns None, or what changed."""

    name: str
    check: Callable[[RDBStorage], str | None]  # given an open storage


_ROOTS: dict[str, Any] = {"models": models, "storage": rdb_storage}


def _resolve(path: str) -> Any:
    root, *rest = path.split(".")
    found = _ROOTS[root]
    for name in rest:
        found = getattr(found, name)
    return found


def _call(path: str, *args: str, **kwargs: str) -> Internal:
    """``path`` is called here with these arguments (``args`` by position, ``kwargs`` by
    name; an instance method's first is ``self``)."""
    shown = ", ".join([*args, *(f"{k}=" for k in kwargs)])

    def check(_: RDBStorage) -> str | None:
        try:
            fn = _resolve(path)
        except AttributeError as e:
            return f"is gone ({e})"
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as e:
            return f"can no longer be called so ({e}); it is now {inspect.signature(fn)}"
        return None

    return Internal(f"optuna.storages._rdb.{path}({shown})", check)


def _columns(model: str, *columns: str, properties: tuple[str, ...] = ()) -> Internal:
    """``models.<model>`` is read and written through these columns (and properties)."""

    def check(_: RDBStorage) -> str | None:
        try:
            cls = _resolve(f"models.{model}")
            have = set(cls.__table__.columns.keys())
        except AttributeError as e:
            return f"is gone ({e})"
        missing = sorted(set(columns) - have) + [
            p for p in properties if not isinstance(getattr(cls, p, None), property)
        ]
        return f"lost {', '.join(missing)}; has {sorted(have)}" if missing else None

    return Internal(
        f"optuna.storages._rdb.models.{model}({', '.join(columns + properties)})", check
    )


def _attribute(owner: str, name: str, make: Callable[[RDBStorage], object]) -> Internal:
    """Instances of ``owner`` (as ``make(storage)`` gets one) have the attribute ``name``."""

    def check(storage: RDBStorage) -> str | None:
        try:
            with _quiet():
                obj = make(storage)
        except Exception as e:  # a changed constructor is a change too
            return f"cannot be checked ({type(e).__name__}: {e})"
        return None if hasattr(obj, name) else "is gone"

    return Internal(f"{owner}.{name}", check)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without Optuna's log line for each study made in memory to be checked."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _a_study(_: object = None) -> optuna.Study:
    return optuna.create_study(storage=optuna.storages.InMemoryStorage())


def _a_frozen_study(_: object) -> FrozenStudy:
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage)
    return storage.get_all_studies()[0]


INTERNALS: tuple[Internal, ...] = (
    _call("models.TrialValueModel.stored_repr_to_value", "value", "float_type"),
    _call("models.TrialValueModel.value_to_stored_repr", "value"),
    _call(
        "models.TrialIntermediateValueModel.stored_repr_to_intermediate_value",
        *("value", "float_type"),
    ),
    _call("models.TrialIntermediateValueModel.intermediate_value_to_stored_repr", "value"),
    _call("storage.RDBStorage.check_trial_is_updatable", "self", "trial_id", "trial_state"),
    _columns(
        "TrialModel",
        *("trial_id", "study_id", "number", "state", "datetime_start", "datetime_complete"),
        properties=("datetime_start", "datetime_complete"),
    ),
    _columns(
        "TrialParamModel",
        *("param_id", "trial_id", "param_name", "param_value", "distribution_json"),
    ),
    _columns(
        "TrialIntermediateValueModel",
        *("trial_id", "step", "intermediate_value", "intermediate_value_type"),
    ),
    _columns("TrialValueModel", "trial_id", "objective", "value", "value_type"),
    _columns("StudyUserAttributeModel", "study_id", "key", "value_json"),
    _columns("TrialUserAttributeModel", "trial_user_attribute_id", "trial_id", "key", "value_json"),
    _columns("TrialSystemAttributeModel", "trial_id", "key", "value_json"),
    _attribute("RDBStorage", "engine", lambda storage: storage),
    _attribute("Study", "_study_id", _a_study),
    _attribute("Study", "_storage", _a_study),
    _attribute("Trial", "_trial_id", lambda _: _a_study().ask()),
    _attribute("FrozenStudy", "_study_id", _a_frozen_study),
    _attribute("FrozenTrial", "_trial_id", lambda _: optuna.trial.create_trial(value=0.0)),
)


def internals_problems(storage: RDBStorage) -> list[str]:
    """One line per entry of ``INTERNALS`` that the installed Optuna breaks (none: []);
    ``storage``: an open one, whose attributes are checked."""
    problems = []
    for internal in INTERNALS:
        problem = internal.check(storage)
        if problem is not None:
            problems.append(f"optuna {optuna.__version__}: {internal.name} {problem}")
    return problems


# ------------------------------------------------------------------ opening


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Wait for a writer rather than failing with "database is locked".
        return {"connect_args": {"timeout": 60, "check_same_thread": False}}
    return {"pool_pre_ping": True, "pool_size": 8, "max_overflow": 16}


def open_storage(url: str) -> RDBStorage:
    """Optuna's RDB storage at ``url`` (Optuna creates its tables if missing). Raises
    SQLAlchemy's errors when the database cannot be reached or the URL is not one, and
    RuntimeError naming every private name the installed Optuna changed, before this
    module reads or writes anything through them."""
    storage = RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    problems = internals_problems(storage)
    if problems:
        storage.engine.dispose()
        raise RuntimeError(
            "the installed Optuna changed internals stagetune writes through; install "
            "optuna 5.x as pinned in stagetune's requirements: " + "; ".join(problems)
        )
    if url.startswith("sqlite"):
        with storage.engine.connect() as conn:
            # WAL lets readers proceed while one writer commits; it persists in the file.
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    _index_attr_keys(storage)
    return storage


ATTR_KEY_INDEX = "ix_stagetune_trial_attr_key"


def _index_attr_keys(storage: RDBStorage) -> None:
    """Index trial attributes by key, which Optuna's schema lacks (it has one by trial and
    key): every worker call looks attributes up by key across a study (the rung's
    reports, the worker's held trial, retries), which without it reads every attribute
    row of every trial. Built once, at the first start on a database; on PostgreSQL it
    blocks writes to that table while it builds (seconds for a million rows)."""
    ua = models.TrialUserAttributeModel.__table__
    ddl = (
        f"CREATE INDEX IF NOT EXISTS {ATTR_KEY_INDEX} "
        f"ON {ua.name} ({ua.c.key.name}, {ua.c.trial_user_attribute_id.name})"
    )
    try:
        with storage.engine.begin() as conn:
            conn.exec_driver_sql(ddl)
    except sqlalchemy.exc.DBAPIError:
        # Two replicas starting at once: PostgreSQL can refuse the second, same index.
        names = [i["name"] for i in sqlalchemy.inspect(storage.engine).get_indexes(ua.name)]
        if ATTR_KEY_INDEX not in names:
            raise


@contextlib.contextmanager
def advisory_lock(storage: RDBStorage, key: int) -> Iterator[None]:
    """Hold PostgreSQL's session advisory lock ``key`` on one of the storage's connections."""
    with storage.engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


# ------------------------------------------------------------------ ids of Optuna objects


def study_id(study: optuna.Study | FrozenStudy) -> int:
    return int(study._study_id)


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return int(trial._trial_id)


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


# ------------------------------------------------------------------ reads
#
# The queries a worker's call runs are built once (``functools.cache``, on first use, so
# that a changed Optuna is reported by ``internals_problems`` first) with bound
# parameters: building a SQLAlchemy statement costs more than SQLite running it (0.5 ms
# against 0.1 ms for a trial read).

_b = sqlalchemy.bindparam


@functools.cache
def _study_attrs_query() -> Any:
    sua = models.StudyUserAttributeModel
    return sqlalchemy.select(sua.key, sua.value_json).where(
        sua.study_id == _b("study"), sua.key.in_(_b("keys", expanding=True))
    )


def study_attrs(storage: RDBStorage, study: int, keys: Collection[str]) -> dict[str, Any]:
    """The study's user attributes among ``keys`` (missing ones left out), one query."""
    with storage.engine.connect() as conn:
        rows = conn.execute(_study_attrs_query(), {"study": study, "keys": list(keys)})
        return {key: json.loads(value) for key, value in rows}


@functools.cache
def _trial_counts_query() -> Any:
    t = models.TrialModel
    return (
        sqlalchemy.select(t.state, sqlalchemy.func.count())
        .where(t.study_id == _b("study"))
        .group_by(t.state)
    )


def trial_counts(storage: RDBStorage, study: int) -> dict[TrialState, int]:
    """How many trials the study has in each state (states with none left out)."""
    with storage.engine.connect() as conn:
        rows = conn.execute(_trial_counts_query(), {"study": study})
        return {state: int(n) for state, n in rows}


def trial_counts_by_study(
    storage: RDBStorage, marked_by: str, key: str, *, other_than: Any
) -> list[tuple[int, TrialState, bool, bool, int]]:
    """Trial counts of every study in one query, as rows (study id, state, whether the
    trials have the user attribute ``marked_by``, whether their attribute ``key`` has a
    value other than ``other_than``, count)."""
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    marked, differs = sqlalchemy.orm.aliased(ua), sqlalchemy.orm.aliased(ua)
    is_marked = marked.trial_id.is_not(None)
    is_different = differs.trial_id.is_not(None)
    query = (
        sqlalchemy.select(t.study_id, t.state, is_marked, is_different, sqlalchemy.func.count())
        .select_from(t)
        .outerjoin(marked, (marked.trial_id == t.trial_id) & (marked.key == marked_by))
        .outerjoin(
            differs,
            (differs.trial_id == t.trial_id)
            & (differs.key == key)
            & (differs.value_json != json.dumps(other_than)),
        )
        .group_by(t.study_id, t.state, is_marked, is_different)
    )
    with storage.engine.connect() as conn:
        return [
            (int(s), state, bool(m), bool(d), int(n)) for s, state, m, d, n in conn.execute(query)
        ]


@functools.cache
def _count_trials_with_attr_query() -> Any:
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    return (
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(ua)
        .join(t, t.trial_id == ua.trial_id)
        .where(t.study_id == _b("study"), ua.key == _b("key"), ua.value_json != _b("value"))
    )


def count_trials_with_attr(storage: RDBStorage, study: int, key: str, *, other_than: Any) -> int:
    """How many of the study's trials have the user attribute ``key`` with a value other
    than ``other_than``."""
    bound = {"study": study, "key": key, "value": json.dumps(other_than)}
    with storage.engine.connect() as conn:
        return int(conn.execute(_count_trials_with_attr_query(), bound).scalar_one())


def count_in_state(storage: RDBStorage, study: int, state: TrialState) -> int:
    t = models.TrialModel
    query = (
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(t)
        .where(t.study_id == study, t.state == state)
    )
    with storage.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


@functools.cache
def _running_trial_with_attr_query() -> Any:
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    return (
        sqlalchemy.select(t.trial_id)
        .join(ua, t.trial_id == ua.trial_id)
        .where(
            t.study_id == _b("study"),
            t.state == TrialState.RUNNING,
            ua.key == _b("key"),
            ua.value_json == _b("value"),
        )
        .limit(1)
    )


def running_trial_with_attr(storage: RDBStorage, study: int, key: str, value: Any) -> int | None:
    """The id of one RUNNING trial of the study whose user attribute ``key`` is ``value``."""
    bound = {"study": study, "key": key, "value": json.dumps(value)}
    with storage.engine.connect() as conn:
        found = conn.execute(_running_trial_with_attr_query(), bound).scalar_one_or_none()
    return None if found is None else int(found)


def trial_attrs_in_study(
    storage: RDBStorage, study: int, keys: Collection[str]
) -> list[tuple[int, str, Any]]:
    """(trial id, key, value) of every user attribute among ``keys`` of the study's trials."""
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    query = (
        sqlalchemy.select(ua.trial_id, ua.key, ua.value_json)
        .join(t, t.trial_id == ua.trial_id)
        .where(t.study_id == study, ua.key.in_(list(keys)))
    )
    with storage.engine.connect() as conn:
        return [(int(i), str(k), json.loads(v)) for i, k, v in conn.execute(query)]


def trial_attrs_after(
    storage: RDBStorage, study: int, keys: Collection[str], after: int
) -> list[tuple[int, int, str, Any]]:
    """(row id, trial id, key, value) of the study's user attributes among ``keys`` whose
    row id is above ``after``: what was added since a read that ended at ``after``."""
    bound = {"study": study, "keys": list(keys), "after": after}
    with storage.engine.connect() as conn:
        rows = conn.execute(_trial_attrs_after_query(), bound)
        return [(int(a), int(i), str(k), json.loads(v)) for a, i, k, v in rows]


@functools.cache
def _trial_attrs_after_query() -> Any:
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    return (
        sqlalchemy.select(ua.trial_user_attribute_id, ua.trial_id, ua.key, ua.value_json)
        .join(t, t.trial_id == ua.trial_id)
        .where(
            t.study_id == _b("study"),
            ua.key.in_(_b("keys", expanding=True)),
            ua.trial_user_attribute_id > _b("after"),
        )
    )


@functools.cache
def _count_trial_attrs_query() -> Any:
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    return (
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(ua)
        .join(t, t.trial_id == ua.trial_id)
        .where(t.study_id == _b("study"), ua.key.in_(_b("keys", expanding=True)))
    )


def count_trial_attrs(storage: RDBStorage, study: int, keys: Collection[str]) -> int:
    """How many user attributes among ``keys`` the study's trials have."""
    bound = {"study": study, "keys": list(keys)}
    with storage.engine.connect() as conn:
        return int(conn.execute(_count_trial_attrs_query(), bound).scalar_one())


def trials_with_attr(storage: RDBStorage, study: int, key: str) -> set[int]:
    """Ids of the study's trials that have the user attribute ``key``."""
    t, ua = models.TrialModel, models.TrialUserAttributeModel
    query = (
        sqlalchemy.select(ua.trial_id)
        .join(t, t.trial_id == ua.trial_id)
        .where(t.study_id == study, ua.key == key)
    )
    with storage.engine.connect() as conn:
        return {int(i) for (i,) in conn.execute(query)}


def complete_values(storage: RDBStorage, study: int) -> dict[int, tuple[float, ...]]:
    """Objective values of every COMPLETE trial of the study, by trial id."""
    t, v = models.TrialModel, models.TrialValueModel
    query = (
        sqlalchemy.select(v.trial_id, v.objective, v.value, v.value_type)
        .join(t, t.trial_id == v.trial_id)
        .where(t.study_id == study, t.state == TrialState.COMPLETE)
    )
    values: dict[int, dict[int, float]] = {}
    with storage.engine.connect() as conn:
        for trial, objective, value, kind in conn.execute(query):
            stored = models.TrialValueModel.stored_repr_to_value(value, kind)
            values.setdefault(int(trial), {})[int(objective)] = stored
    return {i: tuple(vals[k] for k in sorted(vals)) for i, vals in values.items()}


def trial_attr(storage: RDBStorage, trial: int, key: str) -> Any:
    """The trial's user attribute ``key``; None when it has none."""
    with storage.engine.connect() as conn:
        value = conn.execute(_trial_attr_query(), {"trial": trial, "key": key}).scalar_one_or_none()
    return None if value is None else json.loads(value)


@functools.cache
def _trial_attr_query() -> Any:
    ua = models.TrialUserAttributeModel
    return sqlalchemy.select(ua.value_json).where(ua.trial_id == _b("trial"), ua.key == _b("key"))


def _local_naive(utc: datetime | None) -> datetime | None:
    """A stored naive-UTC time as Optuna's ``TrialModel`` properties give it: naive local."""
    return None if utc is None else utc.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def _naive_utc(t: datetime) -> datetime:
    """A time as Optuna's ``TrialModel`` setters store it: naive UTC."""
    return t.astimezone(UTC).replace(tzinfo=None)


@functools.cache
def _trial_queries() -> tuple[Any, ...]:
    """The six reads of ``get_trial``: head, params, values, user and system attributes,
    intermediate values."""
    tt = models.TrialModel.__table__.c
    p, v = models.TrialParamModel, models.TrialValueModel
    ua, sa = models.TrialUserAttributeModel, models.TrialSystemAttributeModel
    iv = models.TrialIntermediateValueModel
    trial: Any = _b("trial")
    return (
        sqlalchemy.select(tt.number, tt.state, tt.datetime_start, tt.datetime_complete).where(
            tt.trial_id == trial
        ),
        sqlalchemy.select(p.param_name, p.param_value, p.distribution_json)
        .where(p.trial_id == trial)
        .order_by(p.param_id),
        sqlalchemy.select(v.objective, v.value, v.value_type).where(v.trial_id == trial),
        sqlalchemy.select(ua.key, ua.value_json).where(ua.trial_id == trial),
        sqlalchemy.select(sa.key, sa.value_json).where(sa.trial_id == trial),
        sqlalchemy.select(iv.step, iv.intermediate_value, iv.intermediate_value_type).where(
            iv.trial_id == trial
        ),
    )


def get_trial(storage: RDBStorage, trial: int) -> FrozenTrial:
    """The trial as Optuna's ``RDBStorage.get_trial`` returns it (``KeyError`` when there is
    none), in six plain queries on one connection: Optuna's goes through the ORM, one lazy
    load per part, and cost ~2 ms of a rung report's ~12 at 2,000 trials."""
    head, params_q, values_q, user_q, system_q, steps_q = _trial_queries()
    bound = {"trial": trial}
    iv, v = models.TrialIntermediateValueModel, models.TrialValueModel
    with storage.engine.connect() as conn:
        row = conn.execute(head, bound).one_or_none()
        if row is None:
            raise KeyError(models.NOT_FOUND_MSG)
        params = conn.execute(params_q, bound).all()
        stored = conn.execute(values_q, bound).all()
        user_attrs = {key: json.loads(value) for key, value in conn.execute(user_q, bound)}
        system_attrs = {key: json.loads(value) for key, value in conn.execute(system_q, bound)}
        intermediate = {
            int(step): iv.stored_repr_to_intermediate_value(value, kind)
            for step, value, kind in conn.execute(steps_q, bound)
        }
    values: list[float] | None = None
    if stored:
        values = [0.0] * len(stored)
        for objective, value, kind in stored:
            values[objective] = v.stored_repr_to_value(value, kind)
    dists = {name: json_to_distribution(d) for name, _, d in params}
    return FrozenTrial(
        number=row.number,
        state=row.state,
        value=None,
        values=values,
        datetime_start=_local_naive(row.datetime_start),
        datetime_complete=_local_naive(row.datetime_complete),
        params={name: dists[name].to_external_repr(value) for name, value, _ in params},
        distributions=dists,
        user_attrs=user_attrs,
        system_attrs=system_attrs,
        intermediate_values=intermediate,
        trial_id=trial,
    )


# ------------------------------------------------------------------ writes


def insert_running_trial(
    storage: RDBStorage,
    study: int,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    user_attrs: Mapping[str, Any],
    system_attrs: Mapping[str, Any],
    started: datetime,
) -> tuple[int, int]:
    """Insert a RUNNING trial with its params and attributes in one transaction; returns
    (trial id, number). Optuna's ``create_new_trial`` checks each param against earlier
    trials' distributions and writes each attribute with its own lookups (25 queries for
    a LoRA trial); the caller fixed the distributions, so the rows go in as three bulk
    inserts, in plain statements built once (the ORM's way cost ~3.5 ms a trial)."""
    q = _inserts()
    with storage.engine.begin() as conn:
        # The study's row locked (PostgreSQL): trial numbers are counted, as Optuna does.
        if conn.execute(q.study_lock, {"study": study}).scalar_one_or_none() is None:
            raise KeyError(models.NOT_FOUND_MSG)
        inserted = conn.execute(q.trial, {"study_id": study, "start": _naive_utc(started)})
        new_id = int(inserted.inserted_primary_key[0])  # type: ignore[index]
        param_rows = [
            {
                "trial_id": new_id,
                "param_name": k,
                "param_value": distributions[k].to_internal_repr(v),
                "distribution_json": distribution_to_json(distributions[k]),
            }
            for k, v in params.items()
        ]
        for statement, rows in (
            (q.params, param_rows),
            (q.user_attr, _attr_rows(new_id, user_attrs)),
            (q.system_attr, _attr_rows(new_id, system_attrs)),
        ):
            if rows:
                conn.execute(statement, rows)
        number = int(conn.execute(q.past, {"study": study, "trial": new_id}).scalar_one())
        conn.execute(q.number, {"trial": new_id, "new_number": number})
    return new_id, number


@dataclass(frozen=True)
class _Inserts:
    """The statements of ``insert_running_trial``."""

    study_lock: Any
    trial: Any
    params: Any
    user_attr: Any
    system_attr: Any
    past: Any  # trials of the study before this one: its number
    number: Any


@functools.cache
def _inserts() -> _Inserts:
    st, tt = models.StudyModel.__table__.c, models.TrialModel.__table__
    return _Inserts(
        study_lock=sqlalchemy.select(st.study_id)
        .where(st.study_id == _b("study"))
        .with_for_update(),
        trial=sqlalchemy.insert(tt).values(
            study_id=_b("study_id"),
            number=None,
            state=TrialState.RUNNING,
            datetime_start=_b("start"),
        ),
        params=sqlalchemy.insert(models.TrialParamModel),
        user_attr=sqlalchemy.insert(models.TrialUserAttributeModel),
        system_attr=sqlalchemy.insert(models.TrialSystemAttributeModel),
        past=sqlalchemy.select(sqlalchemy.func.count())
        .select_from(tt)
        .where(tt.c.study_id == _b("study"), tt.c.trial_id < _b("trial")),
        number=sqlalchemy.update(tt)
        .where(tt.c.trial_id == _b("trial"))
        .values(number=_b("new_number")),
    )


@dataclass(frozen=True)
class _Writes:
    """The statements of a trial's writes, in one dialect's form."""

    lock: Any  # the trial's state, its row locked for the write (PostgreSQL)
    attr: Any  # upsert of a user attribute
    step: Any  # upsert of an intermediate value
    value: Any  # upsert of an objective value
    finish: Any  # the trial's state and end time


@functools.cache
def _writes(dialect: str) -> _Writes:
    """``_Writes`` for ``dialect``: INSERT ... ON CONFLICT DO UPDATE is SQLite's and
    PostgreSQL's (the databases the server runs on: ``database.open_database``)."""
    tt = models.TrialModel.__table__.c
    lock = sqlalchemy.select(tt.state).where(tt.trial_id == _b("trial")).with_for_update()
    dml: Any = (
        sqlalchemy.dialects.postgresql if dialect == "postgresql" else sqlalchemy.dialects.sqlite
    )

    def upsert(model: Any, *unique: Any) -> Any:
        insert = dml.insert(model)
        names = {c.key for c in unique}
        columns = [c for c in model.__table__.c if c.key not in names and not c.primary_key]
        return insert.on_conflict_do_update(
            index_elements=list(unique), set_={c.key: insert.excluded[c.key] for c in columns}
        )

    ua, iv = models.TrialUserAttributeModel, models.TrialIntermediateValueModel
    v = models.TrialValueModel
    finish = (
        sqlalchemy.update(models.TrialModel.__table__)
        .where(tt.trial_id == _b("trial"))
        .values(state=_b("new_state"), datetime_complete=_b("done"))
    )
    return _Writes(
        lock,
        upsert(ua, ua.trial_id, ua.key),
        upsert(iv, iv.trial_id, iv.step),
        upsert(v, v.trial_id, v.objective),
        finish,
    )


def _lock_updatable(conn: sqlalchemy.Connection, storage: RDBStorage, trial: int) -> None:
    """Lock the trial's row for this transaction; ``KeyError`` when there is no such
    trial, ``UpdateFinishedTrialError`` when it is finished (Optuna's rule)."""
    state = conn.execute(_writes(storage.engine.name).lock, {"trial": trial}).scalar_one_or_none()
    if state is None:
        raise KeyError(models.NOT_FOUND_MSG)
    storage.check_trial_is_updatable(trial, state)


def _attr_rows(trial: int, attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a trial's user or system attributes table, values as JSON."""
    return [{"trial_id": trial, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]


def _write_attrs(
    conn: sqlalchemy.Connection, storage: RDBStorage, trial: int, attrs: Mapping[str, Any]
) -> None:
    if attrs:
        conn.execute(_writes(storage.engine.name).attr, _attr_rows(trial, attrs))


def set_trial_attrs(
    storage: RDBStorage,
    trial: int,
    attrs: Mapping[str, Any],
    intermediate: tuple[int, float] | None = None,
) -> None:
    """Write the trial's user attributes, and the intermediate value (step, value) if
    given, in one transaction (all or none). A finished trial is frozen, as in Optuna:
    ``UpdateFinishedTrialError``, nothing written. The trial's row is locked first
    (PostgreSQL), so a finish by another server replica cannot land between the check and
    the write. Plain statements, one upsert per table: Optuna's ORM path re-reads the
    trial for each attribute (~3 ms of a rung report at 2,000 trials)."""
    iv = models.TrialIntermediateValueModel
    with storage.engine.begin() as conn:
        _lock_updatable(conn, storage, trial)
        _write_attrs(conn, storage, trial, attrs)
        if intermediate is not None:
            stored, kind = iv.intermediate_value_to_stored_repr(intermediate[1])
            row = {
                "trial_id": trial,
                "step": intermediate[0],
                "intermediate_value": stored,
                "intermediate_value_type": kind,
            }
            conn.execute(_writes(storage.engine.name).step, row)


def finish_trial(
    storage: RDBStorage,
    trial: int,
    state: TrialState,
    values: Sequence[float],
    attrs: Mapping[str, Any],
    completed: datetime,
) -> None:
    """End a running trial: user attributes, objective values and state in one
    transaction, so a crash leaves all of it or none. A finished trial:
    ``UpdateFinishedTrialError``, nothing written. Plain statements, as
    ``set_trial_attrs``: the ORM's way cost ~3.5 ms a finish at 3,000 trials."""
    v = models.TrialValueModel
    writes = _writes(storage.engine.name)
    with storage.engine.begin() as conn:
        _lock_updatable(conn, storage, trial)
        _write_attrs(conn, storage, trial, attrs)
        if values:
            rows = []
            for objective, value in enumerate(values):
                stored, kind = v.value_to_stored_repr(value)
                rows.append(
                    {"trial_id": trial, "objective": objective, "value": stored, "value_type": kind}
                )
            conn.execute(writes.value, rows)
        done = _naive_utc(completed)
        conn.execute(writes.finish, {"trial": trial, "new_state": state, "done": done})
