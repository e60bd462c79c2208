"""Tracking: the only module that imports MLflow.

A study is a parent run in the experiment ``stagetune/<stage>``; each trial is a child run
with its params, rung metrics by step, final metrics, state, worker and attempt, and tags
``pareto_front`` / ``pareto_rank`` that move with the front. The parent run carries the
spec, ``hypervolume`` logged against the number of completed trials, and the artifacts
``pareto_front.csv`` and ``pareto_front.png``, rewritten as the front moves.

All MLflow calls run on one background thread, in the order the service sends events, so
an RPC never waits on MLflow beyond a short bound (``sync_timeout``), and a tracking outage
is logged and dropped, never raised: the study store stays the source of truth.

It runs past 400 lines on purpose: the ordering thread, its bound on waiting and every
MLflow call stay together, so the one rule (no RPC waits on MLflow, no outage is raised)
is kept in one place.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from google.protobuf import json_format

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.mlflow_layout import no_telemetry
from stagetune.contract.redact import redact, redact_text
from stagetune.contract.spec import StudySpec, spec_to_proto
from stagetune.server.front_artifacts import plot_front, write_front_csv
from stagetune.server.records import TrialRecord

no_telemetry()  # before mlflow is imported (contract/mlflow_layout.py says why)

__all__ = ["Tracker", "NullTracker", "MlflowTracker", "local_artifact_root"]

#: Reads every COMPLETE trial with its rank for a front update; None: the update is stale.
LoadTrials = Callable[[], "list[TrialRecord] | None"]

#: How a database says a row with that key was just written by someone else (PostgreSQL,
#: SQLite, MySQL), as MLflow passes it on.
_DUPLICATE_KEY = ("UniqueViolation", "UNIQUE constraint failed", "Duplicate entry")

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_RUN_STATUS = {
    "complete": "FINISHED",
    "stopped": "KILLED",
    "failed": "FAILED",
    "infeasible": "KILLED",
}


class Tracker(Protocol):
    """What the study service reports to the review surface. Never raises."""

    def study_created(
        self, spec: StudySpec, on_late: Callable[[str, str], None] | None = None
    ) -> tuple[str, str]:
        """Experiment id and parent run id ("" when unknown). When the tracking store is
        too slow to answer in time, ``on_late`` gets them once the run is made."""
        ...

    def trial_started(
        self, spec: StudySpec, trial: TrialRecord, on_run_id: Callable[[str], None]
    ) -> None:
        """Open the trial's child run without waiting; ``on_run_id`` gets its id."""
        ...

    def trial_progress(self, trial: TrialRecord, step: int, metrics: dict[str, float]) -> None: ...

    def trial_finished(self, spec: StudySpec, trial: TrialRecord, final_step: int) -> None: ...

    def front_changed(
        self,
        spec: StudySpec,
        load_trials: LoadTrials,
        hypervolume: float,
        n_complete: int,
    ) -> None:
        """``load_trials()``: every COMPLETE trial with its current ``pareto_rank``; called
        only if the tracker needs them (it reads the trial table); None when trials
        completed since this update, whose own update writes the front."""
        ...

    def flush(self, timeout: float = 30.0) -> None: ...

    def close(self, timeout: float = 30.0) -> None: ...

    def backlog(self) -> int:
        """Events not yet written to MLflow (queued or under way)."""
        ...

    @property
    def errors(self) -> int:
        """MLflow calls that failed (each logged and dropped) since the tracker started."""
        ...


class NullTracker:
    """Tracking switched off."""

    def study_created(
        self, spec: StudySpec, on_late: Callable[[str, str], None] | None = None
    ) -> tuple[str, str]:
        return "", ""

    def trial_started(
        self, spec: StudySpec, trial: TrialRecord, on_run_id: Callable[[str], None]
    ) -> None:
        pass

    def trial_progress(self, trial: TrialRecord, step: int, metrics: dict[str, float]) -> None:
        pass

    def trial_finished(self, spec: StudySpec, trial: TrialRecord, final_step: int) -> None:
        pass

    def front_changed(
        self,
        spec: StudySpec,
        load_trials: LoadTrials,
        hypervolume: float,
        n_complete: int,
    ) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> None:
        pass

    def close(self, timeout: float = 30.0) -> None:
        pass

    def backlog(self) -> int:
        return 0

    errors = 0


