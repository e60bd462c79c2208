"""The contract with Optuna's private storage internals (server/optuna_rdb.py).

Every private name the server uses still exists with the shape it is used with; a change
is reported naming it, and stops the server before it writes anything. Each function
that reads or writes Optuna's tables directly agrees with what Optuna's public storage
API reads back, on SQLite and PostgreSQL. And what a study stores (its attribute keys) is
the format a database written by an earlier server has.
"""

from __future__ import annotations

import ast
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import TrialState

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.spec import StudySpec
from stagetune.server import optuna_rdb as rdb
from stagetune.server.app import StagetuneServer
from tests.conftest import REPO, objective_metrics


@pytest.fixture
def storage(storage_url: str) -> Iterator[RDBStorage]:
    opened = rdb.open_storage(storage_url)
    yield opened
    opened.engine.dispose()


@pytest.fixture
def study(storage: RDBStorage) -> int:
    directions = [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
    return storage.create_new_study(directions, "s")


DISTS = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "r": IntDistribution(4, 64, step=4),
    "target": CategoricalDistribution(["q", "qv", "all"]),
}
PARAMS = {"lr": 3e-4, "r": 16, "target": "qv"}


def _insert(storage: RDBStorage, study: int, **user_attrs: object) -> int:
    started = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    trial, _ = rdb.insert_running_trial(
        storage, study, PARAMS, DISTS, user_attrs, {"gen": 3}, started
    )
    return trial


# ------------------------------------------------------------------ the names relied on


def test_every_private_optuna_name_the_server_uses_still_holds(storage: RDBStorage) -> None:
    problems = rdb.internals_problems(storage)
    assert not problems, "Optuna changed internals the server relies on:\n" + "\n".join(problems)


def test_a_changed_internal_is_named_and_stops_the_server_before_it_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    def renamed(self: object, trial_id: int) -> None:
        """As if a release dropped the state argument."""

    monkeypatch.setattr(RDBStorage, "check_trial_is_updatable", renamed)
    monkeypatch.delattr(models.TrialValueModel, "value_to_stored_repr")
    with pytest.raises(RuntimeError) as err:
        rdb.open_storage(f"sqlite:///{tmp_path}/x.db")
    message = str(err.value)
    assert "RDBStorage.check_trial_is_updatable(self, trial_id, trial_state)" in message
    assert "models.TrialValueModel.value_to_stored_repr(value) is gone" in message
    assert f"optuna {optuna.__version__}" in message
    assert "stored_repr_to_value" not in message  # only what changed is named


def test_a_lost_column_is_named(monkeypatch: pytest.MonkeyPatch, storage: RDBStorage) -> None:
    class ValueModelWithoutValue:
        """``TrialValueModel`` as a release that dropped its ``value`` column would have it."""

        __table__ = SimpleNamespace(columns={"trial_id": 0, "objective": 0, "value_type": 0})

    monkeypatch.setattr(models, "TrialValueModel", ValueModelWithoutValue)
    problems = rdb.internals_problems(storage)
    lost = "models.TrialValueModel(trial_id, objective, value, value_type) lost value;"
    assert any(lost in p for p in problems), problems
    assert any(
        "TrialValueModel.stored_repr_to_value(value, float_type) is gone" in p for p in problems
    )


# ------------------------------------------------------------------ writes read back by Optuna


def test_insert_running_trial_reads_back_as_optuna_would_have_written_it(
    storage: RDBStorage, study: int
) -> None:
    first = _insert(storage, study, st_study="s", st_attempt=1)
    second, number = rdb.insert_running_trial(storage, study, {}, {}, {}, {}, datetime.now(UTC))
    t = storage.get_trial(first)
    assert (t.state, t.number, t.params, t.distributions) == (
        TrialState.RUNNING,
        0,
        PARAMS,
        DISTS,
    )
    assert t.user_attrs == {"st_study": "s", "st_attempt": 1}
    assert t.system_attrs == {"gen": 3}
    assert t.datetime_start is not None
    assert t.datetime_start.astimezone(UTC) == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert number == storage.get_trial(second).number == 1


