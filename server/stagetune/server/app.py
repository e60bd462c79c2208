"""Build and run the stagetune server.

``make_server(settings)`` builds everything (storage, policy, tracking, servicers, health,
reflection) without serving; ``StagetuneServer.start()`` binds and serves;
``run_server(settings)`` serves until SIGTERM/SIGINT, then drains: health goes
NOT_SERVING, in-flight calls get ``grace`` seconds to finish, the tracker flushes.

The policy is handed in: ``make_server(settings, policy_factory=...)`` builds the server's
``Policy`` from its store (server/policy.py); the default is ``OptunaPolicy``, whose
suggestion engine runs in a process of its own when ``sampler_process`` is on.

A setting the server cannot use (a storage it cannot reach, a tracking URI MLflow refuses,
a bad token file or certificate) stops the build with ``InvalidArgument`` naming the
setting, before anything is served.

``metrics_port`` serves Prometheus metrics on their own HTTP port, on the same host
(server/metrics.py; None: off, 0: a free port, read back as ``metrics_port`` once started).
The endpoint has no authentication: it shows study names and counts, never a param.

Security is off by default (loopback, no tokens, no TLS) and the start banner says so.
``auth_file`` turns on bearer tokens, roles and tenancy (server/auth.py); ``tls_cert`` and
``tls_key`` serve TLS only; ``tls_client_ca`` also requires client certificates it signed.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.redact import redact_text
from stagetune.server.auth import TokenTable, load_token_file
from stagetune.server.database import default_storage_url
from stagetune.server.interceptor import ErrorInterceptor
from stagetune.server.optuna_policy import OptunaPolicy
from stagetune.server.pipeline_service import PipelineService
from stagetune.server.pipeline_servicer import PipelineServicer
from stagetune.server.pipeline_tracking import pipeline_tracker
from stagetune.server.policy import PolicyFactory
from stagetune.server.service import StudyService
from stagetune.server.servicer import StudyServicer, WorkerServicer
from stagetune.server.storage import StudyStore
from stagetune.server.tracking import MlflowTracker, NullTracker, Tracker, local_artifact_root
from stagetune.server.trial_service import TrialService
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import pipeline_service_pb2_grpc as ps_grpc
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import study_service_pb2_grpc as ss_grpc
from stagetune.v1 import worker_service_pb2 as ws
from stagetune.v1 import worker_service_pb2_grpc as ws_grpc

__all__ = [
    "ServerSettings",
    "StagetuneServer",
    "make_server",
    "run_server",
    "banner",
    "server_credentials",
]

if TYPE_CHECKING:
    from stagetune.server.metrics import ServerMetrics

_log = logging.getLogger(__name__)

SERVICE_NAMES = (
    ss.DESCRIPTOR.services_by_name["StudyService"].full_name,
    ws.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    ps.DESCRIPTOR.services_by_name["PipelineService"].full_name,
)


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = field(default_factory=lambda: Path("stagetune-data"))
    storage_url: str | None = None  # default: SQLite file in data_dir
    tracking_uri: str | None = None  # default: MLflow SQLite store in data_dir; "" = off
    lease_seconds: float = 120.0
    reaper_interval: float = 10.0
    grace: float = 10.0
    max_workers: int = 32
    auth_file: Path | None = None  # token file (server/auth.py); None = no authentication
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: serve TLS only
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM CA bundle: require client certificates (mTLS)
    pipeline_interval: float = 2.0  # seconds between passes of the pipeline loop
    metrics_port: int | None = None  # Prometheus /metrics on host:port; 0 = any free port
    sampler_process: bool = False  # the suggestion engine in a process of its own (pool.py)

    def resolved_storage_url(self) -> str:
        return self.storage_url or default_storage_url(self.data_dir)

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri is not None:
            return self.tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"


def _read_pem(path: Path, field: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(field, f"cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise InvalidArgument(field, f"{path} is not a PEM file")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings; None for plaintext. Errors name the setting."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise InvalidArgument("tls_client_ca", "needs tls_cert and tls_key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        missing = "tls_cert" if settings.tls_cert is None else "tls_key"
        raise InvalidArgument(missing, "is required when the other of tls_cert/tls_key is set")
    pair = (_read_pem(settings.tls_key, "tls_key"), _read_pem(settings.tls_cert, "tls_cert"))
    client_ca = (
        _read_pem(settings.tls_client_ca, "tls_client_ca")
        if settings.tls_client_ca is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class StagetuneServer:
    """A built server. ``start`` binds and serves; ``stop`` drains and closes everything."""

    def __init__(
        self, settings: ServerSettings, policy_factory: PolicyFactory | None = None
    ) -> None:
        self.settings = settings
        # Security settings first: a bad token file or certificate fails before anything
        # is opened or written.
        self.tokens: TokenTable | None = (
            load_token_file(settings.auth_file) if settings.auth_file is not None else None
        )
        self._credentials = server_credentials(settings)
        if settings.metrics_port is not None and not 0 <= settings.metrics_port <= 65535:
            raise InvalidArgument("metrics_port", "must be a port number, 0 to 65535")
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = StudyStore(settings.resolved_storage_url())
        tracking_uri = settings.resolved_tracking_uri()
        self.tracker: Tracker = (
            MlflowTracker(
                tracking_uri, artifact_root=local_artifact_root(tracking_uri, settings.data_dir)
            )
            if tracking_uri
            else NullTracker()
        )
        if policy_factory is None:
            policy_factory = functools.partial(
                OptunaPolicy, sampler_process=settings.sampler_process
            )
        policy = policy_factory(self.store)
        self.metrics: ServerMetrics | None = None
        interceptors: list[grpc.ServerInterceptor[Any, Any]] = [ErrorInterceptor(self.tokens)]
        if settings.metrics_port is not None:
            from stagetune.server.metrics import ServerMetrics  # prometheus_client: only if on

            pool = policy.pool if isinstance(policy, OptunaPolicy) else None
            misses = (lambda: pool.misses) if pool is not None else None
            self.metrics = ServerMetrics(self.store, self.tracker, pool_misses=misses)
            self.metrics.grpc.initialize(_methods(SERVICE_NAMES))
            interceptors.insert(0, self.metrics.grpc)  # outermost: counts the codes sent
        self.service = StudyService(self.store, policy, self.tracker)
        self.trials = TrialService(
            self.service, lease_seconds=settings.lease_seconds, events=self.metrics
        )
        artifacts = local_artifact_root(tracking_uri, settings.data_dir)
        self.pipelines = PipelineService(
            self.service,
            pipeline_tracker(tracking_uri, artifacts),
            interval=settings.pipeline_interval,
        )
        self.health = health.HealthServicer()
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", 4 << 20)],
        )
        ss_grpc.add_StudyServiceServicer_to_server(StudyServicer(self.service), self.grpc_server)
        ws_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.trials, tracking_uri), self.grpc_server
        )
        ps_grpc.add_PipelineServiceServicer_to_server(
            PipelineServicer(self.pipelines), self.grpc_server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        self.port = 0
        self.metrics_port = 0  # bound once started, if metrics are on
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self._credentials is not None

    def start(self) -> StagetuneServer:
        try:
            return self._start()
        except BaseException:
            self.service.close()  # the policy's background work: the sampler's process
            self.tracker.close()
            raise

    def _start(self) -> StagetuneServer:
        target = f"{self.settings.host}:{self.settings.port}"
        if self._credentials is not None:
            self.port = self.grpc_server.add_secure_port(target, self._credentials)
        else:
            self.port = self.grpc_server.add_insecure_port(target)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.host}:{self.settings.port}")
        if self.metrics is not None and self.settings.metrics_port is not None:
            where = f"{self.settings.host}:{self.settings.metrics_port}"
            try:
                self.metrics_port = self.metrics.serve(
                    self.settings.host, self.settings.metrics_port
                )
            except OSError as e:
                self.grpc_server.stop(0)
                problem = f"cannot listen on {where}: {e.strerror}"
                raise InvalidArgument("metrics_port", problem) from None
        self.grpc_server.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reaper.start()
        self.pipelines.start()
        return self

    def _reap_loop(self) -> None:
        while not self._stopping.wait(self.settings.reaper_interval):
            try:
                self.trials.reap_expired()
            except Exception:
                _log.warning("lease reaper pass failed", exc_info=True)

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING first, then let in-flight calls finish within ``grace``."""
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(self.settings.grace if grace is None else grace).wait()
        self.pipelines.close()
        self.service.close()
        self.tracker.close()
        if self.metrics is not None:
            self.metrics.close()


