"""The runner section, typed: where the model and the data come from, and the stage's
training settings (``stagetune.contract.training``).

A spec keeps ``runner`` as the team wrote it (JSON values, which is what travels on the
wire and is stored); ``parse_runner`` turns it into a ``RunnerSettings`` at the edge,
naming the field of the first bad value (``runner.training.zero_stage: must be one of
[0, 1, 2, 3], got 4``). The server parses it to validate a spec; a trial process parses
it again, with the trial's params on top, and reads nothing else. Shape only: no file is
opened here (``stagetune.contract.datafiles`` does that).

Honest evaluation lives here too: ``runner.data.split`` (how a source is cut into train /
eval / test by a hash of each example, done by ``stagetune.trainer.splits``),
``runner.data.max_overlap`` (the most near-duplicate overlap between splits a trial accepts)
and ``runner.evaluate`` (a trial that trains nothing and scores ``runner.model`` on the
held-out split it names; only such a trial ever reads test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.fields import as_mapping, as_number, check_known
from stagetune.contract.stages import RUNNER_KEYS, STAGES, StageDef
from stagetune.contract.training import TrainingSettings

__all__ = [
    "TINY_MODEL_KEYS",
    "DEFAULT_MAX_OVERLAP",
    "EvaluateSplit",
    "ModelSource",
    "DataSplit",
    "DataSource",
    "RunnerSettings",
    "parse_runner",
    "parse_training",
]

#: Settings of a tiny model built in code (``runner.model.tiny``); each an int >= 1.
TINY_MODEL_KEYS = frozenset({"hidden_size", "num_layers", "num_heads", "intermediate_size"})
_SYNTHETIC_TASKS = ("arithmetic",)
_SPLITS = ("train", "eval", "test")

#: The held-out split an evaluation trial scores its model on.
EvaluateSplit = Literal["eval", "test"]

#: Above this fraction of a held-out split sharing text (exact or a 13-gram) with an earlier
#: split, a trial refuses to start; below it the overlapping held-out rows are dropped.
#: Real data passes: GSM8K's rephrased problems overlap ~1.3% (eval) and ~1.1% (test) of
#: rows, hh-rlhf split by its opening human turn 0%; a split key that keeps no related
#: examples together does not (hh-rlhf split row by row: ~7% of eval, ~9% of test).
DEFAULT_MAX_OVERLAP = 0.02


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
class DataSplit:
    """``runner.data.split``: each example's split is decided by a hash of its key fields,
    so the same example lands in the same split in every trial and adding rows moves none.

    YAML: ``{fractions: {train: 0.8, eval: 0.1, test: 0.1}, fields: [...], prefix_until:
    "..."}``, every key optional.
    """

    fractions: tuple[float, float, float] = field(
        default=(0.8, 0.1, 0.1), metadata={"help": "train, eval and test shares (sum 1)"}
    )
    fields: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "the fields that identify an example (default: the prompt columns; "
            "the text column for pretraining; DPO without prompt columns: the chosen "
            "text up to its first assistant turn, so dialogues that open alike share a split)"
        },
    )
    prefix_until: str | None = field(
        default=None, metadata={"help": "key each field on its start, up to this marker"}
    )

    def fraction(self, split: str) -> float:
        return self.fractions[_SPLITS.index(split)]


@dataclass(frozen=True, kw_only=True)
class DataSource:
    """``runner.data``: the synthetic task, or a local file (JSON/JSONL, gzipped or not,
    Parquet, or a saved ``datasets`` folder) with the columns each stage reads."""

    synthetic: str = field(
        default="arithmetic", metadata={"help": "the synthetic task, used when path is unset"}
    )
    path: str | None = field(default=None, metadata={"help": "a local data file or folder"})
    train_size: int = field(default=256, metadata={"help": "training examples (at most)"})
    eval_size: int = field(default=32, metadata={"help": "eval examples (at most)"})
    test_size: int | None = field(
        default=None, metadata={"help": "test examples an evaluation reads (default: eval_size)"}
    )
    split: DataSplit = field(default_factory=DataSplit, metadata={"help": "see DataSplit"})
    max_overlap: float = field(
        default=DEFAULT_MAX_OVERLAP,
        metadata={"help": "refuse splits overlapping more than this fraction (0 to 1)"},
    )
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

    def size(self, split: str) -> int:
        """How many rows of ``split`` a trial reads (at most)."""
        if split == "train":
            return self.train_size
        if split == "test" and self.test_size is not None:
            return self.test_size
        return self.eval_size


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
    evaluate: EvaluateSplit | None = field(
        default=None,
        metadata={
            "help": "train nothing: score runner.model on this held-out split (eval or "
            "test) and report every objective measured there"
        },
    )
    reference_model: ModelSource | None = field(
        default=None,
        metadata={
            "help": "DPO: the model the policy's implicit reward is measured against (what "
            "it was trained from); needed to evaluate a trained DPO model"
        },
    )


def _stage(name: str) -> StageDef:
    stage = STAGES.get(name)
    if stage is None:
        raise InvalidArgument("stage", f"unknown stage {name!r}; one of {sorted(STAGES)}")
    return stage


def _model(data: Mapping[str, Any], where: str = "runner.model") -> ModelSource:
    if ("name_or_path" in data) == ("tiny" in data):
        raise InvalidArgument(where, "needs exactly one of name_or_path or tiny")
    check_known(data, {"name_or_path", "tiny"}, where)
    if "tiny" in data:
        tiny = as_mapping(data["tiny"], f"{where}.tiny")
        check_known(tiny, TINY_MODEL_KEYS, f"{where}.tiny")
        sizes: dict[str, int] = {}
        for key, value in tiny.items():
            sizes[key] = as_number(value, f"{where}.tiny.{key}", int)
            if sizes[key] < 1:
                raise InvalidArgument(f"{where}.tiny.{key}", "must be >= 1")
        return ModelSource(tiny=sizes)
    name = data["name_or_path"]
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{where}.name_or_path", "must be a non-empty string")
    return ModelSource(name_or_path=name)


def _data(stage: StageDef, data: Mapping[str, Any]) -> DataSource:
    if ("synthetic" in data) == ("path" in data):
        raise InvalidArgument("runner.data", "needs exactly one of synthetic or path")
    keys = {"synthetic", "path", *_SIZES, "split", "max_overlap", *stage.data_columns}
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
    for key in _SIZES:
        if key in data:
            values[key] = as_number(data[key], f"runner.data.{key}", int)
            if values[key] < 1:
                raise InvalidArgument(f"runner.data.{key}", "must be >= 1")
    if "split" in data:
        values["split"] = _split(as_mapping(data["split"], "runner.data.split"))
    if "max_overlap" in data:
        limit = as_number(data["max_overlap"], "runner.data.max_overlap")
        if not 0.0 <= limit <= 1.0:
            raise InvalidArgument(
                "runner.data.max_overlap", f"must be between 0 and 1, got {limit}"
            )
        values["max_overlap"] = limit
    return DataSource(**values)


_SIZES = ("train_size", "eval_size", "test_size")


def _split(data: Mapping[str, Any]) -> DataSplit:
    where = "runner.data.split"
    check_known(data, {"fractions", "fields", "prefix_until"}, where)
    values: dict[str, Any] = {}
    if "fractions" in data:
        given = as_mapping(data["fractions"], f"{where}.fractions")
        check_known(given, set(_SPLITS), f"{where}.fractions")
        shares = dict(zip(_SPLITS, DataSplit().fractions, strict=True))
        for name, value in given.items():
            shares[name] = as_number(value, f"{where}.fractions.{name}")
            if not 0.0 <= shares[name] <= 1.0:
                raise InvalidArgument(
                    f"{where}.fractions.{name}", f"must be between 0 and 1, got {value}"
                )
        total = sum(shares.values())
        if abs(total - 1.0) > 1e-9:
            raise InvalidArgument(
                f"{where}.fractions", f"train + eval + test must be 1, got {total:g}"
            )
        values["fractions"] = tuple(shares[name] for name in _SPLITS)
    if "fields" in data:
        fields = data["fields"]
        if (
            not isinstance(fields, list)
            or not fields
            or not all(isinstance(f, str) and f for f in fields)
        ):
            raise InvalidArgument(f"{where}.fields", "must be a non-empty list of field names")
        values["fields"] = tuple(fields)
    if "prefix_until" in data:
        marker = data["prefix_until"]
        if not isinstance(marker, str) or not marker:
            raise InvalidArgument(f"{where}.prefix_until", "must be a non-empty string")
        values["prefix_until"] = marker
    return DataSplit(**values)


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
    evaluate = runner.get("evaluate")
    if evaluate is not None and evaluate not in get_args(EvaluateSplit):
        raise InvalidArgument("runner.evaluate", f"must be eval or test, got {evaluate!r}")
    _check_fractions(data.split, evaluate)
    reference = None
    if "reference_model" in runner:
        if stage != "dpo":
            raise InvalidArgument("runner.reference_model", "only the dpo stage has a reference")
        where = "runner.reference_model"
        reference = _model(as_mapping(runner["reference_model"], where), where)
    return RunnerSettings(
        model=model,
        data=data,
        training=training,
        cache_dir=cache_dir,
        processes=processes,
        save_model=save_model,
        evaluate=evaluate,
        reference_model=reference,
    )


def _check_fractions(split: DataSplit, evaluate: str | None) -> None:
    """A training trial needs train and eval rows; an evaluation needs its split's."""
    needed = ("train", "eval") if evaluate is None else (evaluate,)
    for name in needed:
        if split.fraction(name) <= 0:
            why = "an evaluation reads it" if evaluate else "a training trial reads it"
            raise InvalidArgument(f"runner.data.split.fractions.{name}", f"must be > 0: {why}")
