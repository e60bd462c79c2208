"""Suggestions computed ahead, so that handing out a trial is a pop, not a model fit.

Each study has a *mirror*: an in-memory Optuna study with the study's sampler, holding
every trial the database holds (finished trials with their values and the attributes the
constraints need; running trials as running). A background engine keeps a few
suggestions ready per study, each asked from the mirror, so each one is itself a running
trial there: with TPE's constant liar, running trials *and* suggestions not yet handed
out count as bad guesses, and consecutive suggestions spread out.

Everything the service learns (a suggestion handed out as database trial N, a queued
retry handed out, a trial finished) reaches the mirror as a message on a pipe, applied in
order by the engine that holds the mirrors: a worker's call never waits for the sampler
or the mirror. The engine can run in a process of its own (``SuggestionPool`` says
when), so that a TPE fit does not hold the server's interpreter lock.

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

import atexit
import collections
import contextlib
import itertools
import logging
import math
import multiprocessing
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
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

__all__ = ["SuggestionPool", "Suggestion", "MirrorView", "bounded_history", "HISTORY"]

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
    """Per-study ready suggestions, made by an engine in the background.

    The engine (``_Engine``: the mirrors and their samplers) runs on a thread of the
    server by default. ``process=True`` (``serve --sampler-process``) runs the same engine
    in a process of its own, so that sampling, which is pure Python and holds the
    interpreter lock while it fits, never competes with the server's handlers for it; it
    is not the default yet (README, open loop: once, a server with it did not exit within
    60 s of SIGTERM, not understood). The two talk over a pipe (on a thread: two
    queues); an engine that dies (killed, out of memory) is started again, and rebuilds
    its mirrors from the database like a restarted server's.
    """

    def __init__(
        self,
        store: StudyStore,
        make_sampler: SamplerFactory,
        *,
        size: int = 8,
        wait_seconds: float = 10.0,
        idle_seconds: float = 600.0,
        history: int = HISTORY,
        process: bool = False,
    ) -> None:
        self._store = store
        self._wait_seconds = wait_seconds
        self._settings = _EngineSettings(make_sampler, size, idle_seconds, history)
        self._process = process
        self._cond = threading.Condition()  # guards _ready, _replies and _closed
        self._ready: dict[str, collections.deque[Suggestion]] = {}
        self._replies: dict[int, MirrorView | None] = {}
        self._asked = itertools.count()
        self._closed = False
        self._send_lock = threading.Lock()  # guards _conn, _engine and _studies
        # Studies asked for (name -> when, monotonic): a new engine is told those asked
        # for lately (a pop waits at most wait_seconds; a mirror lives idle_seconds).
        self._studies: dict[str, float] = {}
        self.misses = 0  # pops that had to wait for the sampler
        # Seconds each suggestion took the sampler (the latest ones): acquire does not
        # include them, since suggestions are made ahead; benchmarks report them apart.
        self.sample_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        self.restarts = 0  # engines started again after dying; each engine's epoch
        self._conn, self._engine = self._start_engine()
        self._reader = threading.Thread(target=self._read, name="suggestions-in", daemon=True)
        self._reader.start()
        if process:
            # A server leaving without close() (an error at start, the end of the
            # interpreter): its engine process is ended on the way out, and is not to be
            # started again.
            atexit.register(self._leaving)

    @property
    def size(self) -> int:
        """How many suggestions the engine keeps ready per study."""
        return self._settings.size

    # ------------------------------------------------------------ called by the policy

    def pop(self, spec: StudySpec) -> Suggestion:
        """The next suggestion for the study; waits only when none is ready (a miss)."""
        name = spec.name
        with self._cond:
            if not self._ready.get(name):
                self.misses += 1
                self._send(("want", name))
                ok = self._cond.wait_for(
                    lambda: self._closed or bool(self._ready.get(name)), self._wait_seconds
                )
                if not ok or self._closed:
                    raise TimeoutError(f"no suggestion for {name} after waiting")
            got = self._ready[name].popleft()
            # Sent before the trial is written: when the engine sees the trial in the
            # database, it has this message to account for it (``_Engine._stale``).
            self._send(("pop", name, got.generation))
            return got

    def bind(self, name: str, suggestion: Suggestion, db_trial_id: int | None) -> None:
        """A popped suggestion became database trial ``db_trial_id`` (None: it was not
        used, because creating the trial failed)."""
        self._send(("bind", name, suggestion, db_trial_id))

    def started(self, name: str, db_trial_id: int, params: dict[str, ParamValue]) -> None:
        """A queued trial (retry or warm start) was handed out: it runs now."""
        self._send(("started", name, db_trial_id, params))

    def finished(self, name: str, db_trial_id: int, outcome: TrialOutcome) -> None:
        """A trial finished. A completed one's outcome carries its values and final
        metrics (all the constraints read), so the mirror learns it without a read; a
        stopped or failed one is read back."""
        completed = None
        if outcome.state == "complete":
            completed = (list(outcome.values), at.constraint_attrs(at.outcome_attrs(outcome)))
        self._send(("finished", name, db_trial_id, completed))

    def configure(self, *, history: int | None = None, idle_seconds: float | None = None) -> None:
        """Change the engine's bound on a mirror's history, or how long a study nobody
        asks for keeps its mirror (tests use it to make both happen sooner)."""
        if history is not None:
            self._settings.history = history
        if idle_seconds is not None:
            self._settings.idle_seconds = idle_seconds
        self._send(("configure", history, idle_seconds))

    def inspect(self, name: str, timeout: float = 10.0) -> MirrorView | None:
        """What the engine's mirror of the study holds now (None: no mirror)."""
        with self._cond:
            token = next(self._asked)
            self._send(("inspect", name, token))
            if not self._cond.wait_for(lambda: token in self._replies, timeout):
                raise TimeoutError(f"the suggestion engine did not answer about {name}")
            return self._replies.pop(token)

    @property
    def engine_pid(self) -> int | None:
        """The engine's process id (None: it runs on a thread of this process)."""
        return self._engine.pid if isinstance(self._engine, BaseProcess) else None

    def ready(self, name: str) -> list[Suggestion]:
        """The study's suggestions ready to hand out, next first."""
        with self._cond:
            return list(self._ready.get(name, ()))

    def _leaving(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        atexit.unregister(self._leaving)
        self._leaving()
        self._send(("stop",))
        with self._send_lock:
            engine = self._engine
        engine.join(timeout=5)
        if isinstance(engine, BaseProcess) and engine.is_alive():
            engine.kill()  # it holds nothing the database does not
            engine.join(timeout=5)
        self._reader.join(timeout=5)
        self._conn.close()

    # ------------------------------------------------------------ the engine's side

    def _start_engine(self) -> tuple[Connection | _LocalEnd, threading.Thread | BaseProcess]:
        epoch = self.restarts
        engine: threading.Thread | BaseProcess
        if self._process:
            here, there = multiprocessing.Pipe()
            engine = multiprocessing.get_context("spawn").Process(
                target=_engine_process,
                args=(self._store.url, self._settings, there, epoch),
                name="stagetune-sampler",
                daemon=True,
            )
            engine.start()
            there.close()  # the child holds its own copy: EOF reaches us when it dies
            return here, engine
        # On a thread: the same engine, its messages on queues, nothing pickled.
        local = _LocalEnd()
        run = _Engine(self._store, self._settings, epoch, inbox=local.to_engine, outbox=local.out)
        engine = threading.Thread(target=run.run, name="suggestions", daemon=True)
        engine.start()
        return local, engine

    def _send(self, message: tuple[Any, ...]) -> None:
        """Send to the engine. One that died takes nothing: its successor rebuilds the
        mirrors from the database, which holds whatever the message said."""
        with self._send_lock:
            if message[0] == "want":
                self._studies[message[1]] = time.monotonic()
            with contextlib.suppress(OSError):
                self._conn.send(message)

    def _read(self) -> None:
        """Take in what the engine sends; start it again if it dies while serving."""
        quick, last = 0, -math.inf  # restarts within a minute of the one before; the latest
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                with self._cond:
                    if self._closed:
                        return
                    self._ready.clear()  # made by the dead engine's mirrors
                self.restarts += 1
                _log.warning("the suggestion engine stopped; starting it again")
                # One that keeps dying is started again more and more slowly.
                quick = quick + 1 if time.monotonic() - last < 60 else 0
                time.sleep(min(0.1 * 2**quick, 30.0))
                last = time.monotonic()
                with self._send_lock:
                    if self._closed:
                        return
                    self._conn, self._engine = self._start_engine()
                    lately = max(self._settings.idle_seconds, self._wait_seconds)
                    since = time.monotonic() - lately
                    self._studies = {k: t for k, t in self._studies.items() if t >= since}
                    for name in self._studies:  # a pop may be waiting on the dead one
                        self._conn.send(("want", name))
                continue
            kind = message[0]
            with self._cond:
                if kind == "suggestion":
                    _, name, suggestion, seconds = message
                    self._ready.setdefault(name, collections.deque()).append(suggestion)
                    self.sample_seconds.append(seconds)
                elif kind == "generation":  # a new build: the old build's ready ones go
                    _, name, generation = message
                    kept = [s for s in self._ready.get(name, ()) if s.generation == generation]
                    self._ready[name] = collections.deque(kept)
                elif kind == "view":
                    self._replies[message[1]] = message[2]
                self._cond.notify_all()


@dataclass
class _EngineSettings:
    make_sampler: SamplerFactory
    size: int  # suggestions kept ready per study
    idle_seconds: float  # a study not asked for this long: mirror dropped
    history: int  # 0: every mirror holds the whole history


@dataclass(frozen=True)
class MirrorView:
    """What one mirror holds, as ``SuggestionPool.inspect`` reports it."""

    generation: int
    finished: int  # finished trials it holds
    known: int  # database trials it maps (finished ones left out of a bound included)
    states: dict[str, int]  # its trials by Optuna state, suggestions included


class _LocalEnd:
    """The pool's end of a channel to an engine on a thread: two queues."""

    CLOSED = ("closed",)

    def __init__(self) -> None:
        self.to_engine: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.out: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def send(self, message: tuple[Any, ...]) -> None:
        self.to_engine.put(message)

    def recv(self) -> tuple[Any, ...]:
        message = self.out.get()
        if message == self.CLOSED:
            raise EOFError
        return message

    def close(self) -> None:
        pass


def _engine_process(url: str, settings: _EngineSettings, conn: Connection, epoch: int) -> None:
    """The engine's process: its own connection to the database, and the loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _Engine(StudyStore(url), settings, epoch, conn=conn).run()


class _Stop(Exception):
    """The pool closed (or went away): the engine's loop ends."""


class _Engine:
    """The mirrors and their samplers: applies the service's events in order and keeps
    ``size`` suggestions of each wanted study sent ahead to the pool."""

    def __init__(
        self,
        store: StudyStore,
        settings: _EngineSettings,
        epoch: int,
        *,
        conn: Connection | None = None,
        inbox: queue.SimpleQueue[tuple[Any, ...]] | None = None,
        outbox: queue.SimpleQueue[tuple[Any, ...]] | None = None,
    ) -> None:
        """In a process: ``conn``, the pipe to the pool. On a thread: the pool's queues."""
        self._store = store
        self._settings = settings
        self._conn = conn
        self._outbox = outbox
        self._rng = random.Random()
        self._mirrors: dict[str, _Mirror] = {}
        self._generations = epoch << 32  # unique across restarts of the engine
        self._wanted: set[str] = set()  # studies whose pool should be (re)filled
        self._last_pop: dict[str, float] = {}
        self._sent: collections.Counter[str] = collections.Counter()  # this build's, not popped
        self._in_flight: collections.Counter[str] = collections.Counter()  # popped, not bound
        # Messages move from the pipe to this queue on a thread of their own, so that the
        # pool's sends never wait while the sampler fits; ``_read_lock`` keeps one reader.
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = inbox or queue.SimpleQueue()
        self._read_lock = threading.Lock()

    def run(self) -> None:
        if self._conn is not None:
            threading.Thread(target=self._pump, name="suggestions-pump", daemon=True).start()
        try:
            while True:
                try:
                    with contextlib.suppress(queue.Empty):
                        self._apply(self._inbox.get(timeout=0 if self._has_work() else 1.0))
                    self._drain()
                    self._drop_idle()
                    self._refill_one()
                except _Stop:
                    return
                except Exception:
                    _log.warning("suggestion engine pass failed; retrying", exc_info=True)
                    time.sleep(1.0)
        finally:
            if self._conn is not None:
                self._conn.close()
            else:
                assert self._outbox is not None
                self._outbox.put(_LocalEnd.CLOSED)

    # ------------------------------------------------------------ messages

    def _pump(self) -> None:
        assert self._conn is not None
        while True:
            try:
                # Wait outside the lock: ``_drain`` must not wait for this wait.
                if self._conn.poll(0.5):
                    with self._read_lock:
                        while self._conn.poll(0):
                            self._inbox.put(self._conn.recv())
            except (EOFError, OSError):
                self._inbox.put(("stop",))
                return

    def _drain(self, *, from_pipe: bool = False) -> None:
        """Apply every message received; ``from_pipe``: every one sent, too."""
        if from_pipe and self._conn is not None:
            with self._read_lock:
                while self._conn.poll(0):
                    self._inbox.put(self._conn.recv())
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._apply(message)

    def _reply(self, message: tuple[Any, ...]) -> None:
        if self._outbox is not None:
            self._outbox.put(message)
            return
        assert self._conn is not None
        try:
            self._conn.send(message)
        except OSError:
            raise _Stop from None

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stop":
            raise _Stop
        if kind == "configure":
            _, history, idle = message
            if history is not None:
                self._settings.history = history
            if idle is not None:
                self._settings.idle_seconds = idle
            return
        name = message[1]
        mirror = self._mirrors.get(name)
        if kind == "want":
            self._wanted.add(name)
            self._last_pop[name] = time.monotonic()
        elif kind == "pop":
            self._wanted.add(name)
            self._last_pop[name] = time.monotonic()
            self._in_flight[name] += 1
            if mirror is not None and message[2] == mirror.generation:
                self._sent[name] -= 1
        elif kind == "inspect":
            self._reply(("view", message[2], self._view(mirror)))
        elif kind == "bind":
            # Not below 0: a pop sent to a previous engine may be bound on this one.
            self._in_flight[name] = max(0, self._in_flight[name] - 1)
            _, _, suggestion, db_id = message
            if mirror is None or db_id is None:
                return  # built from the database when needed; an unused one stays a guess
            if suggestion.generation == mirror.generation:
                mirror.by_db[db_id] = suggestion.mirror_trial
            elif db_id not in mirror.by_db:  # an earlier build's: add a running twin
                self._add_running(mirror, db_id, suggestion.params)
        elif kind == "started":
            _, _, db_id, params = message
            if mirror is not None and db_id not in mirror.by_db:
                self._add_running(mirror, db_id, params)
        elif kind == "finished" and mirror is not None:
            self._tell(mirror, message[2], message[3])

    def _view(self, mirror: _Mirror | None) -> MirrorView | None:
        if mirror is None:
            return None
        states = collections.Counter(t.state.name for t in mirror.study.get_trials(deepcopy=False))
        return MirrorView(mirror.generation, mirror.finished, len(mirror.by_db), dict(states))

    # ------------------------------------------------------------ the loop's work

    def _has_work(self) -> bool:
        return not self._inbox.empty() or any(self._needs_refill(n) for n in self._wanted)

    def _needs_refill(self, name: str) -> bool:
        return name not in self._mirrors or self._sent[name] < self._settings.size

    def _drop_idle(self) -> None:
        """Forget studies nobody asked for in ``idle_seconds`` (finished, stopped, or
        between campaigns): their mirrors are rebuilt from the database if asked again."""
        now = time.monotonic()
        idle = self._settings.idle_seconds
        for name in [n for n, t in self._last_pop.items() if now - t > idle]:
            self._wanted.discard(name)
            del self._last_pop[name]
            if self._mirrors.pop(name, None) is not None:
                self._sent.pop(name, None)
                self._reply(("generation", name, 0))  # its ready suggestions go too

    def _refill_one(self) -> None:
        """Top up one study's pool by one suggestion (so events are never held up)."""
        names = [n for n in self._wanted if self._needs_refill(n)]
        if not names:
            return
        name = min(names, key=lambda n: self._sent[n] if n in self._mirrors else -1)
        mirror = self._mirrors.get(name)
        history = self._settings.history
        if mirror is None or self._stale(mirror):
            mirror = self._build(name)
        elif mirror.bounded and 0 < history < mirror.finished - history // 2:
            mirror = self._compact(mirror)
        started = time.perf_counter()
        trial = mirror.study.ask(fixed_distributions=distributions_of(mirror.spec))
        seconds = time.perf_counter() - started
        mirror_id = rdb.trial_id(trial)
        system_attrs = rdb.storage_of(mirror.study).get_trial(mirror_id).system_attrs
        suggestion = Suggestion(
            dict(trial.params), dict(system_attrs), mirror_id, mirror.generation
        )
        self._sent[name] += 1
        self._reply(("suggestion", name, suggestion, seconds))

    # ------------------------------------------------------------ the mirror

    def _stale(self, mirror: _Mirror) -> bool:
        """Whether the database holds trials of the study this mirror never heard of."""
        name = mirror.spec.name
        counts = self._store.counts(name)
        # A pop is sent before its trial is written: every trial counted has its pop
        # (or its bind) in the pipe by now.
        self._drain(from_pipe=True)
        known = len(mirror.by_db) + self._in_flight[name]
        return counts.total - counts.waiting > known

    def _install(self, mirror: _Mirror) -> None:
        self._mirrors[mirror.spec.name] = mirror
        self._sent[mirror.spec.name] = 0
        self._reply(("generation", mirror.spec.name, mirror.generation))

    def _new_mirror(self, spec: StudySpec) -> _Mirror:
        storage = optuna.storages.InMemoryStorage()
        sampler = self._settings.make_sampler(spec)
        study = optuna.create_study(storage=storage, directions=spec.directions, sampler=sampler)
        self._generations += 1
        return _Mirror(spec, study, self._generations)

    def _bound(self, mirror: _Mirror, finished: list[FrozenTrial]) -> list[FrozenTrial]:
        """Which of these finished trials (in trial order) the mirror is to hold."""
        if not mirror.bounded:
            return finished
        return bounded_history(mirror.spec, finished, self._settings.history, self._rng)

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
        self._install(mirror)
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
        if self._mirrors.get(old.spec.name) is old:
            self._install(mirror)
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