def test_set_trial_attrs_writes_all_and_a_finished_trial_refuses_all(
    storage: RDBStorage, study: int
) -> None:
    trial = _insert(storage, study, st_worker="w1")
    rdb.set_trial_attrs(storage, trial, {"st_worker": "w2", "st_lease": 12.5, "st_x": [1, 2]})
    assert storage.get_trial(trial).user_attrs == {
        "st_worker": "w2",
        "st_lease": 12.5,
        "st_x": [1, 2],
    }
    # With a rung's intermediate value, in the same transaction; a step written again is
    # overwritten, as Optuna's own setter does.
    rdb.set_trial_attrs(storage, trial, {"st_rung_2": {"m": 1}}, intermediate=(2, 0.75))
    rdb.set_trial_attrs(storage, trial, {}, intermediate=(4, math.inf))
    rdb.set_trial_attrs(storage, trial, {"st_lease": 13.0}, intermediate=(2, 0.5))
    t = storage.get_trial(trial)
    assert t.intermediate_values == {2: 0.5, 4: math.inf}
    assert t.user_attrs["st_rung_2"] == {"m": 1} and t.user_attrs["st_lease"] == 13.0
    storage.set_trial_state_values(trial, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        rdb.set_trial_attrs(storage, trial, {"st_y": 1}, intermediate=(8, 1.0))
    assert "st_y" not in storage.get_trial(trial).user_attrs
    assert 8 not in storage.get_trial(trial).intermediate_values
    with pytest.raises(KeyError):
        rdb.set_trial_attrs(storage, trial + 1000, {"st_y": 1})


def test_finish_trial_writes_state_values_and_attributes_at_once(
    storage: RDBStorage, study: int
) -> None:
    trial = _insert(storage, study)
    done = datetime(2025, 1, 2, 4, 0, 0, tzinfo=UTC)
    rdb.finish_trial(storage, trial, TrialState.COMPLETE, [-0.5, 1e18], {"st_m": {"a": 1}}, done)
    t = storage.get_trial(trial)
    assert (t.state, t.values, t.user_attrs) == (
        TrialState.COMPLETE,
        [-0.5, 1e18],
        {"st_m": {"a": 1}},
    )
    assert t.datetime_complete is not None and t.datetime_complete.astimezone(UTC) == done
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        rdb.finish_trial(storage, trial, TrialState.FAIL, [], {"st_r": "again"}, done)
    assert storage.get_trial(trial).state == TrialState.COMPLETE
    stopped = _insert(storage, study)
    rdb.finish_trial(storage, stopped, TrialState.PRUNED, [], {"st_reason": "r"}, done)
    assert storage.get_trial(stopped).values is None


# ------------------------------------------------------------------ reads agree with Optuna


def test_each_read_agrees_with_optunas_public_reads(storage: RDBStorage, study: int) -> None:
    storage.set_study_user_attr(study, "st_spec", "{}")
    storage.set_study_user_attr(study, "st_reference", [1.0, 2.0])
    a = _insert(storage, study, st_attempt=1, st_worker="w1", st_rung_8={"metrics": {"x": 1}})
    b = _insert(storage, study, st_attempt=2, st_worker="w2", st_infeasible="oom")
    c = _insert(storage, study, st_attempt=1, st_worker="w1")
    done = datetime.now(UTC)
    rdb.finish_trial(storage, b, TrialState.COMPLETE, [1.0, math.inf], {}, done)
    rdb.finish_trial(storage, c, TrialState.COMPLETE, [3.0, 4.0], {}, done)
    waiting = storage.create_new_trial(study, optuna.trial.create_trial(state=TrialState.WAITING))
    trials = storage.get_all_trials(study)

    assert rdb.study_attrs(storage, study, ["st_spec", "st_reference", "nope"]) == {
        k: v for k, v in storage.get_study_user_attrs(study).items()
    }
    by_state: dict[TrialState, int] = {}
    for t in trials:
        by_state[t.state] = by_state.get(t.state, 0) + 1
    assert rdb.trial_counts(storage, study) == by_state
    assert rdb.count_in_state(storage, study, TrialState.COMPLETE) == 2
    assert rdb.count_trials_with_attr(storage, study, "st_attempt", other_than=1) == 1
    assert rdb.running_trial_with_attr(storage, study, "st_worker", "w1") == a
    assert rdb.running_trial_with_attr(storage, study, "st_worker", "w2") is None  # finished
    assert rdb.trials_with_attr(storage, study, "st_infeasible") == {b}
    assert sorted(rdb.trial_attrs_in_study(storage, study, ["st_rung_8", "st_infeasible"])) == [
        (a, "st_rung_8", {"metrics": {"x": 1}}),
        (b, "st_infeasible", "oom"),
    ]
    keys = ["st_rung_8", "st_infeasible"]
    assert rdb.count_trial_attrs(storage, study, keys) == 2
    rows = sorted(rdb.trial_attrs_after(storage, study, keys, 0))
    assert [r[1:] for r in rows] == [
        (a, "st_rung_8", {"metrics": {"x": 1}}),
        (b, "st_infeasible", "oom"),
    ]
    assert rdb.trial_attrs_after(storage, study, keys, rows[-1][0]) == []  # nothing newer
    assert [r[1:] for r in rdb.trial_attrs_after(storage, study, keys, rows[0][0])] == [
        (b, "st_infeasible", "oom")
    ]
    assert rdb.complete_values(storage, study) == {
        t._trial_id: tuple(t.values) for t in trials if t.state == TrialState.COMPLETE
    }
    assert rdb.complete_values(storage, study)[b] == (1.0, math.inf)
    assert rdb.trial_attr(storage, a, "st_worker") == storage.get_trial(a).user_attrs["st_worker"]
    assert rdb.trial_attr(storage, waiting, "st_worker") is None


def test_get_trial_is_optunas_get_trial_in_every_state(storage: RDBStorage, study: int) -> None:
    running = _insert(storage, study, st_attempt=1, st_worker="w1", st_rung_2={"m": [1, 2]})
    storage.set_trial_intermediate_value(running, 2, 0.25)
    storage.set_trial_intermediate_value(running, 4, -math.inf)
    complete = _insert(storage, study, st_attempt=1)
    done = datetime(2025, 1, 2, 4, 0, 0, tzinfo=UTC)
    rdb.finish_trial(storage, complete, TrialState.COMPLETE, [1.5, math.inf], {"st_m": 1}, done)
    stopped = _insert(storage, study)
    rdb.finish_trial(storage, stopped, TrialState.PRUNED, [], {"st_reason": "r"}, done)
    waiting = storage.create_new_trial(study, optuna.trial.create_trial(state=TrialState.WAITING))
    enqueued = optuna.trial.create_trial(
        state=TrialState.WAITING, params={"r": 8}, distributions={"r": DISTS["r"]}
    )
    queued = storage.create_new_trial(study, enqueued)
    for trial in (running, complete, stopped, waiting, queued):
        ours, optunas = rdb.get_trial(storage, trial), storage.get_trial(trial)
        assert ours == optunas, (ours, optunas)
        assert list(ours.params) == list(optunas.params)  # in the order they were written
    with pytest.raises(KeyError):
        rdb.get_trial(storage, queued + 1000)


def test_the_storage_indexes_trial_attributes_by_key_once(storage_url: str) -> None:
    """Every worker call looks trial attributes up by key across a study; Optuna's schema
    indexes them by trial only. Opening the storage adds the index, and opening it again
    (a restart, a second replica) finds it there."""
    for _ in range(2):
        opened = rdb.open_storage(storage_url)
        indexes = sqlalchemy.inspect(opened.engine).get_indexes("trial_user_attributes")
        opened.engine.dispose()
        ours = [i for i in indexes if i["name"] == "ix_stagetune_trial_attr_key"]
        assert [i["column_names"] for i in ours] == [["key", "trial_user_attribute_id"]]


def test_ids_of_optuna_objects(storage: RDBStorage, study: int) -> None:
    (frozen,) = storage.get_all_studies()
    assert rdb.study_id(frozen) == study == storage.get_study_id_from_name("s")
    loaded = optuna.load_study(study_name="s", storage=storage)
    assert rdb.study_id(loaded) == study
    assert rdb.storage_of(loaded).get_study_id_from_name("s") == study  # (Optuna caches it)
    trial = loaded.ask()
    assert rdb.trial_id(trial) == rdb.trial_id(storage.get_all_trials(study)[-1])


# ------------------------------------------------------------------ the stored format


def test_what_a_study_stores_keeps_the_keys_of_earlier_servers(
    server: StagetuneServer, lora_spec: StudySpec
) -> None:
    """A database written by an earlier server is read with these keys: renaming one
    would silently lose that data."""
    with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
        sc.create_study(lora_spec)
        done = wc.acquire("w1").trial.trial_id
        step = lora_spec.fidelity.rungs()[0]
        wc.report_progress(done, "w1", step, {"eval_loss": 2.0}, request_id="p")
        wc.complete(done, "w1", objective_metrics(2.0, 3.0, 500.0), request_id="c")
        failed = wc.acquire("w2").trial.trial_id
        wc.fail(failed, "w2", "out_of_memory", "cuda oom", request_id="f")
    storage = server.store.optuna_storage
    (frozen,) = storage.get_all_studies()
    assert set(frozen.user_attrs) >= {"st_spec", "st_state", "st_created", "st_reference"}
    assert set(frozen.user_attrs) <= {
        "st_spec",
        "st_state",
        "st_created",
        "st_team",
        "st_reference",
        "st_hypervolume",
        "st_mlflow_experiment_id",
        "st_mlflow_run_id",
    }
    assert json.loads(frozen.user_attrs["st_spec"])["name"] == lora_spec.name
    complete = storage.get_trial(done).user_attrs
    rung = f"st_rung_{lora_spec.fidelity.rungs()[0]}"
    assert set(complete) == {
        "st_study",
        "st_attempt",
        "st_worker",
        "st_lease",
        rung,
        "st_req_p",
        "st_req_c",
        "st_metrics",
    }
    assert complete[rung]["metrics"] == {"eval_loss": 2.0} and "time" in complete[rung]
    assert complete["st_req_c"]["answer"] == {}
    assert set(storage.get_trial(failed).user_attrs) == {
        "st_study",
        "st_attempt",
        "st_worker",
        "st_lease",
        "st_reason",
        "st_infeasible",
        "st_req_f",
    }


def test_advisory_lock_is_held_until_the_block_ends(postgres_url: str) -> None:
    storage = rdb.open_storage(postgres_url)
    other = sqlalchemy.create_engine(postgres_url)
    try:

        def free(key: int) -> bool:
            with other.connect() as conn:
                try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:k)")
                got = bool(conn.execute(try_lock, {"k": key}).scalar())
                if got:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                return got

        with rdb.advisory_lock(storage, -42):
            assert not free(-42)  # another connection (another replica) waits
            assert free(7)  # other keys are not held
        assert free(-42)
    finally:
        other.dispose()
        storage.engine.dispose()


