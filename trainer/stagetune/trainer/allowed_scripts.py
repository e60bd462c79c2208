"""The training scripts a worker's operator allows: ``stagetune worker --allow-script NAME=PATH``.

A custom study names a script (``runner.script: finetune``); the worker looks the name up
here and runs the file its operator gave, or refuses the trial. The list is the worker's,
set where it starts: nothing a study says can add to it or point it elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from stagetune.contract.errors import InvalidArgument
from stagetune.contract.spec.custom import SCRIPT_NAME

__all__ = ["ALLOW_FLAG", "parse_allowed_scripts", "check_allowed_scripts", "refusal"]

ALLOW_FLAG = "--allow-script"


def check_allowed_scripts(scripts: Mapping[str, Path]) -> dict[str, Path]:
    """Each NAME a script name and each PATH an existing file, made absolute (a trial runs
    in its own folder); ``InvalidArgument`` naming ``--allow-script`` otherwise."""
    checked: dict[str, Path] = {}
    for name, path in scripts.items():
        if not SCRIPT_NAME.match(name):
            raise InvalidArgument(
                ALLOW_FLAG, f"{name!r}: a script name is 1-64 letters, digits, '-', '_' or '.'"
            )
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():
            raise InvalidArgument(ALLOW_FLAG, f"{name}={path}: no such file")
        checked[name] = resolved
    return checked


def parse_allowed_scripts(entries: Iterable[str]) -> dict[str, Path]:
    """``["finetune=train.py", ...]`` -> ``{"finetune": Path("/abs/train.py")}``."""
    scripts: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise InvalidArgument(ALLOW_FLAG, f"{entry!r}: expected NAME=PATH (finetune=train.py)")
        if name in scripts:
            raise InvalidArgument(ALLOW_FLAG, f"{name!r} is given twice")
        scripts[name] = Path(path)
    return check_allowed_scripts(scripts)


def refusal(worker_id: str, script: str, allowed: Iterable[str]) -> str:
    """Why worker ``worker_id`` will not run a trial naming ``script``."""
    names = ", ".join(sorted(allowed)) or "none"
    return (
        f"worker {worker_id} does not allow script {script!r} (it allows: {names}); "
        f"start a worker with {ALLOW_FLAG} {script}=PATH to run this study"
    )
