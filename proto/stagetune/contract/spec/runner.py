"""The runner section, typed: where the model and the data come from, and the stage's
training settings (``stagetune.contract.training``).

A spec keeps ``runner`` as the team wrote it (JSON values, which is what travels on the
wire and is stored); ``parse_runner`` turns it into a ``RunnerSettings`` at the edge,
naming the field of the first bad value (``runner.training.zero_stage: must be one of
[0, 1, 2, 3], got 4``). The server parses it to validate a spec; a trial process parses
it again, with the trial's params on top, and reads nothing else. Shape only: no file is
opened here (``stagetune.contract.datafiles`` does that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.fields import as_mapping, as_number, check_known
from stagetune.contract.stages import RUNNER_KEYS, STAGES, StageDef
from stagetune.contract.training import TrainingSettings

__all__ = [
    "TINY_MODEL_KEYS",
    "ModelSource",
    "DataSource",
    "RunnerSettings",
    "parse_runner",
    "parse_training",
]

#: Settings of a tiny model built in code (``runner.model.tiny``); each an int >= 1.
TINY_MODEL_KEYS = frozenset({"hidden_size", "num_layers", "num_heads", "intermediate_size"})
_SYNTHETIC_TASKS = ("arithmetic",)


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """``runner.model``: exactly one of ``name_or_path`` and ``tiny``."""

    name_or_path: str | None = field(
        default=None,
        metadata={"help": "a local folder, a hub id, or an MLflow URI (runs:/…, models:/…)"},
    )
    tiny: dict[str, int] | None = field(
        default=None, metadata={"help": "build a tiny model in code with these settings"}
    )

    def as_mapping(self) -> dict[str, Any]:
        """The section as written (what ``tiny_model.ensure_model`` takes)."""
        if self.tiny is not None:
            return {"tiny": dict(self.tiny)}
        return {"name_or_path": self.name_or_path}


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """``runner.data``: the synthetic task, or a local file (JSON/JSONL, gzipped or not,
    Parquet, or a saved ``datasets`` folder) with the columns each stage reads."""

    synthetic: str = field(
        default="arithmetic", metadata={"help": "the synthetic task, used when path is unset"}
    )
    path: str | None = field(default=None, metadata={"help": "a local data file or folder"})
    train_size: int = field(default=256, metadata={"help": "training examples (at most)"})
    eval_size: int = field(default=32, metadata={"help": "held-out examples (at most)"})
    prompt_columns: tuple[str, ...] = field(
        default=("prompt",),
        metadata={"help": "columns joined by newlines into the prompt (DPO: may be empty)"},
    )
    completion_column: str = field(default="completion", metadata={"help": "SFT target"})
    text_column: str = field(default="text", metadata={"help": "pretraining text"})
    chosen_column: str = field(default="chosen", metadata={"help": "preferred reply"})
    rejected_column: str = field(default="rejected", metadata={"help": "dispreferred reply"})

    def columns(self, keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """``runner.data`` key -> the file columns it maps, for ``keys``; a key that maps
        none (DPO without prompt columns) is left out."""
        out: dict[str, tuple[str, ...]] = {}
        for key in keys:
            value = getattr(self, key)
            names = value if isinstance(value, tuple) else (value,)
            if names:
                out[key] = names
        return out


@dataclass(frozen=True, kw_only=True)
class RunnerSettings:
    """A study's whole ``runner`` section, typed."""

    model: ModelSource
    data: DataSource
    training: TrainingSettings
    cache_dir: str | None = field(
        default=None, metadata={"help": "models built or downloaded (default: ~/.cache)"}
    )
    processes: int | None = field(
        default=None, metadata={"help": "processes per trial (unset: the worker's setting)"}
    )
    save_model: bool = field(
        default=False, metadata={"help": "save the trained model for a next stage"}
    )


def _stage(name: str) -> StageDef:
    stage = STAGES.get(name)
    if stage is None:
        raise InvalidArgument("stage", f"unknown stage {name!r}; one of {sorted(STAGES)}")
    return stage


