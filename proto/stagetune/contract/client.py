"""Typed clients for the stagetune services.

Workers and the CLI talk to the server only through these classes: every call has a
deadline, UNAVAILABLE is retried a bounded number of times with backoff (all calls here are
safe to repeat: creation and completion are idempotent on the server), and any other gRPC
failure is raised as the domain error of ``stagetune.contract.errors`` that the server raised, so
callers never handle ``grpc.RpcError``.

Credentials: a bearer token (``token=``, else ``$STAGETUNE_TOKEN``) goes with every call as
``authorization: Bearer <token>`` metadata. TLS is on when a CA bundle or client
certificate is given (``ca_cert``/``client_cert``/``client_key``, else
``$STAGETUNE_TLS_CA``/``$STAGETUNE_TLS_CERT``/``$STAGETUNE_TLS_KEY``) or ``tls=True``
(system roots). The environment variables are how a worker hands its credentials to the
trial processes it starts. The token is never put in a message, a log line or a repr.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stagetune.contract.errors import (
    DeadlineExceeded,
    InvalidArgument,
    StagetuneError,
    Unavailable,
    error_from_status,
)
from stagetune.contract.names import FAILURE_KINDS, FailureKindName
from stagetune.contract.spec import StudySpec, spec_to_proto
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import study_service_pb2_grpc as ss_grpc
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from stagetune.v1 import worker_service_pb2_grpc as ws_grpc

__all__ = [
    "StudyClient",
    "WorkerClient",
    "ProgressDecision",
    "DEFAULT_ADDRESS",
    "TOKEN_ENV",
    "TLS_CA_ENV",
    "TLS_CERT_ENV",
    "TLS_KEY_ENV",
    "channel_credentials",
    "health_check",
]

DEFAULT_ADDRESS = "localhost:50051"
TOKEN_ENV = "STAGETUNE_TOKEN"
TLS_CA_ENV = "STAGETUNE_TLS_CA"
TLS_CERT_ENV = "STAGETUNE_TLS_CERT"
TLS_KEY_ENV = "STAGETUNE_TLS_KEY"
PathLike = str | Path
_T = TypeVar("_T")


@dataclass(frozen=True)
class ProgressDecision:
    """The server's answer to a rung report."""

    stop: bool
    reason: str = ""


def _setting(value: PathLike | None, env: str) -> str:
    """An explicit value, else the environment's; "" = not set."""
    if value is None:
        return os.environ.get(env, "").strip()
    return str(value)


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(field, f"cannot read {path}: {e.strerror}") from None


def channel_credentials(
    ca_cert: PathLike | None = None,
    client_cert: PathLike | None = None,
    client_key: PathLike | None = None,
    tls: bool | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel (see the module docstring)."""
    ca = _setting(ca_cert, TLS_CA_ENV)
    cert = _setting(client_cert, TLS_CERT_ENV)
    key = _setting(client_key, TLS_KEY_ENV)
    if bool(cert) != bool(key):
        raise InvalidArgument(
            "tls_cert" if not cert else "tls_key", "client certificate and key go together"
        )
    if tls is False or (tls is None and not (ca or cert)):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "tls_ca") if ca else None,
        private_key=_read(key, "tls_key") if key else None,
        certificate_chain=_read(cert, "tls_cert") if cert else None,
    )


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    value = _setting(token, TOKEN_ENV).strip()
    if not value:
        return ()
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise InvalidArgument("token", "must be printable ASCII without spaces")  # not echoed
    return (("authorization", f"Bearer {value}"),)


def health_check(
    address: str,
    *,
    timeout: float = 5.0,
    ca_cert: PathLike | None = None,
    client_cert: PathLike | None = None,
    client_key: PathLike | None = None,
) -> bool:
    """True when the server at ``address`` answers the standard gRPC health check with
    SERVING within ``timeout`` seconds; False when it answers otherwise or not at all.
    The health service needs no token, so probes and container healthchecks carry none."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = channel_credentials(ca_cert, client_cert, client_key)
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


class _Client:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        ca_cert: PathLike | None = None,
        client_cert: PathLike | None = None,
        client_key: PathLike | None = None,
        tls: bool | None = None,
    ) -> None:
        """``token``/``ca_cert``/``client_cert``/``client_key``: None = from the
        environment, "" = none. ``tls``: None = on when a CA or client certificate is set."""
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata = _auth_metadata(token)
        if channel is None:
            creds = channel_credentials(ca_cert, client_cert, client_key, tls)
            channel = (
                grpc.secure_channel(address, creds)
                if creds is not None
                else grpc.insecure_channel(address)
            )
        self._channel = channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., _T], request: Any) -> _T:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
                details = (e.details() if hasattr(e, "details") else "") or str(code)
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    raise Unavailable(f"{self.address}: {details}") from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(
                        f"{self.address}: no answer in {self.timeout}s"
                    ) from None
                raise error_from_status(code, details) from None
        raise StagetuneError("unreachable")  # pragma: no cover


