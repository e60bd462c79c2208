"""Servicers: proto ⇄ domain conversion around the study service, and the tenancy checks
of server.auth (no-ops with auth off)."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.names import FAILURE_KINDS, STUDY_STATES, TRIAL_STATES
from stagetune.contract.spec import spec_from_proto, spec_to_proto, value_to_proto
from stagetune.server.auth import Tenancy, acquire_for_team, current_identity
from stagetune.server.records import RungRecord, StudyRecord, TrialRecord, TrialStateName
from stagetune.server.service import StudyService
from stagetune.server.trial_service import Acquired, NoWork, TrialService, WorkerFit
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import study_service_pb2_grpc as ss_grpc
from stagetune.v1 import types_pb2 as pb
from stagetune.v1 import worker_service_pb2 as ws
from stagetune.v1 import worker_service_pb2_grpc as ws_grpc

__all__ = ["StudyServicer", "WorkerServicer", "study_to_proto", "trial_to_proto"]

_STUDY_STATE = STUDY_STATES.to_proto
_TRIAL_STATE = TRIAL_STATES.to_proto
_TRIAL_STATE_NAME = TRIAL_STATES.from_proto
_FAILURE_KIND = FAILURE_KINDS.from_proto


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def study_to_proto(record: StudyRecord) -> pb.Study:
    c = record.counts
    return pb.Study(
        spec=spec_to_proto(record.spec),
        state=_STUDY_STATE[record.state],
        counts=pb.TrialCounts(
            waiting=c["waiting"],
            running=c["running"],
            complete=c["complete"],
            stopped=c["stopped"],
            failed=c["failed"],
            infeasible=c.get("infeasible", 0),
        ),
        create_time=_timestamp(record.created),
        mlflow_experiment_id=record.mlflow_experiment_id,
        mlflow_run_id=record.mlflow_run_id,
        hypervolume=record.hypervolume,
    )


def _rung_to_proto(rung: RungRecord) -> pb.RungReport:
    return pb.RungReport(step=rung.step, metrics=rung.metrics, report_time=_timestamp(rung.time))


def trial_to_proto(t: TrialRecord) -> pb.Trial:
    return pb.Trial(
        trial_id=t.trial_id,
        number=t.number,
        study_name=t.study_name,
        state=_TRIAL_STATE[t.state],
        params={k: value_to_proto(v) for k, v in t.params.items()},
        metrics=t.metrics,
        objective_values=list(t.values),
        rungs=[_rung_to_proto(r) for r in t.rungs],
        worker_id=t.worker_id,
        attempt=t.attempt,
        start_time=_timestamp(t.start),
        end_time=_timestamp(t.end),
        lease_expire_time=_timestamp(t.lease_expires),
        reason=t.reason,
        mlflow_run_id=t.mlflow_run_id,
        pareto_rank=t.pareto_rank,
    )


def _name(value: str, field: str = "study_name") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    return value


class StudyServicer(ss_grpc.StudyServiceServicer):
    def __init__(self, service: StudyService) -> None:
        self._service = service
        self._tenancy = Tenancy(service.store)

    def CreateStudy(
        self, request: ss.CreateStudyRequest, context: grpc.ServicerContext
    ) -> ss.CreateStudyResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        spec = spec_from_proto(request.spec)
        self._tenancy.before_create(spec)
        record, created = self._service.create_study(spec, self._tenancy.creating_team())
        self._tenancy.after_create(spec.name, created)
        return ss.CreateStudyResponse(study=study_to_proto(record), created=created)

    def GetStudy(self, request: ss.GetStudyRequest, context: grpc.ServicerContext) -> pb.Study:
        return study_to_proto(self._service.get_study(self._visible(request.study_name)))

    def ListStudies(
        self, request: ss.ListStudiesRequest, context: grpc.ServicerContext
    ) -> ss.ListStudiesResponse:
        return ss.ListStudiesResponse(
            studies=[study_to_proto(r) for r in self._tenancy.visible(self._service.list_studies())]
        )

    def StopStudy(self, request: ss.StopStudyRequest, context: grpc.ServicerContext) -> pb.Study:
        return study_to_proto(self._service.stop_study(self._visible(request.study_name)))

    def ListTrials(
        self, request: ss.ListTrialsRequest, context: grpc.ServicerContext
    ) -> ss.ListTrialsResponse:
        states: list[TrialStateName] = []
        for i, s in enumerate(request.states):
            if s not in _TRIAL_STATE_NAME:
                raise InvalidArgument(f"states[{i}]", f"unknown trial state {s}")
            states.append(_TRIAL_STATE_NAME[s])
        trials = self._service.list_trials(self._visible(request.study_name), states)
        return ss.ListTrialsResponse(trials=[trial_to_proto(t) for t in trials])

    def GetParetoFront(
        self, request: ss.GetParetoFrontRequest, context: grpc.ServicerContext
    ) -> ss.GetParetoFrontResponse:
        view = self._service.pareto_front(self._visible(request.study_name))
        return ss.GetParetoFrontResponse(
            objectives=spec_to_proto(view.spec).objectives,
            trials=[trial_to_proto(t) for t in view.front],
            hypervolume=view.hypervolume,
            knee_trial_id=view.knee_trial_id,
        )

    def _visible(self, study_name: str) -> str:
        name = _name(study_name)
        self._tenancy.check_study(name)
        return name


class WorkerServicer(ws_grpc.WorkerServiceServicer):
    def __init__(self, service: TrialService, tracking_uri: str = "") -> None:
        self._service = service
        self._tracking_uri = tracking_uri
        self._tenancy = Tenancy(service.store)

    def _acquire(self, worker_id: str, study_name: str, fit: WorkerFit | None) -> Acquired | NoWork:
        identity = current_identity()
        if identity is None or identity.is_admin:
            return self._service.acquire(worker_id, study_name, fit=fit)
        if study_name:
            self._tenancy.check_study(study_name)
            return self._service.acquire(worker_id, study_name, fit=fit)
        return acquire_for_team(self._service, worker_id, identity.team, fit)

    def AcquireTrial(
        self, request: ws.AcquireTrialRequest, context: grpc.ServicerContext
    ) -> ws.AcquireTrialResponse:
        # A worker from before capabilities were honoured sends none: it gets any trial.
        caps = request.capabilities if request.HasField("capabilities") else None
        fit = WorkerFit(caps.gpus, frozenset(caps.scripts)) if caps is not None else None
        result = self._acquire(request.worker_id, request.study_name, fit)
        if isinstance(result, Acquired):
            assignment = ws.Assignment(
                trial=trial_to_proto(result.trial),
                spec=spec_to_proto(result.spec),
                rung_steps=result.rung_steps,
                mlflow_tracking_uri=self._tracking_uri,
                mlflow_run_id=result.trial.mlflow_run_id,
            )
            assignment.lease_duration.FromNanoseconds(int(result.lease_seconds * 1e9))
            return ws.AcquireTrialResponse(assignment=assignment)
        no_trial = ws.NoTrial(reason=result.reason)
        no_trial.retry_after.FromNanoseconds(int(result.retry_after * 1e9))
        return ws.AcquireTrialResponse(no_trial=no_trial)

    def ReportProgress(
        self, request: ws.ReportProgressRequest, context: grpc.ServicerContext
    ) -> ws.ReportProgressResponse:
        self._tenancy.check_trial(request.trial_id)
        stop, reason, lease = self._service.report_progress(
            request.trial_id,
            request.worker_id,
            request.step,
            dict(request.metrics),
            request.request_id,
        )
        return ws.ReportProgressResponse(
            decision=pb.DECISION_STOP if stop else pb.DECISION_CONTINUE,
            reason=reason,
            lease_expire_time=_timestamp(lease),
        )

    def Heartbeat(
        self, request: ws.HeartbeatRequest, context: grpc.ServicerContext
    ) -> ws.HeartbeatResponse:
        self._tenancy.check_trial(request.trial_id)
        lease, should_stop = self._service.heartbeat(request.trial_id, request.worker_id)
        return ws.HeartbeatResponse(lease_expire_time=_timestamp(lease), should_stop=should_stop)

    def CompleteTrial(
        self, request: ws.CompleteTrialRequest, context: grpc.ServicerContext
    ) -> ws.CompleteTrialResponse:
        self._tenancy.check_trial(request.trial_id)
        trial = self._service.complete(
            request.trial_id, request.worker_id, dict(request.metrics), request.request_id
        )
        return ws.CompleteTrialResponse(trial=trial_to_proto(trial))

    def FailTrial(
        self, request: ws.FailTrialRequest, context: grpc.ServicerContext
    ) -> ws.FailTrialResponse:
        kind = _FAILURE_KIND.get(request.kind)
        if kind is None:
            raise InvalidArgument("kind", "must be CRASH, OUT_OF_MEMORY or INTERRUPTED")
        self._tenancy.check_trial(request.trial_id)
        trial, requeued = self._service.fail(
            request.trial_id,
            request.worker_id,
            kind,
            request.reason,
            request.request_id,
        )
        return ws.FailTrialResponse(trial=trial_to_proto(trial), requeued=requeued)
