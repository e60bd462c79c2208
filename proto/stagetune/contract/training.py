"""Each stage's training settings as a typed dataclass (as trl's ``SFTConfig`` and
``DPOConfig`` are): one field per knob of ``runner.training``, with its default and its
``help``, and, in the same field's metadata, the values that make sense.

A knob is searchable (it may appear in ``search_space``) unless marked
``searchable=False``; either kind may be fixed under ``runner.training``. The stage
registry (``stagetune.contract.stages``) derives each stage's knobs from these classes,
``stagetune.contract.spec.runner`` parses the runner section into them, and the trainer
reads nothing else: a default lives here and only here.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from stagetune.contract.errors import InvalidArgument

ParamKind = Literal["float", "int", "str", "bool"]
Value = float | int | str | bool

__all__ = [
    "ParamKind",
    "ParamDef",
    "REWARD_FUNCTIONS",
    "TrainingSettings",
    "PretrainProxyTraining",
    "SFTTraining",
    "AdapterShape",
    "LoRATraining",
    "DPOTraining",
    "GRPOTraining",
    "CustomTraining",
    "knobs",
]

#: Reward functions a GRPO study may name in ``runner.training.reward_functions``.
REWARD_FUNCTIONS: dict[str, str] = {
    "exact_match": "1.0 when the last number in the completion equals the row's answer, else 0",
    "has_number": "1.0 when the completion contains a number at all (a format reward), else 0",
}


@dataclass(frozen=True)
class ParamDef:
    """One tunable or fixable knob: its value kind and the values that make sense."""

    kind: ParamKind
    choices: tuple[Value, ...] | None = None  # the only valid values, when listed
    low: float | None = None  # smallest valid value, inclusive
    high: float | None = None  # largest valid value, inclusive
    positive: bool = False  # must be > 0
    help: str = ""
    searchable: bool = True  # may appear in search_space (else only fixed)
    many: bool = False  # a list of values, each one of choices

    def check(self, value: Value) -> str | None:
        """Why ``value`` is not valid for this knob, or None when it is."""
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.positive and value <= 0:
            return f"must be > 0, got {value}"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}, got {value}"
        return None

    def of_kind(self, value: Any) -> bool:
        """Whether ``value`` is a value of this kind (an int is a float; a bool is not a
        number)."""
        if isinstance(value, bool):
            return self.kind == "bool"
        if self.kind == "float":
            return isinstance(value, (int, float))
        if self.kind == "int":
            return isinstance(value, int)
        return self.kind == "str" and isinstance(value, str)

    def coerce(self, value: Any, where: str) -> Any:
        """A valid fixed value of this knob in its field's type (an int given for a float
        knob becomes a float; a list of names, or one comma-separated string, a tuple);
        ``InvalidArgument`` naming ``where`` otherwise."""
        if self.many:
            names = value.split(",") if isinstance(value, str) else value
            if not isinstance(names, list | tuple) or not names:
                raise InvalidArgument(where, "must be a non-empty list of names")
            for name in names:
                if self.choices is not None and name not in self.choices:
                    raise InvalidArgument(
                        where, f"unknown name {name!r}; one of {sorted(map(str, self.choices))}"
                    )
            return tuple(str(n) for n in names)
        if not self.of_kind(value):
            raise InvalidArgument(where, f"takes a {self.kind} value, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(where, f"must be finite, got {value}")
        why = self.check(value)
        if why is not None:
            raise InvalidArgument(where, why)
        return float(value) if self.kind == "float" else value


def knob(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    positive: bool = False,
    choices: tuple[Value, ...] | None = None,
    searchable: bool = True,
) -> Any:
    """A settings field: its default, its ``help`` and the values that make sense."""
    bounds = {"low": low, "high": high, "positive": positive, "choices": choices}
    return field(default=default, metadata={"help": help, "searchable": searchable, **bounds})


def _override(base: type, name: str, default: Any) -> Any:
    """``base``'s field ``name`` with another default (help and bounds kept)."""
    parent = next(f for f in fields(base) if f.name == name)
    return field(default=default, metadata=parent.metadata)


_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)

_DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """The optimisation and systems knobs every stage has."""

    learning_rate: float = knob(1e-3, "peak learning rate", positive=True, high=1.0)
    warmup_ratio: float = knob(0.0, "fraction of the steps spent warming up", low=0.0, high=0.99)
    weight_decay: float = knob(0.0, "AdamW weight decay", low=0.0, high=1.0)
    lr_scheduler_type: str = knob("linear", "learning-rate schedule", choices=_SCHEDULES)
    per_device_train_batch_size: int = knob(8, "micro-batch size", low=1, high=4096)
    gradient_accumulation_steps: int = knob(1, "micro-batches per optimizer step", low=1, high=4096)
    zero_stage: int = knob(
        0,
        "DeepSpeed ZeRO stage from configs/deepspeed/zero<N>.json; 0 = no DeepSpeed",
        choices=(0, 1, 2, 3),
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass")
    mixed_precision: str = knob("no", "fp16 needs a GPU", choices=("no", "bf16", "fp16"))
    max_length: int = knob(
        64, "tokens per training sequence", low=8, high=1_048_576, searchable=False
    )
    per_device_eval_batch_size: int = knob(
        16, "eval micro-batch size", low=1, high=4096, searchable=False
    )
    deepspeed_config: str | None = knob(
        None, "a DeepSpeed JSON of your own (overrides zero_stage)", searchable=False
    )


@dataclass(frozen=True, kw_only=True)
class PretrainProxyTraining(TrainingSettings):
    """A causal LM trained from scratch at the trial's width and depth."""

    learning_rate: float = _override(TrainingSettings, "learning_rate", 3e-3)
    hidden_size: int | None = knob(
        None, "width of the proxy (unset: the base model's)", low=8, high=65536
    )
    num_layers: int | None = knob(
        None, "depth of the proxy (unset: the base model's)", low=1, high=512
    )
    head_dim: int = knob(16, "heads = hidden_size / head_dim", low=4, high=512, searchable=False)
    mlp_ratio: float = knob(
        2.0, "MLP width / hidden_size", positive=True, high=64.0, searchable=False
    )


@dataclass(frozen=True, kw_only=True)
class SFTTraining(TrainingSettings):
    """A full fine-tune with trl's SFTTrainer."""


@dataclass(frozen=True, kw_only=True)
class AdapterShape:
    """The shape of a peft LoRA adapter, for a stage that can train one (its ``lora_r``
    is the stage's own: LoRA always trains an adapter, DPO only when ``lora_r`` > 0)."""

    lora_alpha: int = knob(16, "adapter scale numerator (scale = alpha / r)", low=1, high=4096)
    lora_dropout: float = knob(0.05, "dropout on the adapter's input", low=0.0, high=0.9)
    lora_target_modules: str = knob("all-linear", "'all-linear' or comma-separated module names")


@dataclass(frozen=True, kw_only=True)
class LoRATraining(AdapterShape, SFTTraining):
    """A peft LoRA adapter trained with trl's SFTTrainer."""

    lora_r: int = knob(8, "adapter rank", low=1, high=1024)


@dataclass(frozen=True, kw_only=True)
class DPOTraining(AdapterShape, TrainingSettings):
    """Preference tuning with trl's DPOTrainer."""

    beta: float = knob(0.1, "KL strength", positive=True, high=100.0)
    loss_type: str = knob("sigmoid", "trl's DPO loss", choices=_DPO_LOSSES)
    lora_r: int = knob(
        0,
        "rank of a new LoRA adapter to train (its base, with the adapter off, is the "
        "reference: no second copy of the model); 0 = train the whole model",
        low=0,
        high=1024,
    )


@dataclass(frozen=True, kw_only=True)
class GRPOTraining(TrainingSettings):
    """Online RL with trl's GRPOTrainer and reward functions named in the config."""

    beta: float = knob(0.04, "KL weight (0 = no reference)", low=0.0, high=100.0)
    num_generations: int = knob(4, "completions per prompt", low=2, high=1024)
    temperature: float = knob(1.0, "sampling temperature", positive=True, high=10.0)
    max_completion_length: int = knob(
        8, "tokens per completion", low=1, high=1_048_576, searchable=False
    )
    reward_functions: tuple[str, ...] = knob(
        ("exact_match", "has_number"),
        "reward functions, summed (a list or one comma-separated string)",
        choices=tuple(REWARD_FUNCTIONS),
        searchable=False,
    )


@dataclass(frozen=True, kw_only=True)
class CustomTraining(TrainingSettings):
    """A team's own training script (the ``custom`` stage). The knobs every stage has are
    checked as they are for every stage when a study names them; a custom study may also
    search or fix names of the script's own (``label_smoothing``, ``lora_r``), which only
    the script interprets (``stagetune.contract.spec.custom``). The script receives exactly
    what the study sets (``stagetune.sdk.current_trial().settings``), never these defaults."""


_KINDS: dict[type, ParamKind] = {float: "float", int: "int", str: "str", bool: "bool"}


def _kind_of(hint: Any) -> tuple[ParamKind, bool]:
    """(kind, many) of a field's type: ``int | None`` is an int, ``tuple[str, ...]`` many
    strings."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return _KINDS[typing.get_args(hint)[0]], True
    return _KINDS[hint], False


def knobs(settings: type[TrainingSettings]) -> dict[str, ParamDef]:
    """Every knob of a settings class, by name, from its fields' types and metadata."""
    if settings not in _KNOBS:
        _KNOBS[settings] = _read_knobs(settings)
    return _KNOBS[settings]


_KNOBS: dict[type[TrainingSettings], dict[str, ParamDef]] = {}


def _read_knobs(settings: type[TrainingSettings]) -> dict[str, ParamDef]:
    hints = typing.get_type_hints(settings)
    out: dict[str, ParamDef] = {}
    for f in fields(settings):
        kind, many = _kind_of(hints[f.name])
        m = f.metadata
        out[f.name] = ParamDef(
            kind,
            choices=m["choices"],
            low=m["low"],
            high=m["high"],
            positive=m["positive"],
            help=m["help"],
            searchable=m["searchable"],
            many=many,
        )
    return out
