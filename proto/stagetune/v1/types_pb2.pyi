import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_PRETRAIN_PROXY: _ClassVar[Stage]
    STAGE_SFT: _ClassVar[Stage]
    STAGE_LORA: _ClassVar[Stage]
    STAGE_DPO: _ClassVar[Stage]
    STAGE_GRPO: _ClassVar[Stage]
    STAGE_CUSTOM: _ClassVar[Stage]

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_MINIMIZE: _ClassVar[Direction]
    DIRECTION_MAXIMIZE: _ClassVar[Direction]

class SamplerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_KIND_UNSPECIFIED: _ClassVar[SamplerKind]
    SAMPLER_KIND_TPE: _ClassVar[SamplerKind]
    SAMPLER_KIND_NSGA2: _ClassVar[SamplerKind]
    SAMPLER_KIND_RANDOM: _ClassVar[SamplerKind]

class EarlyStopping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EARLY_STOPPING_UNSPECIFIED: _ClassVar[EarlyStopping]
    EARLY_STOPPING_NONE: _ClassVar[EarlyStopping]
    EARLY_STOPPING_MO_ASHA: _ClassVar[EarlyStopping]

class StudyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STUDY_STATE_UNSPECIFIED: _ClassVar[StudyState]
    STUDY_STATE_RUNNING: _ClassVar[StudyState]
    STUDY_STATE_STOPPED: _ClassVar[StudyState]
    STUDY_STATE_DONE: _ClassVar[StudyState]

class TrialState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIAL_STATE_UNSPECIFIED: _ClassVar[TrialState]
    TRIAL_STATE_WAITING: _ClassVar[TrialState]
    TRIAL_STATE_RUNNING: _ClassVar[TrialState]
    TRIAL_STATE_COMPLETE: _ClassVar[TrialState]
    TRIAL_STATE_STOPPED: _ClassVar[TrialState]
    TRIAL_STATE_FAILED: _ClassVar[TrialState]
    TRIAL_STATE_INFEASIBLE: _ClassVar[TrialState]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_CONTINUE: _ClassVar[Decision]
    DECISION_STOP: _ClassVar[Decision]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    FAILURE_KIND_CRASH: _ClassVar[FailureKind]
    FAILURE_KIND_OUT_OF_MEMORY: _ClassVar[FailureKind]
    FAILURE_KIND_INTERRUPTED: _ClassVar[FailureKind]
STAGE_UNSPECIFIED: Stage
STAGE_PRETRAIN_PROXY: Stage
STAGE_SFT: Stage
STAGE_LORA: Stage
STAGE_DPO: Stage
STAGE_GRPO: Stage
STAGE_CUSTOM: Stage
DIRECTION_UNSPECIFIED: Direction
DIRECTION_MINIMIZE: Direction
DIRECTION_MAXIMIZE: Direction
SAMPLER_KIND_UNSPECIFIED: SamplerKind
SAMPLER_KIND_TPE: SamplerKind
SAMPLER_KIND_NSGA2: SamplerKind
SAMPLER_KIND_RANDOM: SamplerKind
EARLY_STOPPING_UNSPECIFIED: EarlyStopping
EARLY_STOPPING_NONE: EarlyStopping
EARLY_STOPPING_MO_ASHA: EarlyStopping
STUDY_STATE_UNSPECIFIED: StudyState
STUDY_STATE_RUNNING: StudyState
STUDY_STATE_STOPPED: StudyState
STUDY_STATE_DONE: StudyState
TRIAL_STATE_UNSPECIFIED: TrialState
TRIAL_STATE_WAITING: TrialState
TRIAL_STATE_RUNNING: TrialState
TRIAL_STATE_COMPLETE: TrialState
TRIAL_STATE_STOPPED: TrialState
TRIAL_STATE_FAILED: TrialState
TRIAL_STATE_INFEASIBLE: TrialState
DECISION_UNSPECIFIED: Decision
DECISION_CONTINUE: Decision
DECISION_STOP: Decision
FAILURE_KIND_UNSPECIFIED: FailureKind
FAILURE_KIND_CRASH: FailureKind
FAILURE_KIND_OUT_OF_MEMORY: FailureKind
FAILURE_KIND_INTERRUPTED: FailureKind

