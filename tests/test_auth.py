"""Auth, roles, tenancy and TLS on a live server: every role against both services, across teams.

Tokens map to a team and a role; a missing or bad token is UNAUTHENTICATED, a worker token
may not touch studies, another team's study is NOT_FOUND as if it did not exist, admins see
everything. TLS refuses plaintext clients; with a client CA it also refuses clients
without a certificate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stagetune.contract.client import StudyClient, WorkerClient
from stagetune.contract.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from stagetune.contract.spec import StudySpec, WarmStartSpec
from stagetune.server.app import StagetuneServer, banner
from stagetune.server.auth import load_token_file, parse_tokens
from stagetune.trainer.worker import WorkerSettings
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import study_service_pb2_grpc as ss_grpc
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from tests.conftest import objective_metrics, start_server

ALICE = "alice-tok-PLANTED-0001"  # team a, member
BOB = "bob-tok-PLANTED-0002"  # team b, member
WORKER_A = "worker-a-tok-PLANTED-0003"  # team a, worker
WORKER_B = "worker-b-tok-PLANTED-0004"  # team b, worker
ROOT = "root-tok-PLANTED-0005"  # admin
BAD = "PLANTED-bad-token-4242"
ALL_TOKENS = (ALICE, BOB, WORKER_A, WORKER_B, ROOT)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKEN_FILE = {
    "tokens": [
        {"name": "alice", "team": "a", "role": "member", "sha256": _sha(ALICE)},
        {"name": "bob", "team": "b", "role": "member", "token": BOB},
        {"name": "pool-a", "team": "a", "role": "worker", "sha256": _sha(WORKER_A)},
        {"name": "pool-b", "team": "b", "role": "worker", "token": WORKER_B},
        {"name": "ops", "role": "admin", "sha256": _sha(ROOT)},
    ]
}


@pytest.fixture(autouse=True)
def _no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STAGETUNE_TOKEN", "STAGETUNE_TLS_CA", "STAGETUNE_TLS_CERT", "STAGETUNE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)


def _token_file(tmp_path: Path, data: Any = None) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(TOKEN_FILE if data is None else data))
    return path


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[StagetuneServer]:
    srv = start_server(tmp_path, tracking_uri="", auth_file=_token_file(tmp_path))
    yield srv
    srv.stop(grace=0)


def studies(srv: StagetuneServer, token: str, **kw: Any) -> StudyClient:
    return StudyClient(srv.address, token=token, timeout=5, retries=0, **kw)


def workers(srv: StagetuneServer, token: str, **kw: Any) -> WorkerClient:
    return WorkerClient(srv.address, token=token, timeout=5, retries=0, **kw)


def named(spec: StudySpec, name: str, **changes: Any) -> StudySpec:
    return dataclasses.replace(spec, name=name, **changes)


def all_study_names(srv: StagetuneServer) -> list[str]:
    with studies(srv, ROOT) as admin:
        return sorted(s.spec.name for s in admin.list_studies())


# ------------------------------------------------------------------ authentication


def test_no_token_or_a_bad_one_is_unauthenticated_and_never_echoed(
    auth_server: StagetuneServer, lora_spec: StudySpec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for token in ("", BAD, ALICE + "x", ALICE[:-1]):
        with studies(auth_server, token) as sc, workers(auth_server, token) as wc:
            with pytest.raises(Unauthenticated) as err:
                sc.create_study(lora_spec)
            assert BAD not in err.value.message and ALICE[:8] not in err.value.message
            with pytest.raises(Unauthenticated):
                sc.list_studies()
            with pytest.raises(Unauthenticated):
                wc.acquire("w1")
    with grpc.insecure_channel(auth_server.address) as channel:
        stub = ss_grpc.StudyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as rpc:  # not a bearer token
            stub.ListStudies(
                ss.ListStudiesRequest(), timeout=5, metadata=[("authorization", f"Basic {ALICE}")]
            )
        assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ALICE not in (rpc.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)  # health stays open
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert all_study_names(auth_server) == []
    assert BAD not in caplog.text and ALICE not in caplog.text


def test_a_worker_token_may_not_create_or_read_studies(
    auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with studies(auth_server, WORKER_A) as sc:
        with pytest.raises(PermissionDenied):
            sc.create_study(lora_spec)
        with pytest.raises(PermissionDenied):
            sc.list_studies()
        with pytest.raises(PermissionDenied):
            sc.get_study(lora_spec.name)
    assert all_study_names(auth_server) == []


def test_a_worker_token_runs_its_teams_trials(
    auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with studies(auth_server, ALICE) as alice:
        _, created = alice.create_study(named(lora_spec, "a-study"))
        assert created
        _, again = alice.create_study(named(lora_spec, "a-study"))  # own study: idempotent
        assert not again
    with workers(auth_server, WORKER_A) as wa:
        got = wa.acquire("wa-1")
        assert isinstance(got, ws.Assignment) and got.trial.study_name == "a-study"
        tid = got.trial.trial_id
        assert not wa.heartbeat(tid, "wa-1")
        assert not wa.report_progress(tid, "wa-1", 8, {"eval_loss": 2.0}).stop
        assert wa.complete(tid, "wa-1", objective_metrics(1.0, 2.0, 3.0)).state == (
            pb.TRIAL_STATE_COMPLETE
        )
        named_got = wa.acquire("wa-2", study_name="a-study")
        assert isinstance(named_got, ws.Assignment)
        _, requeued = wa.fail(named_got.trial.trial_id, "wa-2", "interrupted", "test")
        assert requeued


# ------------------------------------------------------------------ tenancy


def test_another_teams_study_is_not_found_and_not_listed(
    auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with studies(auth_server, ALICE) as alice:
        alice.create_study(named(lora_spec, "a-study"))
    with studies(auth_server, BOB) as bob:
        with pytest.raises(NotFound) as missing:
            bob.get_study("no-such-study")
        expected = missing.value.message.replace("no-such-study", "a-study")
        for call in (bob.get_study, bob.stop_study, bob.list_trials, bob.pareto_front):
            with pytest.raises(NotFound) as hidden:
                call("a-study")
            assert hidden.value.message == expected  # exactly as if it did not exist
        assert bob.list_studies() == []
        # The study name space is shared: a taken name is the one unavoidable hint.
        with pytest.raises(AlreadyExists):
            bob.create_study(named(lora_spec, "a-study"))
        with pytest.raises(InvalidArgument) as warm:  # no warm start from another team
            bob.create_study(
                named(lora_spec, "b-warm", warm_start=WarmStartSpec(studies=("a-study",)))
            )
        assert warm.value.field == "warm_start.studies[0]"
        assert "no study named 'a-study'" in warm.value.message
        bob.create_study(named(lora_spec, "b-study"))
        assert [s.spec.name for s in bob.list_studies()] == ["b-study"]
    with studies(auth_server, ALICE) as alice:
        assert alice.get_study("a-study").state == pb.STUDY_STATE_RUNNING  # bob's stop: none
        assert [s.spec.name for s in alice.list_studies()] == ["a-study"]
    assert all_study_names(auth_server) == ["a-study", "b-study"]


def test_another_teams_worker_cannot_acquire_or_report(
    auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with studies(auth_server, ALICE) as alice:
        alice.create_study(named(lora_spec, "a-study"))
    with workers(auth_server, WORKER_B) as wb, workers(auth_server, WORKER_A) as wa:
        with pytest.raises(NotFound, match="study 'a-study' not found"):
            wb.acquire("wb-1", study_name="a-study")
        assert isinstance(wb.acquire("wb-1"), ws.NoTrial)  # team a's work is not handed out
        got = wa.acquire("wa-1")
        assert isinstance(got, ws.Assignment)
        tid = got.trial.trial_id
        calls = [
            lambda: wb.heartbeat(tid, "wa-1"),
            lambda: wb.report_progress(tid, "wa-1", 8, {"eval_loss": 1.0}),
            lambda: wb.complete(tid, "wa-1", objective_metrics(1.0, 2.0, 3.0)),
            lambda: wb.fail(tid, "wa-1", "crash", "sabotage"),
        ]
        for call in calls:
            with pytest.raises(NotFound) as err:
                call()
            assert err.value.message == f"trial {tid} not found"
    with workers(auth_server, BOB) as bob_worker:  # a member of team b, likewise
        with pytest.raises(NotFound):
            bob_worker.acquire("b-1", study_name="a-study")
        with pytest.raises(NotFound):
            bob_worker.heartbeat(tid, "wa-1")
    with studies(auth_server, ROOT) as admin:
        (trial,) = admin.list_trials("a-study")
        assert trial.state == pb.TRIAL_STATE_RUNNING and not trial.rungs


def test_an_admin_sees_and_manages_every_team(
    auth_server: StagetuneServer, lora_spec: StudySpec
) -> None:
    with studies(auth_server, ALICE) as alice, studies(auth_server, BOB) as bob:
        alice.create_study(named(lora_spec, "a-study"))
        bob.create_study(named(lora_spec, "b-study"))
    with studies(auth_server, ROOT) as admin, workers(auth_server, ROOT) as admin_worker:
        assert sorted(s.spec.name for s in admin.list_studies()) == ["a-study", "b-study"]
        assert admin.list_trials("a-study") == []
        got = admin_worker.acquire("ops-1", study_name="b-study")
        assert isinstance(got, ws.Assignment)
        assert admin.stop_study("b-study").state == pb.STUDY_STATE_STOPPED
        _, created = admin.create_study(named(lora_spec, "ops-study"))  # no team: admin only
        assert created
    with studies(auth_server, ALICE) as alice:
        assert [s.spec.name for s in alice.list_studies()] == ["a-study"]
        with pytest.raises(NotFound):
            alice.get_study("ops-study")


# ------------------------------------------------------------------ token file and banner


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([{"name": "x", "team": "a", "role": "boss", "token": ALICE}], "tokens[0].role"),
        ([{"name": "x", "role": "member", "token": ALICE}], "tokens[0].team"),
        ([{"name": "x", "role": "worker", "token": ALICE}], "tokens[0].team"),
        ([{"name": "x", "team": "a", "role": "member", "sha256": "abc"}], "tokens[0].sha256"),
        ([{"name": "x", "team": "a", "role": "member", "token": "short"}], "tokens[0].token"),
        ([{"name": "x", "team": "a", "role": "member", "tokne": ALICE}], "tokens[0].tokne"),
        ([{"team": "a", "role": "member", "token": ALICE}], "tokens[0].name"),
        ([{"name": "x", "team": "a", "role": "member"}], "tokens[0]"),
        (
            [
                {"name": "x", "team": "a", "role": "member", "token": ALICE},
                {"name": "y", "team": "b", "role": "member", "sha256": _sha(ALICE)},
            ],
            "tokens[1]",
        ),
        (
            [
                {"name": "x", "team": "a", "role": "member", "token": ALICE},
                {"name": "x", "team": "b", "role": "member", "token": BOB},
            ],
            "tokens[1].name",
        ),
        ([], "tokens"),
    ],
)
def test_a_bad_token_file_names_the_field(entries: list[dict[str, str]], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_tokens({"tokens": entries})
    assert err.value.field == field
    assert ALICE not in err.value.message and BOB not in err.value.message


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f"tokens: [{{name: x, token: {ALICE}\n", "not valid YAML (line"),  # unclosed
        (f"a: &t {ALICE}\ntokens: [{{name: x, team: a, role: member, token: *t}}]\n", "aliases"),
        ("tokens: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
        ("#" * (1 << 20) + "\n", "the limit is"),
        # A token YAML reads as a tag, or with a character the scanner names: the parser's
        # own words would quote it.
        (f"tokens: [{{name: x, team: a, role: member, token: !{ALICE}}}]\n", "(line 1)"),
        (f'tokens: [{{name: x, team: a, role: member, token: "\\q{ALICE}"}}]\n', "(line 1)"),
        (f"tokens: [{{name: x, team: a, role: member, token: {ALICE}@}}]\n\t@\n", "(line"),
    ],
)
def test_a_token_file_is_read_strictly_and_never_quoted(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as err:
        load_token_file(path)
    assert says in err.value.message and str(path) in err.value.message
    assert ALICE not in err.value.message and "'" not in err.value.message.split(str(path))[-1]


def test_serve_with_a_bad_auth_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data = {"tokens": [dict(TOKEN_FILE["tokens"][0]), {"name": "z", "role": "boss", "token": BOB}]}
    path = _token_file(tmp_path, data)
    result = subprocess.run(
        [sys.executable, "-m", "stagetune.cli", "serve", "--port", "0"]
        + ["--data-dir", str(tmp_path / "data"), "--auth-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "tokens[1].role: unknown role 'boss'" in result.stderr
    assert "Traceback" not in result.stderr and BOB not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_the_banner_counts_tokens_and_never_shows_them(
    auth_server: StagetuneServer, tmp_path: Path
) -> None:
    text = banner(auth_server)
    assert "5 tokens (2 member, 2 worker, 1 admin) for 2 teams" in text
    assert "WARNING: no TLS" in text
    assert not any(t in text or _sha(t) in text for t in ALL_TOKENS)
    plain = start_server(tmp_path / "plain", tracking_uri="")
    try:
        assert "WARNING: no authentication and no TLS" in banner(plain)
    finally:
        plain.stop(grace=0)


def test_worker_settings_hand_credentials_to_trials_without_showing_the_token(
    tmp_path: Path,
) -> None:
    settings = WorkerSettings(token=ALICE, tls_ca="ca.pem")
    env = settings.trial_env()
    assert env["STAGETUNE_TOKEN"] == ALICE
    assert Path(env["STAGETUNE_TLS_CA"]).is_absolute()
    assert ALICE not in repr(settings)


# ------------------------------------------------------------------ TLS


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client one."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("stagetune test CA", name("stagetune test CA"), ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(f"stagetune {stem}", ca.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, cert, key)
    return Pki(
        out / "ca.pem",
        out / "server.pem",
        out / "server.key",
        out / "client.pem",
        out / "client.key",
    )


def test_tls_serves_a_client_with_the_ca_and_refuses_plaintext(
    tmp_path: Path, pki: Pki, lora_spec: StudySpec
) -> None:
    srv = start_server(tmp_path, tracking_uri="", tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        assert "tls:      on" in banner(srv) and "WARNING: no authentication" in banner(srv)
        with StudyClient(srv.address, ca_cert=pki.ca, timeout=5, retries=0) as tls_client:
            _, created = tls_client.create_study(named(lora_spec, "over-tls"))
            assert created
        plaintext = StudyClient(srv.address, timeout=5, retries=0)
        with plaintext, pytest.raises(Unavailable):
            plaintext.create_study(named(lora_spec, "in-clear"))
        with StudyClient(srv.address, ca_cert=pki.ca, timeout=5, retries=0) as tls_client:
            assert [s.spec.name for s in tls_client.list_studies()] == ["over-tls"]
    finally:
        srv.stop(grace=0)


def test_mtls_refuses_a_client_without_a_certificate(
    tmp_path: Path, pki: Pki, lora_spec: StudySpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = start_server(
        tmp_path,
        tracking_uri="",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_file=_token_file(tmp_path),
    )
    try:
        assert "client certificates required" in banner(srv)
        with studies(srv, ALICE, ca_cert=pki.ca) as no_cert, pytest.raises(Unavailable):
            no_cert.create_study(named(lora_spec, "no-cert"))
        cert = {"ca_cert": pki.ca, "client_cert": pki.client_cert, "client_key": pki.client_key}
        no_token = studies(srv, "", **cert)  # a certificate is not a token
        with no_token, pytest.raises(Unauthenticated):
            no_token.list_studies()
        with studies(srv, ALICE, **cert) as alice:
            _, created = alice.create_study(named(lora_spec, "with-cert"))
            assert created
        # What a trial process does: everything from the environment the worker set.
        env = WorkerSettings(
            token=WORKER_A,
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        ).trial_env()
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with WorkerClient(srv.address, timeout=5, retries=0) as from_env:
            assert isinstance(from_env.acquire("wa-env"), ws.Assignment)
        assert all_names_over_mtls(srv, pki) == ["with-cert"]
    finally:
        srv.stop(grace=0)


def all_names_over_mtls(srv: StagetuneServer, pki: Pki) -> list[str]:
    with studies(
        srv, ROOT, ca_cert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key
    ) as admin:
        return sorted(s.spec.name for s in admin.list_studies())
