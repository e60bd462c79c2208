"""The error table, round-tripped through a live server and the typed client."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from stagetune.contract import errors
from stagetune.contract.client import StudyClient
from stagetune.server.interceptor import ErrorInterceptor
from stagetune.v1 import study_service_pb2_grpc as ss_grpc

DOMAIN_ERRORS = [
    errors.InvalidArgument("search_space.lr.low", "must be > 0"),
    errors.NotFound("study 'x' not found"),
    errors.AlreadyExists("study 'x' exists with a different spec"),
    errors.FailedPrecondition("trial 3 is complete, not running"),
    errors.PermissionDenied("workers cannot create studies"),
    errors.Unauthenticated("missing token"),
    errors.Unavailable("storage unavailable; retry later"),
]


class _Raising(ss_grpc.StudyServiceServicer):  # type: ignore[misc]
    """A servicer whose GetStudy raises whatever the test puts in ``error``."""

    error: Exception = RuntimeError()

    def GetStudy(self, request: object, context: grpc.ServicerContext) -> object:
        raise self.error


@pytest.fixture
def raising() -> Iterator[tuple[_Raising, str]]:
    servicer = _Raising()
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[ErrorInterceptor()])
    ss_grpc.add_StudyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port != 0
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=lambda e: type(e).__name__)
def test_each_domain_error_reaches_the_client_as_itself(
    raising: tuple[_Raising, str], error: errors.StagetuneError
) -> None:
    servicer, address = raising
    servicer.error = error
    with StudyClient(address, timeout=5, retries=0) as client, pytest.raises(type(error)) as got:
        client.get_study("x")
    assert error.message in got.value.message
    if isinstance(error, errors.InvalidArgument):
        assert got.value.field == "search_space.lr.low"  # type: ignore[attr-defined]


def test_each_domain_error_has_its_status_code(raising: tuple[_Raising, str]) -> None:
    servicer, address = raising
    channel = grpc.insecure_channel(address)
    stub = ss_grpc.StudyServiceStub(channel)
    from stagetune.v1 import study_service_pb2 as ss

    for error in DOMAIN_ERRORS:
        servicer.error = error
        with pytest.raises(grpc.RpcError) as got:
            stub.GetStudy(ss.GetStudyRequest(study_name="x"), timeout=5)
        assert got.value.code() == errors.STATUS_OF[type(error)]
    channel.close()


def test_a_bug_is_internal_and_leaks_nothing(raising: tuple[_Raising, str]) -> None:
    servicer, address = raising
    servicer.error = KeyError("postgres://admin:hunter2@db/secret")
    with (
        StudyClient(address, timeout=5, retries=0) as client,
        pytest.raises(errors.InternalError) as got,
    ):
        client.get_study("x")
    assert "hunter2" not in got.value.message
    assert "internal error" in got.value.message


def test_unavailable_is_retried_then_raised() -> None:
    client = StudyClient("127.0.0.1:1", timeout=2, retries=2, backoff=0.01)
    with client, pytest.raises(errors.Unavailable):
        client.list_studies()
