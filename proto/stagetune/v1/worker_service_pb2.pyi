import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from stagetune.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerCapabilities(_message.Message):
    __slots__ = ("hostname", "gpus", "processes", "scripts")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    SCRIPTS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    gpus: int
    processes: int
    scripts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hostname: _Optional[str] = ..., gpus: _Optional[int] = ..., processes: _Optional[int] = ..., scripts: _Optional[_Iterable[str]] = ...) -> None: ...

class AcquireTrialRequest(_message.Message):
    __slots__ = ("worker_id", "capabilities", "study_name")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    capabilities: WorkerCapabilities
    study_name: str
    def __init__(self, worker_id: _Optional[str] = ..., capabilities: _Optional[_Union[WorkerCapabilities, _Mapping]] = ..., study_name: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("trial", "spec", "rung_steps", "lease_duration", "mlflow_tracking_uri", "mlflow_run_id")
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RUNG_STEPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_TRACKING_URI_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    trial: _types_pb2.Trial
    spec: _types_pb2.StudySpec
    rung_steps: _containers.RepeatedScalarFieldContainer[int]
    lease_duration: _duration_pb2.Duration
    mlflow_tracking_uri: str
    mlflow_run_id: str
    def __init__(self, trial: _Optional[_Union[_types_pb2.Trial, _Mapping]] = ..., spec: _Optional[_Union[_types_pb2.StudySpec, _Mapping]] = ..., rung_steps: _Optional[_Iterable[int]] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., mlflow_tracking_uri: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ...) -> None: ...

class NoTrial(_message.Message):
    __slots__ = ("retry_after", "reason")
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after: _duration_pb2.Duration
    reason: str
    def __init__(self, retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class AcquireTrialResponse(_message.Message):
    __slots__ = ("assignment", "no_trial")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    NO_TRIAL_FIELD_NUMBER: _ClassVar[int]
    assignment: Assignment
    no_trial: NoTrial
    def __init__(self, assignment: _Optional[_Union[Assignment, _Mapping]] = ..., no_trial: _Optional[_Union[NoTrial, _Mapping]] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("trial_id", "worker_id", "step", "metrics", "request_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    trial_id: int
    worker_id: str
    step: int
    metrics: _containers.ScalarMap[str, float]
    request_id: str
    def __init__(self, trial_id: _Optional[int] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ("decision", "reason", "lease_expire_time")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    decision: _types_pb2.Decision
    reason: str
    lease_expire_time: _timestamp_pb2.Timestamp
    def __init__(self, decision: _Optional[_Union[_types_pb2.Decision, str]] = ..., reason: _Optional[str] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("trial_id", "worker_id")
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    trial_id: int
    worker_id: str
    def __init__(self, trial_id: _Optional[int] = ..., worker_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expire_time", "should_stop")
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    SHOULD_STOP_FIELD_NUMBER: _ClassVar[int]
    lease_expire_time: _timestamp_pb2.Timestamp
    should_stop: bool
    def __init__(self, lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., should_stop: _Optional[bool] = ...) -> None: ...

class CompleteTrialRequest(_message.Message):
    __slots__ = ("trial_id", "worker_id", "metrics", "request_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    trial_id: int
    worker_id: str
    metrics: _containers.ScalarMap[str, float]
    request_id: str
    def __init__(self, trial_id: _Optional[int] = ..., worker_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CompleteTrialResponse(_message.Message):
    __slots__ = ("trial",)
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    trial: _types_pb2.Trial
    def __init__(self, trial: _Optional[_Union[_types_pb2.Trial, _Mapping]] = ...) -> None: ...

class FailTrialRequest(_message.Message):
    __slots__ = ("trial_id", "worker_id", "kind", "reason", "request_id")
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    trial_id: int
    worker_id: str
    kind: _types_pb2.FailureKind
    reason: str
    request_id: str
    def __init__(self, trial_id: _Optional[int] = ..., worker_id: _Optional[str] = ..., kind: _Optional[_Union[_types_pb2.FailureKind, str]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FailTrialResponse(_message.Message):
    __slots__ = ("trial", "requeued")
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    trial: _types_pb2.Trial
    requeued: bool
    def __init__(self, trial: _Optional[_Union[_types_pb2.Trial, _Mapping]] = ..., requeued: _Optional[bool] = ...) -> None: ...
