"""The database goes away for 10 s (a TCP proxy in front of the real PostgreSQL is cut):
clients get UNAVAILABLE, never INTERNAL; when it is back everything continues and no trial
is orphaned. SQLite's single-writer lock is waited out instead (busy timeout)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import Unavailable
from stagetune.contract.spec import BudgetSpec, StudySpec
from stagetune.v1 import types_pb2 as pb
from tests.conftest import objective_metrics, start_server

OUTAGE = 10.0


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; ``cut`` drops every connection and drops
    new ones as soon as they arrive, until ``restore``. The listener stays bound
    throughout, so nothing else can take its port during the outage."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for c in self._conns:
                _drop(c)
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    _drop(client)
                    continue
                self._conns.append(client)  # before dialing: a cut from now on drops it
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _drop(client)
                continue
            with self._lock:
                if self._cut:  # cut while dialing
                    _drop(client)
                    _drop(upstream)
                    continue
                self._conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


@pytest.mark.postgres
def test_postgresql_down_for_10s_gives_unavailable_then_everything_continues(
    tmp_path: Path, postgres_url: str, lora_spec: StudySpec
) -> None:
    proxy = CuttableProxy(("127.0.0.1", 5432))
    proxied = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    server = start_server(tmp_path, storage_url=proxied, tracking_uri="")
    spec = dataclasses.replace(lora_spec, budget=BudgetSpec(3, 0))
    try:
        with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
            sc.create_study(spec)
            held = wc.acquire("w1").trial.trial_id
        proxy.cut()
        started = time.monotonic()
        outcomes: set[str] = set()
        with (
            StudyClient(server.address, retries=0) as sc,
            WorkerClient(server.address, retries=0) as wc,
        ):
            while time.monotonic() - started < OUTAGE:
                for call in (
                    lambda: wc.acquire("w2"),
                    lambda: wc.complete(held, "w1", objective_metrics(1.0, 3.0, 500.0)),
                    lambda: sc.get_study(spec.name),
                ):
                    try:
                        call()
                        outcomes.add("ok")
                    except Unavailable:
                        outcomes.add("unavailable")
                time.sleep(0.5)
        assert outcomes == {"unavailable"}  # never INTERNAL (which would raise otherwise)
        proxy.restore()
        with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
            done = wc.complete(held, "w1", objective_metrics(1.0, 3.0, 500.0))
            assert done.state == pb.TRIAL_STATE_COMPLETE
            nxt = wc.acquire("w2").trial.trial_id
            wc.complete(nxt, "w2", objective_metrics(2.0, 3.0, 400.0))
            trials = sc.list_trials(spec.name)
        assert [t.state for t in trials] == [pb.TRIAL_STATE_COMPLETE] * 2  # none orphaned
    finally:
        server.stop(grace=0)
        proxy.cut()


def test_a_sqlite_writer_holding_the_lock_for_10s_is_waited_out(
    tmp_path: Path, lora_spec: StudySpec
) -> None:
    db = tmp_path / "st.db"
    server = start_server(tmp_path, storage_url=f"sqlite:///{db}", tracking_uri="")
    try:
        with StudyClient(server.address) as sc, WorkerClient(server.address) as wc:
            sc.create_study(lora_spec)
            held = wc.acquire("w1").trial.trial_id
            other = sqlite3.connect(db, timeout=1, check_same_thread=False)
            other.execute("BEGIN EXCLUSIVE")  # another writer holds the database
            threading.Timer(OUTAGE, other.rollback).start()
            started = time.monotonic()
            done = wc.complete(held, "w1", objective_metrics(1.0, 3.0, 500.0))
            waited = time.monotonic() - started
            other.close()
        assert done.state == pb.TRIAL_STATE_COMPLETE
        assert waited >= OUTAGE - 1  # it waited for the lock rather than failing
    finally:
        server.stop(grace=0)
