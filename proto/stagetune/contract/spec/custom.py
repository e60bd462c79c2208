"""The ``custom`` stage's side of a spec: its runner section and its search space.

A custom study runs a team's own training script, and only one the worker's operator
allowed (``stagetune worker --allow-script NAME=PATH``). The study names the script
(``runner.script: finetune``) and never supplies a command, a path or arguments: a spec
that could would run its author's code on every worker that polls the server. So
``runner`` holds only ``script`` (a name), ``training`` (fixed values handed to the
script), ``processes`` and ``save_model``; a key that would carry a command is refused by
name, any other unknown key as unknown.

Params and fixed values may be the knobs every stage has (``CustomTraining``: checked
against the same bounds) or names of the script's own (``label_smoothing``), which only
the script interprets: their kind is the one the search space gives them. The script gets
the study's values, and nothing else, through ``stagetune.sdk``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.fields import as_mapping, as_number, check_known
from stagetune.contract.spec.model import CategoricalParam, FloatParam, IntParam, ParamSpec
from stagetune.contract.stages import CUSTOM
from stagetune.contract.training import ParamDef, ParamKind

__all__ = [
    "SCRIPT_NAME",
    "CUSTOM_RUNNER_KEYS",
    "COMMAND_KEYS",
    "CustomRunner",
    "check_script_name",
    "custom_knob",
    "parse_custom_runner",
]

#: What a script is called, by the study and in ``--allow-script NAME=PATH``: a name,
#: never a path (no '/'), so it can only pick one of the scripts a worker allows.
SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A param or fixed value of the script's own: an identifier-like name (it becomes an
#: Optuna param, an MLflow param and a key the script reads).
_OWN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

CUSTOM_RUNNER_KEYS = frozenset({"script", "training", "processes", "save_model"})
#: Keys a spec might use to hand the workers a command of its own.
COMMAND_KEYS = frozenset(
    {
        "command",
        "cmd",
        "args",
        "argv",
        "arguments",
        "path",
        "script_path",
        "entrypoint",
        "entry_point",
        "exec",
        "executable",
        "module",
        "python",
        "shell",
        "env",
    }
)

Value = float | int | str | bool
FixedValue = Value | tuple[Value, ...]


@dataclass(frozen=True, kw_only=True)
class CustomRunner:
    """A custom study's ``runner`` section, typed."""

    script: str = field(metadata={"help": "name of a script the workers allow (--allow-script)"})
    training: dict[str, FixedValue] = field(
        default_factory=dict, metadata={"help": "fixed values handed to the script, by name"}
    )
    processes: int | None = field(
        default=None, metadata={"help": "processes per trial (unset: the worker's setting)"}
    )
    save_model: bool = field(
        default=False, metadata={"help": "keep what the script saves in output_dir/model"}
    )


def check_script_name(name: Any, where: str) -> str:
    """A script name (``finetune``); ``InvalidArgument`` naming ``where`` for anything
    else, a path or a command in particular."""
    if not isinstance(name, str) or not SCRIPT_NAME.match(name):
        raise InvalidArgument(
            where,
            "must be the name of a script the workers allow (1-64 letters, digits, '-', '_' "
            f"or '.'), not a path or a command; got {name!r}",
        )
    return name


def _check_own_name(name: str, where: str) -> None:
    if not _OWN_NAME.match(name):
        raise InvalidArgument(
            where, "a name of the script's own: 1-64 letters, digits, '_', '.' or '-'"
        )


def _kind_of(value: Value) -> ParamKind:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "float" if isinstance(value, float) else "str"


def custom_knob(p: ParamSpec) -> ParamDef:
    """What a custom study's search-space entry ``p`` is checked against: the common knob
    of that name (``learning_rate``: its bounds), else a knob of the kind ``p`` gives (a
    categorical of numbers is a float when any choice is one)."""
    known = CUSTOM.knob(p.name)
    if known is not None:
        return known
    _check_own_name(p.name, f"search_space.{p.name}")
    if isinstance(p, FloatParam):
        return ParamDef("float")
    if isinstance(p, IntParam):
        return ParamDef("int")
    assert isinstance(p, CategoricalParam)
    kinds = {_kind_of(c) for c in p.choices}
    if kinds == {"int", "float"}:
        return ParamDef("float")
    return ParamDef(_kind_of(p.choices[0]) if p.choices else "str")


def _fixed(key: str, value: Any) -> FixedValue:
    where = f"runner.training.{key}"
    known = CUSTOM.knob(key)
    if known is not None:
        coerced: FixedValue = known.coerce(value, where)
        return coerced
    _check_own_name(key, where)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidArgument(where, "must be a number, string or bool, or a list of them")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidArgument(where, f"must be finite, got {item}")
    return tuple(items) if isinstance(value, list) else value


def parse_custom_runner(runner: Mapping[str, Any]) -> CustomRunner:
    """A custom study's ``runner`` section, typed; ``InvalidArgument`` names the first bad
    field (``runner.command``: a study cannot supply a command)."""
    for key in runner:
        if key in COMMAND_KEYS:
            raise InvalidArgument(
                f"runner.{key}",
                "a study cannot supply a command, path or arguments: it names a script the "
                "workers allow (runner.script), which reads its values from runner.training",
            )
    check_known(runner, CUSTOM_RUNNER_KEYS, "runner")
    if "script" not in runner:
        raise InvalidArgument(
            "runner.script", "is required: the name of a script the workers allow"
        )
    script = check_script_name(runner["script"], "runner.script")
    fixed = as_mapping(runner.get("training"), "runner.training")
    training = {str(k): _fixed(str(k), v) for k, v in fixed.items()}
    processes = runner.get("processes")
    if processes is not None:
        processes = as_number(processes, "runner.processes", int)
        if processes < 1:
            raise InvalidArgument("runner.processes", "must be >= 1")
    save_model = runner.get("save_model", False)
    if not isinstance(save_model, bool):
        raise InvalidArgument("runner.save_model", "must be true or false")
    return CustomRunner(
        script=script, training=training, processes=processes, save_model=save_model
    )