def test_no_other_server_module_reaches_optunas_internals() -> None:
    """optuna_rdb is the only module that imports a private Optuna module or touches a
    private name of an Optuna object (its own ``self._x`` is any class's business)."""
    private = {
        name.rsplit(".", 1)[-1].split("(")[0] for name in (i.name for i in rdb.INTERNALS)
    } | {"_create_scoped_session"}
    found = []
    for path in sorted((REPO / "server" / "stagetune" / "server").glob("*.py")):
        if path.name == "optuna_rdb.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for m in modules:
                    if m.startswith("optuna") and any(p.startswith("_") for p in m.split(".")):
                        found.append(f"{path.name}:{node.lineno} imports {m}")
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            ):
                found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    assert not found, found


def test_rung_reads_see_what_another_replica_wrote_even_out_of_row_order(
    storage_url: str, lora_spec: StudySpec
) -> None:
    """MO-ASHA's rung reads are incremental (rows newer than the last read): a report or an
    infeasible mark from another replica is seen, and so is a row committed with a lower
    row id than one already read (two writers' transactions ending out of order)."""
    from stagetune.server import attributes as at
    from stagetune.server.records import RungReport, TrialLease
    from stagetune.server.storage import StudyStore

    here, there = StudyStore(storage_url), StudyStore(storage_url)

    def rivals(*names: str, without: int = -1) -> list[tuple[int, list[float]]]:
        got, values = here.rung_rivals(lora_spec.name, 8, names or ("eval_loss",), without)
        return list(zip(got, values.tolist(), strict=True))

    try:
        here.create_study(lora_spec)
        params = {"learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
        lease = TrialLease("w", time.time() + 600)
        ids = [here.create_running_trial(lora_spec, params, lease).trial_id for _ in range(4)]
        ua = models.TrialUserAttributeModel.__table__
        # A row id that a slow transaction took early and committed late: the row stands
        # in for it until then, below every rung row written after it.
        rdb.set_trial_attrs(there.optuna_storage, ids[3], {"st_placeholder": 1})
        with there.optuna_storage.engine.connect() as conn:
            late_id = conn.execute(
                sqlalchemy.select(ua.c.trial_user_attribute_id).where(ua.c.key == "st_placeholder")
            ).scalar_one()
        here.record_report(ids[0], lease.expires, RungReport(8, {"eval_loss": 1.0}), None)
        assert rivals() == [(ids[0], [1.0])]
        assert rivals(without=ids[0]) == []  # a report is not its own rival
        there.record_report(
            ids[1], lease.expires, RungReport(8, {"eval_loss": 2.0, "peak_memory_mb": 9.0}), None
        )
        assert rivals("peak_memory_mb", "eval_loss") == [(ids[1], [9.0, 2.0])]  # carries both
        rdb.set_trial_attrs(there.optuna_storage, ids[0], {at.INFEASIBLE: "oom"})
        assert rivals() == [(ids[1], [2.0])]
        value = json.dumps(at.rung_value({"eval_loss": 3.0}, datetime.now(UTC)))
        with there.optuna_storage.engine.begin() as conn:
            conn.execute(ua.delete().where(ua.c.trial_user_attribute_id == late_id))
            conn.execute(
                ua.insert().values(
                    trial_user_attribute_id=late_id,
                    trial_id=ids[2],
                    key=at.rung_key(8),
                    value_json=value,
                )
            )
        assert rivals() == [(ids[1], [2.0]), (ids[2], [3.0])]  # in trial id order
        assert rivals("peak_memory_mb", "eval_loss") == [(ids[1], [9.0, 2.0])]
    finally:
        for store in (here, there):
            store.optuna_storage.engine.dispose()