_SERVER_SCHEMES = ("http", "https", "databricks")


def local_artifact_root(tracking_uri: str, data_dir: Path) -> Path | None:
    """Where the server puts new experiments' artifacts, or None to let the tracking server
    decide. A tracking server (http, https) places them itself: with ``mlflow server
    --serve-artifacts`` under ``mlflow-artifacts:/``, uploaded and downloaded through the
    server, so the UI, workers and the next stage on other machines read them. A local store
    (a database or folder path) would otherwise put them in ``./mlruns`` of whatever folder
    the server started in: they go to ``data_dir/mlartifacts`` instead."""
    # ("databricks" alone is a URI too: the default Databricks profile.)
    if (urlsplit(tracking_uri).scheme or tracking_uri) in _SERVER_SCHEMES:
        return None
    return data_dir / "mlartifacts"


def _flat_params(spec: StudySpec) -> dict[str, str]:
    params = {
        "stage": spec.stage,
        "sampler": spec.sampler.kind,
        "sampler_seed": str(spec.sampler.seed),
        "max_trials": str(spec.budget.max_trials),
        "max_retries": str(spec.budget.max_retries),
        "fidelity": f"{spec.fidelity.min_steps}..{spec.fidelity.max_steps}"
        f" eta={spec.fidelity.reduction_factor:g} min_reports={spec.fidelity.reports_to_stop}"
        + (f" brackets={spec.fidelity.brackets}" if spec.fidelity.brackets > 1 else ""),
        "objectives": ", ".join(f"{o.metric}:{o.direction}" for o in spec.objectives),
    }
    for p in spec.search_space:
        fields = {k: v for k, v in vars(p).items() if k != "name"}
        params[f"space.{p.name}"] = str(fields)[:500]
    return {k: redact_text(v) for k, v in params.items()}


def _refused(tracking_uri: str, error: Exception) -> str:
    """One line: what MLflow said about the URI, and what to use instead."""
    said = " ".join(str(error).split()).split(". ")[0].strip().rstrip(".")
    return (
        f"MLflow cannot track to {redact_text(tracking_uri)!r} ({redact_text(said)[:200]}); "
        "use a database such as sqlite:///PATH/mlflow.db, an MLflow server such as "
        'http://HOST:5000, or "" to turn tracking off'
    )