class FloatRange(_message.Message):
    __slots__ = ("low", "high", "log", "step")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    log: bool
    step: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., log: _Optional[bool] = ..., step: _Optional[float] = ...) -> None: ...

class IntRange(_message.Message):
    __slots__ = ("low", "high", "log", "step")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    low: int
    high: int
    log: bool
    step: int
    def __init__(self, low: _Optional[int] = ..., high: _Optional[int] = ..., log: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class ParameterValue(_message.Message):
    __slots__ = ("float_value", "int_value", "string_value", "bool_value")
    FLOAT_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    float_value: float
    int_value: int
    string_value: str
    bool_value: bool
    def __init__(self, float_value: _Optional[float] = ..., int_value: _Optional[int] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class Categorical(_message.Message):
    __slots__ = ("choices",)
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[ParameterValue]
    def __init__(self, choices: _Optional[_Iterable[_Union[ParameterValue, _Mapping]]] = ...) -> None: ...

class ParameterSpec(_message.Message):
    __slots__ = ("name", "float_range", "int_range", "categorical")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLOAT_RANGE_FIELD_NUMBER: _ClassVar[int]
    INT_RANGE_FIELD_NUMBER: _ClassVar[int]
    CATEGORICAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    float_range: FloatRange
    int_range: IntRange
    categorical: Categorical
    def __init__(self, name: _Optional[str] = ..., float_range: _Optional[_Union[FloatRange, _Mapping]] = ..., int_range: _Optional[_Union[IntRange, _Mapping]] = ..., categorical: _Optional[_Union[Categorical, _Mapping]] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("metric", "direction", "reference")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    metric: str
    direction: Direction
    reference: float
    def __init__(self, metric: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., reference: _Optional[float] = ...) -> None: ...

class Fidelity(_message.Message):
    __slots__ = ("min_steps", "max_steps", "reduction_factor", "min_reports", "brackets")
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_REPORTS_FIELD_NUMBER: _ClassVar[int]
    BRACKETS_FIELD_NUMBER: _ClassVar[int]
    min_steps: int
    max_steps: int
    reduction_factor: float
    min_reports: int
    brackets: int
    def __init__(self, min_steps: _Optional[int] = ..., max_steps: _Optional[int] = ..., reduction_factor: _Optional[float] = ..., min_reports: _Optional[int] = ..., brackets: _Optional[int] = ...) -> None: ...

class SamplerSpec(_message.Message):
    __slots__ = ("kind", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: SamplerKind
    seed: int
    def __init__(self, kind: _Optional[_Union[SamplerKind, str]] = ..., seed: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_trials", "max_retries", "max_device_hours")
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_HOURS_FIELD_NUMBER: _ClassVar[int]
    max_trials: int
    max_retries: int
    max_device_hours: float
    def __init__(self, max_trials: _Optional[int] = ..., max_retries: _Optional[int] = ..., max_device_hours: _Optional[float] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("metric", "max", "min")
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    metric: str
    max: float
    min: float
    def __init__(self, metric: _Optional[str] = ..., max: _Optional[float] = ..., min: _Optional[float] = ...) -> None: ...

class WarmStart(_message.Message):
    __slots__ = ("studies", "defaults")
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedScalarFieldContainer[str]
    defaults: bool
    def __init__(self, studies: _Optional[_Iterable[str]] = ..., defaults: _Optional[bool] = ...) -> None: ...

class StudySpec(_message.Message):
    __slots__ = ("name", "stage", "search_space", "objectives", "fidelity", "sampler", "budget", "runner", "early_stopping", "constraints", "warm_start")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SPACE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    RUNNER_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    name: str
    stage: Stage
    search_space: _containers.RepeatedCompositeFieldContainer[ParameterSpec]
    objectives: _containers.RepeatedCompositeFieldContainer[Objective]
    fidelity: Fidelity
    sampler: SamplerSpec
    budget: Budget
    runner: _struct_pb2.Struct
    early_stopping: EarlyStopping
    constraints: _containers.RepeatedCompositeFieldContainer[Constraint]
    warm_start: WarmStart
    def __init__(self, name: _Optional[str] = ..., stage: _Optional[_Union[Stage, str]] = ..., search_space: _Optional[_Iterable[_Union[ParameterSpec, _Mapping]]] = ..., objectives: _Optional[_Iterable[_Union[Objective, _Mapping]]] = ..., fidelity: _Optional[_Union[Fidelity, _Mapping]] = ..., sampler: _Optional[_Union[SamplerSpec, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., runner: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., early_stopping: _Optional[_Union[EarlyStopping, str]] = ..., constraints: _Optional[_Iterable[_Union[Constraint, _Mapping]]] = ..., warm_start: _Optional[_Union[WarmStart, _Mapping]] = ...) -> None: ...

class TrialCounts(_message.Message):
    __slots__ = ("waiting", "running", "complete", "stopped", "failed", "infeasible")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    INFEASIBLE_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    complete: int
    stopped: int
    failed: int
    infeasible: int
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., complete: _Optional[int] = ..., stopped: _Optional[int] = ..., failed: _Optional[int] = ..., infeasible: _Optional[int] = ...) -> None: ...

class Study(_message.Message):
    __slots__ = ("spec", "state", "counts", "create_time", "mlflow_experiment_id", "mlflow_run_id", "hypervolume")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HYPERVOLUME_FIELD_NUMBER: _ClassVar[int]
    spec: StudySpec
    state: StudyState
    counts: TrialCounts
    create_time: _timestamp_pb2.Timestamp
    mlflow_experiment_id: str
    mlflow_run_id: str
    hypervolume: float
    def __init__(self, spec: _Optional[_Union[StudySpec, _Mapping]] = ..., state: _Optional[_Union[StudyState, str]] = ..., counts: _Optional[_Union[TrialCounts, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mlflow_experiment_id: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., hypervolume: _Optional[float] = ...) -> None: ...

class RungReport(_message.Message):
    __slots__ = ("step", "metrics", "report_time")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    step: int
    metrics: _containers.ScalarMap[str, float]
    report_time: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("trial_id", "number", "study_name", "state", "params", "metrics", "objective_values", "rungs", "worker_id", "attempt", "start_time", "end_time", "lease_expire_time", "reason", "mlflow_run_id", "pareto_rank")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ParameterValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ParameterValue, _Mapping]] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STUDY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_VALUES_FIELD_NUMBER: _ClassVar[int]
    RUNGS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARETO_RANK_FIELD_NUMBER: _ClassVar[int]
    trial_id: int
    number: int
    study_name: str
    state: TrialState
    params: _containers.MessageMap[str, ParameterValue]
    metrics: _containers.ScalarMap[str, float]
    objective_values: _containers.RepeatedScalarFieldContainer[float]
    rungs: _containers.RepeatedCompositeFieldContainer[RungReport]
    worker_id: str
    attempt: int
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    lease_expire_time: _timestamp_pb2.Timestamp
    reason: str
    mlflow_run_id: str
    pareto_rank: int
    def __init__(self, trial_id: _Optional[int] = ..., number: _Optional[int] = ..., study_name: _Optional[str] = ..., state: _Optional[_Union[TrialState, str]] = ..., params: _Optional[_Mapping[str, ParameterValue]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., objective_values: _Optional[_Iterable[float]] = ..., rungs: _Optional[_Iterable[_Union[RungReport, _Mapping]]] = ..., worker_id: _Optional[str] = ..., attempt: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., mlflow_run_id: _Optional[str] = ..., pareto_rank: _Optional[int] = ...) -> None: ...
