"""Suggestions computed ahead, so that handing out a trial is a pop, not a model fit.

Each study has a *mirror*: an in-memory Optuna study with the study's sampler, holding
every trial the database holds (finished trials with their values and the attributes the
constraints need; running trials as running). A background thread keeps a few
suggestions ready per study, each asked from the mirror, so each one is itself a running
trial there: with TPE's constant liar, running trials *and* suggestions not yet handed
out count as bad guesses, and consecutive suggestions spread out.

Everything the service learns (a suggestion handed out as database trial N, a queued
retry handed out, a trial finished) reaches the mirror as an event on a queue, applied by
the background thread: a worker's call never waits for the sampler or the mirror.

The database stays the only truth. A mirror is built from it on first use (after a
restart, too), and rebuilt when the database holds trials the mirror never heard of:
another server replica sharing the database created them.

A TPE suggestion costs time in proportion to the finished trials it is fitted on (12 ms
at 1,000 trials, 112 ms at 10,000 on a 2-core CPU: ``bench/sampler_scaling.py``), so a
large study's mirror holds a bounded history: past ``history`` finished trials (1,000 by
default) it is rebuilt, every time it has grown by half again, from ``bounded_history``:
the best non-dominated layers (TPE's "good" group is at most 25 trials, all from there)
and a uniform sample of the rest (whose density TPE estimates, which the sample estimates
the same), plus every running trial. A seeded study's suggestions are reproducible up to
the first such rebuild. NSGA-II and random sampling read the whole history at no such
cost and keep it.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from stagetune.contract.spec import ParamValue, StudySpec
from stagetune.objectives.pareto import non_dominated_ranks
from stagetune.server import attributes as at
from stagetune.server import optuna_rdb as rdb
from stagetune.server.attributes import distributions_of
from stagetune.server.records import TrialOutcome
from stagetune.server.storage import StudyStore

__all__ = ["SuggestionPool", "Suggestion", "bounded_history", "HISTORY"]

_log = logging.getLogger(__name__)

SamplerFactory = Callable[[StudySpec], optuna.samplers.BaseSampler]

HISTORY = 1_000  # finished trials a TPE mirror is fitted on, at most (see above)
_DROPPED = -1  # ``by_db`` value: a finished trial the mirror no longer holds


@dataclass(frozen=True)
class Suggestion:
    params: dict[str, ParamValue]
    system_attrs: dict[str, Any]  # what the sampler noted on it (NSGA-II's generation)
    mirror_trial: int  # the suggestion's trial id in its mirror
    generation: int  # which build of the mirror made it


@dataclass
class _Mirror:
    spec: StudySpec
    study: optuna.Study
    generation: int
    ready: collections.deque[Suggestion] = field(default_factory=collections.deque)
    by_db: dict[int, int] = field(default_factory=dict)  # database trial id -> mirror id
    finished: int = 0  # finished trials the mirror holds

    @property
    def bounded(self) -> bool:
        return isinstance(self.study.sampler, optuna.samplers.TPESampler)


def running_trial(
    params: dict[str, Any],
    distributions: dict[str, BaseDistribution],
    system_attrs: dict[str, Any] | None = None,
    start: datetime | None = None,
) -> FrozenTrial:
    """A RUNNING Optuna trial with these params, as a template for ``create_new_trial``."""
    return FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=start,
        datetime_complete=None,
        params=dict(params),
        distributions={k: distributions[k] for k in params if k in distributions},
        user_attrs={},
        system_attrs=dict(system_attrs or {}),
        intermediate_values={},
        trial_id=-1,
    )


class SuggestionPool:
    """Per-study ready suggestions, refilled in the background."""

    def __init__(
        self,
        store: StudyStore,
        make_sampler: SamplerFactory,
        *,
        size: int = 8,
        wait_seconds: float = 10.0,
        idle_seconds: float = 600.0,
        history: int = HISTORY,
    ) -> None:
        self._store = store
        self._make_sampler = make_sampler
        self.size = size
        self.history = history  # 0: every mirror holds the whole history
        self._rng = random.Random()
        self._wait_seconds = wait_seconds
        self._idle_seconds = idle_seconds  # a study not asked for this long: mirror dropped
        self._last_pop: dict[str, float] = {}
        self._mirrors: dict[str, _Mirror] = {}
        self._generations = 0
        self._cond = threading.Condition()  # guards _mirrors and every mirror's ready queue
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wanted: set[str] = set()  # studies whose pool should be (re)filled
        self._in_flight: collections.Counter[str] = collections.Counter()  # events not applied
        self._closed = False
        self.misses = 0  # pops that had to wait for the sampler
        # Seconds each suggestion took the sampler (the latest ones): acquire does not
        # include them, since suggestions are made ahead; benchmarks report them apart.
        self.sample_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        self._thread = threading.Thread(target=self._run, name="suggestions", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ called by the policy

    def pop(self, spec: StudySpec) -> Suggestion:
        """The next suggestion for the study; waits only when none is ready (a miss)."""
        with self._cond:
            self._wanted.add(spec.name)
            self._last_pop[spec.name] = time.monotonic()
            mirror = self._mirrors.get(spec.name)
            if mirror is None or not mirror.ready:
                self.misses += 1
                self._cond.notify_all()
                ok = self._cond.wait_for(
                    lambda: self._closed or bool(self._ready(spec.name)), self._wait_seconds
                )
                if not ok or self._closed:
                    raise TimeoutError(f"no suggestion for {spec.name} after waiting")
            got = self._ready(spec.name).popleft()
            self._in_flight[spec.name] += 1  # until its bind event is applied
            self._cond.notify_all()  # the refill loop tops the pool up again
            return got

    def bind(self, name: str, suggestion: Suggestion, db_trial_id: int | None) -> None:
        """A popped suggestion became database trial ``db_trial_id`` (None: it was not
        used, because creating the trial failed)."""
        self._event("bind", (name, suggestion, db_trial_id))

    def started(self, name: str, db_trial_id: int, params: dict[str, ParamValue]) -> None:
        """A queued trial (retry or warm start) was handed out: it runs now."""
        with self._cond:
            self._in_flight[name] += 1
        self._event("started", (name, db_trial_id, params))

    def finished(self, name: str, db_trial_id: int, outcome: TrialOutcome) -> None:
        """A trial finished. A completed one's outcome carries its values and final
        metrics (all the constraints read), so the mirror learns it without a read; a
        stopped or failed one is read back."""
        completed = None
        if outcome.state == "complete":
            completed = (list(outcome.values), at.constraint_attrs(at.outcome_attrs(outcome)))
        self._event("finished", (name, db_trial_id, completed))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._events.put(("stop", None))
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ background thread

    def _ready(self, name: str) -> collections.deque[Suggestion]:
        mirror = self._mirrors.get(name)
        return mirror.ready if mirror is not None else collections.deque()

    def _event(self, kind: str, payload: Any) -> None:
        self._events.put((kind, payload))
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._has_work(), timeout=1.0)
                if self._closed:
                    return
            try:
                self._drain_events()
                self._drop_idle()
                self._refill_one()
            except Exception:
                _log.warning("suggestion pool pass failed; retrying", exc_info=True)
                with self._cond:
                    self._cond.wait(timeout=1.0)

    def _has_work(self) -> bool:
        if not self._events.empty():
            return True
        return any(self._needs_refill(name) for name in self._wanted)

    def _needs_refill(self, name: str) -> bool:
        return len(self._ready(name)) < self.size  # no mirror yet: nothing ready

    def _drain_events(self) -> None:
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "stop":
                return
            name = payload[0]
            if kind in ("bind", "started"):
                with self._cond:
                    self._in_flight[name] -= 1
            mirror = self._mirrors.get(name)
            if mirror is None:
                continue  # built from the database when needed, which includes this event
            if kind == "bind":
                _, suggestion, db_id = payload
                if db_id is None:  # never handed out: it stays a running guess in the mirror
                    continue
                if suggestion.generation == mirror.generation:
                    mirror.by_db[db_id] = suggestion.mirror_trial
                elif db_id not in mirror.by_db:  # an earlier build's: add a running twin
                    self._add_running(mirror, db_id, suggestion.params)
            elif kind == "started":
                _, db_id, params = payload
                if db_id not in mirror.by_db:
                    self._add_running(mirror, db_id, params)
            elif kind == "finished":
                self._tell(mirror, payload[1], payload[2])

    def _drop_idle(self) -> None:
        """Forget studies nobody asked for in ``idle_seconds`` (finished, stopped, or
        between campaigns): their mirrors are rebuilt from the database if asked again."""
        now = time.monotonic()
        with self._cond:
            for name in [n for n, t in self._last_pop.items() if now - t > self._idle_seconds]:
                self._wanted.discard(name)
                self._mirrors.pop(name, None)
                del self._last_pop[name]

    def _refill_one(self) -> None:
        """Top up one study's pool by one suggestion (so events are never held up)."""
        with self._cond:
            names = [n for n in self._wanted if self._needs_refill(n)]
        if not names:
            return
        name = min(names, key=lambda n: len(self._ready(n)))
        mirror = self._mirrors.get(name)
        if mirror is None or self._stale(mirror):
            mirror = self._build(name)
        elif mirror.bounded and 0 < self.history < mirror.finished - self.history // 2:
            mirror = self._compact(mirror)
        started = time.perf_counter()
        trial = mirror.study.ask(fixed_distributions=distributions_of(mirror.spec))
        self.sample_seconds.append(time.perf_counter() - started)
        mirror_id = rdb.trial_id(trial)
        system_attrs = rdb.storage_of(mirror.study).get_trial(mirror_id).system_attrs
        suggestion = Suggestion(
            dict(trial.params), dict(system_attrs), mirror_id, mirror.generation
        )
        with self._cond:
            if self._mirrors.get(name) is mirror:
                mirror.ready.append(suggestion)
                self._cond.notify_all()

    # ------------------------------------------------------------ the mirror

    def _stale(self, mirror: _Mirror) -> bool:
        """Whether the database holds trials of the study this mirror never heard of."""
        name = mirror.spec.name
        counts = self._store.counts(name)
        with self._cond:
            known = len(mirror.by_db) + self._in_flight[name]
        return counts.total - counts.waiting > known

    def _new_mirror(self, spec: StudySpec) -> _Mirror:
        storage = optuna.storages.InMemoryStorage()
        sampler = self._make_sampler(spec)
        study = optuna.create_study(storage=storage, directions=spec.directions, sampler=sampler)
        self._generations += 1
        return _Mirror(spec, study, self._generations)

    def _bound(self, mirror: _Mirror, finished: list[FrozenTrial]) -> list[FrozenTrial]:
        """Which of these finished trials (in trial order) the mirror is to hold."""
        if not mirror.bounded:
            return finished
        return bounded_history(mirror.spec, finished, self.history, self._rng)

    def _build(self, name: str) -> _Mirror:
        """A fresh mirror of the study in the database: every running trial and every
        finished one, or a bounded history of them (the module's docstring)."""
        head = self._store.study_head(name)
        mirror = self._new_mirror(head.spec)
        trials = [t for t in self._store.optuna_trials(name) if t.state != TrialState.WAITING]
        kept = {
            rdb.trial_id(t)
            for t in self._bound(mirror, [t for t in trials if t.state.is_finished()])
        }
        for t in trials:
            if t.state.is_finished() and rdb.trial_id(t) not in kept:
                mirror.by_db[rdb.trial_id(t)] = _DROPPED
            else:
                self._copy(mirror, t)
        # The spec's seed makes one server's suggestions for a new study reproducible. A
        # mirror rebuilt over trials already made (a restart), or built by one of several
        # replicas on a shared database, would replay that same seeded sequence and hand
        # out configurations already tried: such a sampler draws from fresh randomness.
        if trials or self._store.postgres:
            mirror.study.sampler.reseed_rng()
        with self._cond:
            self._mirrors[name] = mirror
        return mirror

    def _compact(self, old: _Mirror) -> _Mirror:
        """A new build of a mirror that outgrew its history: its running trials and a
        bounded history of its finished ones, copied as they are (constraint values
        included). Suggestions ready in the old build are dropped; one popped meanwhile
        comes back as a running twin when it is bound, as after any rebuild."""
        mirror = self._new_mirror(old.spec)
        mirror_of = {m: d for d, m in old.by_db.items() if m != _DROPPED}
        trials = old.study.get_trials(deepcopy=False)
        kept = {
            rdb.trial_id(t)
            for t in self._bound(mirror, [t for t in trials if t.state.is_finished()])
        }
        storage = rdb.storage_of(mirror.study)
        mirror.by_db = dict.fromkeys(old.by_db, _DROPPED)
        for t in trials:
            db_id = mirror_of.get(rdb.trial_id(t))
            if db_id is None or (t.state.is_finished() and rdb.trial_id(t) not in kept):
                continue  # a suggestion not handed out, or a finished trial left out
            mirror.by_db[db_id] = storage.create_new_trial(rdb.study_id(mirror.study), t)
            mirror.finished += t.state.is_finished()
        mirror.study.sampler.reseed_rng()  # its seeded sequence was spent on the old build
        with self._cond:
            if self._mirrors.get(old.spec.name) is old:
                self._mirrors[old.spec.name] = mirror
        _log.info(
            "%s: sampler history bounded to %d of %d finished trials",
            old.spec.name,
            mirror.finished,
            old.finished,
        )
        return mirror

    def _copy(self, mirror: _Mirror, t: FrozenTrial) -> None:
        """Add database trial ``t`` to the mirror, with its state."""
        mirror_id = self._add(
            mirror, rdb.trial_id(t), t.params, t.distributions, t.system_attrs, t.datetime_start
        )
        if t.state != TrialState.RUNNING:
            self._finish(mirror, mirror_id, t.state, t.values, t.user_attrs)

    def _add_running(self, mirror: _Mirror, db_id: int, params: dict[str, ParamValue]) -> None:
        self._add(mirror, db_id, params, distributions_of(mirror.spec))

    def _add(
        self,
        mirror: _Mirror,
        db_id: int,
        params: dict[str, Any],
        distributions: dict[str, Any],
        system_attrs: dict[str, Any] | None = None,
        start: datetime | None = None,
    ) -> int:
        """A running mirror twin of database trial ``db_id``; returns its mirror id."""
        template = running_trial(params, distributions, system_attrs=system_attrs, start=start)
        storage = rdb.storage_of(mirror.study)
        mirror_id = storage.create_new_trial(rdb.study_id(mirror.study), template)
        mirror.by_db[db_id] = mirror_id
        return mirror_id

    def _tell(
        self,
        mirror: _Mirror,
        db_id: int,
        completed: tuple[list[float], dict[str, Any]] | None,
    ) -> None:
        mirror_id = mirror.by_db.get(db_id)
        storage = rdb.storage_of(mirror.study)
        if mirror_id == _DROPPED:
            return  # finished, and left out of a bounded history
        if mirror_id is not None and storage.get_trial(mirror_id).state.is_finished():
            return  # already told (the build read it finished)
        if mirror_id is not None and completed is not None:
            self._finish(mirror, mirror_id, TrialState.COMPLETE, *completed)
            return
        t = rdb.get_trial(self._store.optuna_storage, db_id)
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            return
        if mirror_id is None:
            self._copy(mirror, t)
        else:
            self._finish(mirror, mirror_id, t.state, t.values, t.user_attrs)

    def _finish(
        self,
        mirror: _Mirror,
        mirror_id: int,
        state: TrialState,
        values: Sequence[float] | None,
        user_attrs: dict[str, Any],
    ) -> None:
        """Tell the mirror how a database trial ended, with the attributes the
        constraints read, through its sampler (which records constraint values, as it
        did for the database study)."""
        storage = rdb.storage_of(mirror.study)
        for key, value in at.constraint_attrs(user_attrs).items():
            storage.set_trial_user_attr(mirror_id, key, value)
        number = storage.get_trial_number_from_id(mirror_id)
        mirror.finished += 1
        if state == TrialState.COMPLETE and values is not None:
            mirror.study.tell(number, list(values))
        else:
            mirror.study.tell(number, state=state)


def bounded_history(
    spec: StudySpec, finished: Sequence[FrozenTrial], history: int, rng: random.Random
) -> list[FrozenTrial]:
    """At most ``history`` of these finished trials (all of them when they are no more),
    in their order: first the best non-dominated layers of the complete feasible ones,
    whole layers until they hold a quarter of ``history`` (at most half: a huge first
    layer is cut), then a uniform sample of every other finished trial. ``history`` 0:
    all of them."""
    if history <= 0 or len(finished) <= history:
        return list(finished)
    best = [
        i
        for i, t in enumerate(finished)
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and all(v <= 0 for v in at.constraint_values(spec, t))
    ]
    keep: set[int] = set()
    if best:
        ranks = non_dominated_ranks([finished[i].values for i in best], spec.directions)
        layer = 0
        for rank, i in sorted(zip(ranks, best, strict=True)):
            if len(keep) >= history // 2 or (rank != layer and len(keep) >= history // 4):
                break
            keep.add(i)
            layer = rank
    rest = [i for i in range(len(finished)) if i not in keep]
    keep.update(rng.sample(rest, history - len(keep)))
    return [finished[i] for i in sorted(keep)]