def _methods(services: tuple[str, ...]) -> list[tuple[str, str]]:
    """(service, method) of every method of these services."""
    pool = descriptor_pool.Default()
    return [(s, m.name) for s in services for m in pool.FindServiceByName(s).methods]


def make_server(
    settings: ServerSettings, policy_factory: PolicyFactory | None = None
) -> StagetuneServer:
    return StagetuneServer(settings, policy_factory)


def banner(server: StagetuneServer) -> str:
    """What ``run_server`` prints at start: where, what storage, and how it is secured.
    Names counts of tokens and teams, never a token."""
    settings = server.settings
    lines = [
        f"stagetune serving on {server.address}",
        f"  storage:  {redact_text(settings.resolved_storage_url())}",
        f"  tracking: {redact_text(settings.resolved_tracking_uri()) or 'off'}",
    ]
    if server.metrics is not None:
        lines.append(f"  metrics:  http://{settings.host}:{server.metrics_port}/metrics")
    tokens = server.tokens
    if tokens is not None:
        lines.append(
            f"  auth:     {len(tokens)} tokens ({tokens.count('member')} member, "
            f"{tokens.count('worker')} worker, {tokens.count('admin')} admin) "
            f"for {len(tokens.teams)} teams, from {settings.auth_file}"
        )
    if server.tls:
        mtls = settings.tls_client_ca is not None
        lines.append("  tls:      on" + (", client certificates required" if mtls else ""))
    if tokens is None and not server.tls:
        lines += [
            "  WARNING: no authentication and no TLS: anyone who can reach this port can read,",
            "  create and stop every study. Keep it on a trusted network or loopback.",
        ]
    elif tokens is None:
        lines += [
            "  WARNING: no authentication (no --auth-file): anyone who can reach this port",
            "  can read, create and stop every study. TLS only encrypts the traffic.",
        ]
    elif not server.tls:
        lines += [
            "  WARNING: no TLS: tokens and studies cross the network in clear text.",
            "  Use --tls-cert/--tls-key unless this port is only reachable on loopback.",
        ]
    return "\n".join(lines)


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain. Returns the process exit code."""
    server = make_server(settings).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        _log.info("received %s; draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(banner(server), flush=True)
    stop.wait()
    server.stop()
    print("stagetune server stopped", flush=True)
    return 0
