"""Health, reflection and graceful shutdown of a live server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stagetune.server.app import StagetuneServer


def test_health_reports_serving_for_each_service(tracked_server: StagetuneServer) -> None:
    with grpc.insecure_channel(tracked_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "stagetune.v1.StudyService", "stagetune.v1.WorkerService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(tracked_server: StagetuneServer) -> None:
    with grpc.insecure_channel(tracked_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
    assert {"stagetune.v1.StudyService", "stagetune.v1.WorkerService"} <= names


def test_stop_goes_not_serving_before_it_closes(tracked_server: StagetuneServer) -> None:
    tracked_server.health.enter_graceful_shutdown()
    with grpc.insecure_channel(tracked_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_serve_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagetune.cli",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # startup chatter may precede the banner
        seen.append(line)
        if "stagetune serving on 127.0.0.1:" in line:
            break
    else:
        raise AssertionError(f"no serving banner: {seen}")
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "stopped" in out