def _model(data: Mapping[str, Any]) -> ModelSource:
    if ("name_or_path" in data) == ("tiny" in data):
        raise InvalidArgument("runner.model", "needs exactly one of name_or_path or tiny")
    check_known(data, {"name_or_path", "tiny"}, "runner.model")
    if "tiny" in data:
        tiny = as_mapping(data["tiny"], "runner.model.tiny")
        check_known(tiny, TINY_MODEL_KEYS, "runner.model.tiny")
        sizes: dict[str, int] = {}
        for key, value in tiny.items():
            sizes[key] = as_number(value, f"runner.model.tiny.{key}", int)
            if sizes[key] < 1:
                raise InvalidArgument(f"runner.model.tiny.{key}", "must be >= 1")
        return ModelSource(tiny=sizes)
    name = data["name_or_path"]
    if not isinstance(name, str) or not name:
        raise InvalidArgument("runner.model.name_or_path", "must be a non-empty string")
    return ModelSource(name_or_path=name)


def _data(stage: StageDef, data: Mapping[str, Any]) -> DataSource:
    if ("synthetic" in data) == ("path" in data):
        raise InvalidArgument("runner.data", "needs exactly one of synthetic or path")
    keys = {"synthetic", "path", "train_size", "eval_size", *stage.data_columns}
    check_known(data, keys, "runner.data")
    values: dict[str, Any] = dict(stage.data_defaults)
    if "synthetic" in data:
        if data["synthetic"] not in _SYNTHETIC_TASKS:
            raise InvalidArgument("runner.data.synthetic", "the synthetic task is 'arithmetic'")
        values["synthetic"] = data["synthetic"]
    if "path" in data:
        if not isinstance(data["path"], str) or not data["path"]:
            raise InvalidArgument("runner.data.path", "must be a non-empty string")
        values["path"] = data["path"]
    for key in stage.data_columns:
        if key not in data:
            continue
        value = data[key]
        many = key == "prompt_columns"
        names = value if many else [value]
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(c, str) and c for c in names)
        ):
            want = "a non-empty list of column names" if many else "a name"
            raise InvalidArgument(f"runner.data.{key}", f"must be {want}")
        values[key] = tuple(names) if many else value
    for key in ("train_size", "eval_size"):
        if key in data:
            values[key] = as_number(data[key], f"runner.data.{key}", int)
            if values[key] < 1:
                raise InvalidArgument(f"runner.data.{key}", "must be >= 1")
    return DataSource(**values)


def parse_training(
    stage: str, data: Mapping[str, Any], where: str = "runner.training"
) -> TrainingSettings:
    """The stage's training settings from fixed values (a mapping of knob -> value),
    defaults for the rest; ``InvalidArgument`` names ``where.knob`` of a bad one."""
    known = _stage(stage)
    check_known(data, known.training_keys, where)
    values = {}
    for key, value in data.items():
        knob = known.knob(key)
        assert knob is not None
        values[key] = knob.coerce(value, f"{where}.{key}")
    return known.settings(**values)


def parse_runner(
    stage: str, runner: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> RunnerSettings:
    """A spec's ``runner`` section, typed, for ``stage``; a trial's ``params`` (its
    sampled values) override the fixed training values. ``InvalidArgument`` names the
    first bad field (``runner.data.path``, ``params.lora_r``)."""
    known = _stage(stage)
    check_known(runner, RUNNER_KEYS, "runner")
    model = _model(as_mapping(runner.get("model"), "runner.model"))
    data = _data(known, as_mapping(runner.get("data"), "runner.data"))
    training = parse_training(stage, as_mapping(runner.get("training"), "runner.training"))
    if params:
        sampled = parse_training(stage, params, "params")
        training = dataclasses.replace(training, **{k: getattr(sampled, k) for k in params})
    cache_dir = runner.get("cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
        raise InvalidArgument("runner.cache_dir", "must be a non-empty string")
    processes = runner.get("processes")
    if processes is not None:
        processes = as_number(processes, "runner.processes", int)
        if processes < 1:
            raise InvalidArgument("runner.processes", "must be >= 1")
    save_model = runner.get("save_model", False)
    if not isinstance(save_model, bool):
        raise InvalidArgument("runner.save_model", "must be true or false")
    return RunnerSettings(
        model=model,
        data=data,
        training=training,
        cache_dir=cache_dir,
        processes=processes,
        save_model=save_model,
    )