class MlflowTracker:
    """Tracker writing to an MLflow tracking server or local database."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        artifact_root: Path | None = None,
        sync_timeout: float = 5.0,
        front_interval: float = 10.0,
    ) -> None:
        """``front_interval``: the least seconds between two rewrites of a study's front
        (every trial's rank tags, the CSV and the plot); the hypervolume is logged at every
        completion. A rewrite due sooner waits, and the one after it carries every change
        made meanwhile; ``flush`` and ``close`` write it at once."""
        from mlflow.tracking import MlflowClient

        for noisy in ("mlflow", "alembic"):  # schema set-up chatter on every fresh store
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        try:
            self._client = MlflowClient(tracking_uri)
        # MLflow opens the store here and raises its own errors, SQLAlchemy's or OSError
        # by store type: whichever it is, this URI cannot be tracked to.
        except Exception as e:
            raise InvalidArgument("tracking_uri", _refused(tracking_uri, e)) from None
        self._artifact_root = artifact_root
        self._sync_timeout = sync_timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")
        self._experiments: dict[str, str] = {}
        self._parents: dict[str, str] = {}
        self._children: dict[int, str] = {}
        self._tags: dict[str, tuple[str, str]] = {}
        # Front updates queued per study: only the newest rewrites tags and artifacts, so a
        # burst of completions costs one plot, not one per completion.
        self._pending_fronts: dict[str, int] = {}
        self._pending_lock = threading.Lock()
        self._front_interval = front_interval
        self._front_written: dict[str, float] = {}  # study -> monotonic time of last rewrite
        # Rewrites waiting for their interval, by study: the timer and what it will write.
        self._deferred: dict[str, tuple[threading.Timer, StudySpec, LoadTrials]] = {}
        self._backlog = 0  # events submitted and not yet done, under _pending_lock
        self.errors = 0

    # ------------------------------------------------------------ plumbing

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags another replica may be setting at the same moment: MLflow's SQL store
        writes a tag by reading, then inserting, so two writers can both insert and one
        gets a unique-key error. The tag exists then; writing again updates it."""
        for attempt in range(3):
            try:
                self._log_batch(run_id, tags=tags)
                return
            except Exception as e:
                text = str(e)
                if attempt == 2 or not any(m in text for m in _DUPLICATE_KEY):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _log_batch(
        self,
        run_id: str,
        *,
        metrics: dict[str, float] | None = None,
        step: int = 0,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """One MLflow write for many values: a trial's end is one transaction, not one per
        metric and tag (at thousands of trials the store's commits are the tracker's
        cost). Non-finite metrics are left out, as MLflow cannot store them portably."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        finite = {k: v for k, v in (metrics or {}).items() if math.isfinite(v)}
        if not (finite or params or tags):
            return
        m = [Metric(k, v, now, step) for k, v in finite.items()]
        p = [Param(k, v) for k, v in (params or {}).items()]
        t = [RunTag(k, v) for k, v in (tags or {}).items()]
        # MLflow's limits on one batch: 1000 metrics, 100 params, 100 tags.
        for i in range(0, max(len(m), 10 * len(p), 10 * len(t)), 1000):
            j = i // 10
            self._client.log_batch(
                run_id, metrics=m[i : i + 1000], params=p[j : j + 100], tags=t[j : j + 100]
            )

    def _submit(self, fn: Any, *args: Any) -> Future[Any]:
        def guarded() -> Any:
            try:
                return fn(*args)
            except Exception:
                _log.warning("MLflow tracking failed in %s", fn.__name__, exc_info=True)
                with self._pending_lock:
                    self.errors += 1
                return None
            finally:
                self._count(-1)

        self._count(+1)
        try:
            return self._pool.submit(guarded)
        except RuntimeError:  # pool shut down
            self._count(-1)
            done: Future[Any] = Future()
            done.set_result(None)
            return done

    def _count(self, change: int) -> None:
        with self._pending_lock:
            self._backlog += change

    def backlog(self) -> int:
        with self._pending_lock:
            return self._backlog

    def _wait(self, future: Future[_T], default: _T) -> _T:
        try:
            result = future.result(timeout=self._sync_timeout)
        except FutureTimeout:
            _log.warning(
                "MLflow did not answer in %.1fs; continuing without a run id", self._sync_timeout
            )
            return default
        return default if result is None else result

    def flush(self, timeout: float = 30.0) -> None:
        """Write everything sent so far: the queued events (which may leave a front
        rewrite waiting for its interval), then every waiting rewrite."""
        self._submit(lambda: None).result(timeout=timeout)
        with self._pending_lock:
            waiting = list(self._deferred)
        for name in waiting:
            self._release_front(name)
        self._submit(lambda: None).result(timeout=timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush pending events for up to ``timeout`` seconds, then drop the rest."""
        try:
            self.flush(timeout)
        except FutureTimeout:
            _log.warning("MLflow events still pending after %.0fs were dropped", timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ events

    def study_created(
        self, spec: StudySpec, on_late: Callable[[str, str], None] | None = None
    ) -> tuple[str, str]:
        made = self._submit(self._parent, spec)
        ids: tuple[str, str] = self._wait(made, ("", ""))
        if not ids[1] and on_late is not None:

            def late(done: Future[Any]) -> None:
                result = None if done.cancelled() else done.result()
                if result and result[1]:
                    try:
                        on_late(*result)
                    except Exception:
                        _log.warning(
                            "could not record the MLflow run of %s", spec.name, exc_info=True
                        )

            made.add_done_callback(late)
        return ids

    def trial_started(
        self, spec: StudySpec, trial: TrialRecord, on_run_id: Callable[[str], None]
    ) -> None:
        def start() -> None:
            run_id = self._start_child(spec, trial)
            self._children[trial.trial_id] = run_id
            on_run_id(run_id)

        start.__name__ = "trial_started"
        self._submit(start)

    def trial_progress(self, trial: TrialRecord, step: int, metrics: dict[str, float]) -> None:
        self._submit(self._log_progress, trial, step, metrics)

    def trial_finished(self, spec: StudySpec, trial: TrialRecord, final_step: int) -> None:
        self._submit(self._finish_child, spec, trial, final_step)

    def front_changed(
        self,
        spec: StudySpec,
        load_trials: LoadTrials,
        hypervolume: float,
        n_complete: int,
    ) -> None:
        with self._pending_lock:
            self._pending_fronts[spec.name] = self._pending_fronts.get(spec.name, 0) + 1
        self._submit(self._update_front, spec, load_trials, hypervolume, n_complete)

    # ------------------------------------------------------------ MLflow work (tracker thread)

    def _experiment(self, stage: str) -> str:
        name = f"stagetune/{stage}"
        if name not in self._experiments:
            exp = self._client.get_experiment_by_name(name)
            if exp is not None:
                self._experiments[name] = exp.experiment_id
            else:
                location = None
                if self._artifact_root is not None:
                    location = (self._artifact_root / stage).resolve().as_uri()
                self._experiments[name] = self._client.create_experiment(
                    name, artifact_location=location
                )
        return self._experiments[name]

    def _parent(self, spec: StudySpec) -> tuple[str, str]:
        exp = self._experiment(spec.stage)
        if spec.name not in self._parents:
            found = self._client.search_runs(
                [exp],
                filter_string=f"tags.`stagetune.study` = '{spec.name}' "
                "and tags.`stagetune.kind` = 'study'",
                max_results=1,
            )
            if found:
                self._parents[spec.name] = found[0].info.run_id
            else:
                run = self._client.create_run(
                    exp,
                    run_name=spec.name,
                    tags={"stagetune.study": spec.name, "stagetune.kind": "study"},
                )
                run_id = run.info.run_id
                self._log_batch(run_id, params=_flat_params(spec))
                self._client.log_dict(
                    run_id, redact(json_format.MessageToDict(spec_to_proto(spec))), "spec.json"
                )
                self._parents[spec.name] = run_id
        return exp, self._parents[spec.name]

    def _child(self, spec: StudySpec, trial: TrialRecord) -> str:
        run_id = self._children.get(trial.trial_id) or trial.mlflow_run_id
        if run_id:
            return run_id
        exp, _ = self._parent(spec)
        found = self._client.search_runs(
            [exp], filter_string=f"tags.`stagetune.trial_id` = '{trial.trial_id}'", max_results=1
        )
        run_id = found[0].info.run_id if found else self._start_child(spec, trial)
        self._children[trial.trial_id] = run_id
        return run_id

    def _start_child(self, spec: StudySpec, trial: TrialRecord) -> str:
        exp, parent = self._parent(spec)
        run = self._client.create_run(
            exp,
            run_name=f"{spec.name}/trial-{trial.number}",
            tags={
                "mlflow.parentRunId": parent,
                "stagetune.study": spec.name,
                "stagetune.kind": "trial",
                "stagetune.trial_id": str(trial.trial_id),
                "trial_number": str(trial.number),
                "state": trial.state,
                "worker": trial.worker_id,
                "attempt": str(trial.attempt),
            },
        )
        run_id = run.info.run_id
        self._log_batch(run_id, params={k: str(v) for k, v in trial.params.items()})
        self._children[trial.trial_id] = run_id
        return run_id

    def _log_progress(self, trial: TrialRecord, step: int, metrics: dict[str, float]) -> None:
        run_id = self._children.get(trial.trial_id) or trial.mlflow_run_id
        if not run_id:
            return
        self._log_batch(run_id, metrics=metrics, step=step)

    def _finish_child(self, spec: StudySpec, trial: TrialRecord, final_step: int) -> None:
        run_id = self._child(spec, trial)
        tags = {"state": trial.state, "worker": trial.worker_id}
        reason = redact_text(trial.reason) if trial.reason else ""
        if reason:
            tags["reason"] = reason.splitlines()[0][:5000]
        if trial.state != "complete":
            tags |= {"pareto_front": "false", "pareto_rank": "0"}
        self._log_batch(run_id, metrics=trial.metrics, step=final_step, tags=tags)
        if "\n" in reason:  # a failure: its error details and the end of the trial log
            self._client.log_text(run_id, reason, "failure.log")
        self._client.set_terminated(run_id, _RUN_STATUS.get(trial.state, "FINISHED"))

    def _update_front(
        self,
        spec: StudySpec,
        load_trials: LoadTrials,
        hypervolume: float,
        n_complete: int,
    ) -> None:
        with self._pending_lock:
            self._pending_fronts[spec.name] -= 1
            superseded = self._pending_fronts[spec.name] > 0
        _, parent = self._parent(spec)
        self._client.log_metric(parent, "hypervolume", hypervolume, step=n_complete)
        if superseded:  # a later update follows: read the trials and draw the front once
            return
        wait = self._front_interval - (
            time.monotonic() - self._front_written.get(spec.name, -math.inf)
        )
        if wait > 0:
            self._defer_front(spec, load_trials, wait)
            return
        self._write_front(spec, load_trials)

    def _defer_front(self, spec: StudySpec, load_trials: LoadTrials, wait: float) -> None:
        """Write the front after ``wait`` seconds (once, whatever happens meanwhile: it
        reads the trials when it runs). Counted in the backlog until written."""
        with self._pending_lock:
            if spec.name in self._deferred:  # already waiting: it writes the newest view
                timer, _, _ = self._deferred[spec.name]
                self._deferred[spec.name] = (timer, spec, load_trials)
                return
            timer = threading.Timer(wait, self._release_front, args=(spec.name,))
            timer.daemon = True
            self._deferred[spec.name] = (timer, spec, load_trials)
            self._backlog += 1
        timer.start()

    def _release_front(self, name: str) -> None:
        with self._pending_lock:
            entry = self._deferred.pop(name, None)
        if entry is None:  # released already (by flush, or by the timer)
            return
        timer, spec, load_trials = entry
        timer.cancel()
        self._submit(self._write_front, spec, load_trials)
        self._count(-1)  # the deferred write's count passed on to its submission

    def _write_front(self, spec: StudySpec, load_trials: LoadTrials) -> None:
        """Every trial's rank tags that changed, then the front's CSV and plot."""
        trials = load_trials()
        if trials is None:  # a newer completion's update writes it (here or on a replica)
            return
        self._front_written[spec.name] = time.monotonic()
        _, parent = self._parent(spec)
        for t in trials:
            run_id = self._child(spec, t)
            tags = ("true" if t.pareto_rank == 1 else "false", str(t.pareto_rank))
            if self._tags.get(run_id) != tags:
                self._set_tags(run_id, {"pareto_front": tags[0], "pareto_rank": tags[1]})
                self._tags[run_id] = tags
        front = sorted((t for t in trials if t.pareto_rank == 1), key=lambda t: t.values)
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "pareto_front.csv"
            write_front_csv(csv_path, spec, front)
            self._client.log_artifact(parent, str(csv_path))
            png_path = Path(tmp) / "pareto_front.png"
            plot_front(png_path, spec, trials)
            self._client.log_artifact(parent, str(png_path))