class StudyClient(_Client):
    """What a training team uses: create, inspect and stop studies; read the Pareto front."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = ss_grpc.StudyServiceStub(self._channel)

    def create_study(self, spec: StudySpec | pb.StudySpec) -> tuple[pb.Study, bool]:
        """Create a study; returns it and whether it was new (False: an equal one existed)."""
        msg = spec if isinstance(spec, pb.StudySpec) else spec_to_proto(spec)
        reply = self._call(self._stub.CreateStudy, ss.CreateStudyRequest(spec=msg))
        return reply.study, reply.created

    def get_study(self, name: str) -> pb.Study:
        return self._call(self._stub.GetStudy, ss.GetStudyRequest(study_name=name))

    def list_studies(self) -> list[pb.Study]:
        return list(self._call(self._stub.ListStudies, ss.ListStudiesRequest()).studies)

    def stop_study(self, name: str) -> pb.Study:
        return self._call(self._stub.StopStudy, ss.StopStudyRequest(study_name=name))

    def list_trials(self, name: str, states: Iterable[pb.TrialState] = ()) -> list[pb.Trial]:
        request = ss.ListTrialsRequest(study_name=name, states=list(states))
        return list(self._call(self._stub.ListTrials, request).trials)

    def pareto_front(self, name: str) -> ss.GetParetoFrontResponse:
        return self._call(self._stub.GetParetoFront, ss.GetParetoFrontRequest(study_name=name))


class WorkerClient(_Client):
    """What a worker (and rank 0 of a trial) uses: acquire, report, complete, fail."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._stub = ws_grpc.WorkerServiceStub(self._channel)

    def acquire(
        self,
        worker_id: str,
        *,
        study_name: str = "",
        hostname: str = "",
        gpus: int = 0,
        processes: int = 1,
        scripts: Iterable[str] = (),
    ) -> ws.Assignment | ws.NoTrial:
        """A trial to run, or a ``NoTrial`` that says when to ask again. ``scripts``: the
        names of the training scripts this worker's operator allows (custom stage)."""
        capabilities = ws.WorkerCapabilities(
            hostname=hostname, gpus=gpus, processes=processes, scripts=sorted(scripts)
        )
        request = ws.AcquireTrialRequest(
            worker_id=worker_id, study_name=study_name, capabilities=capabilities
        )
        reply = self._call(self._stub.AcquireTrial, request)
        return reply.assignment if reply.WhichOneof("result") == "assignment" else reply.no_trial

    def report_progress(
        self,
        trial_id: int,
        worker_id: str,
        step: int,
        metrics: dict[str, float],
        request_id: str | None = None,
    ) -> ProgressDecision:
        """Report rung metrics. Every call carries an idempotency key (a fresh one unless
        given), which the retries of this call reuse: a lost reply never counts twice."""
        request = ws.ReportProgressRequest(
            trial_id=trial_id,
            worker_id=worker_id,
            step=step,
            metrics=metrics,
            request_id=request_id or uuid.uuid4().hex,
        )
        reply = self._call(self._stub.ReportProgress, request)
        return ProgressDecision(reply.decision == pb.DECISION_STOP, reply.reason)

    def heartbeat(self, trial_id: int, worker_id: str) -> bool:
        """Renew the lease; returns True when the trial should stop."""
        request = ws.HeartbeatRequest(trial_id=trial_id, worker_id=worker_id)
        return self._call(self._stub.Heartbeat, request).should_stop

    def complete(
        self,
        trial_id: int,
        worker_id: str,
        metrics: dict[str, float],
        request_id: str | None = None,
    ) -> pb.Trial:
        """Final metrics, with an idempotency key as in ``report_progress``."""
        request = ws.CompleteTrialRequest(
            trial_id=trial_id,
            worker_id=worker_id,
            metrics=metrics,
            request_id=request_id or uuid.uuid4().hex,
        )
        return self._call(self._stub.CompleteTrial, request).trial

    def fail(
        self,
        trial_id: int,
        worker_id: str,
        kind: FailureKindName,
        reason: str,
        request_id: str | None = None,
    ) -> tuple[pb.Trial, bool]:
        """Give the trial up; returns it and whether its params were queued again."""
        request = ws.FailTrialRequest(
            trial_id=trial_id,
            worker_id=worker_id,
            kind=FAILURE_KINDS.to_proto[kind],
            reason=reason[-4000:],
            request_id=request_id or uuid.uuid4().hex,
        )
        reply = self._call(self._stub.FailTrial, request)
        return reply.trial, reply.requeued
