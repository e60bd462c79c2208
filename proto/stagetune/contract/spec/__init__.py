"""Study specs: typed domain objects, parsed once from YAML and validated at the edge.

A ``StudySpec`` is what a team submits. ``load_spec_file`` reads YAML with the strict
reader, ``spec_from_mapping`` builds the typed spec, and ``validate_spec`` checks it,
raising ``InvalidArgument`` that names the offending field (``search_space.learning_rate.low:
must be > 0 when log is set``). The server validates again after converting from the wire,
so a spec that did not come through the CLI gets the same checks. ``spec_to_proto`` and
``spec_from_proto`` convert to and from ``stagetune.v1.StudySpec``.

One module per job: ``model`` (the dataclasses), ``strict_yaml`` (the reader),
``parsing`` (mapping -> spec), ``runner`` (the runner section, typed), ``validation``
(ranges and cross-field rules), ``wire`` (spec <-> proto); ``fields`` holds the one-field
readers they share. Import from here.
"""

from stagetune.contract.spec.model import (
    BudgetSpec,
    CategoricalParam,
    ConstraintSpec,
    Direction,
    EarlyStoppingName,
    FidelitySpec,
    FloatParam,
    IntParam,
    ObjectiveSpec,
    ParamSpec,
    ParamValue,
    SamplerConfig,
    SamplerName,
    StudySpec,
    WarmStartSpec,
)
from stagetune.contract.spec.parsing import load_spec_file, spec_from_mapping
from stagetune.contract.spec.runner import (
    DEFAULT_MAX_OVERLAP,
    DataSource,
    DataSplit,
    EvaluateSplit,
    ModelSource,
    RunnerSettings,
    parse_runner,
    parse_training,
)
from stagetune.contract.spec.strict_yaml import MAX_SPEC_BYTES, read_yaml_file
from stagetune.contract.spec.validation import (
    LIMITS,
    MAX_MAGNITUDE,
    check_bounded,
    check_count,
    validate_spec,
)
from stagetune.contract.spec.wire import (
    spec_from_proto,
    spec_to_proto,
    value_from_proto,
    value_to_proto,
)

__all__ = [
    "ParamValue",
    "Direction",
    "SamplerName",
    "EarlyStoppingName",
    "FloatParam",
    "IntParam",
    "CategoricalParam",
    "ParamSpec",
    "ObjectiveSpec",
    "ConstraintSpec",
    "WarmStartSpec",
    "FidelitySpec",
    "SamplerConfig",
    "BudgetSpec",
    "StudySpec",
    "ModelSource",
    "DataSource",
    "DataSplit",
    "EvaluateSplit",
    "DEFAULT_MAX_OVERLAP",
    "RunnerSettings",
    "parse_runner",
    "parse_training",
    "MAX_SPEC_BYTES",
    "MAX_MAGNITUDE",
    "read_yaml_file",
    "check_bounded",
    "check_count",
    "LIMITS",
    "load_spec_file",
    "spec_from_mapping",
    "validate_spec",
    "spec_to_proto",
    "spec_from_proto",
    "value_to_proto",
    "value_from_proto",
]
