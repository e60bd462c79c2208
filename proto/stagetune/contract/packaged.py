"""The configs that ship inside the package (``stagetune.configs``), found with
``importlib.resources`` so that they work the same from a checkout, an editable install
and a wheel: the example study configs (``stagetune submit lora``), the DeepSpeed JSONs
that ``zero_stage`` picks and the per-stage warm-start defaults."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["example_configs", "packaged_example", "packaged_file", "packaged_path"]

_PACKAGE = "stagetune.configs"
#: Files at the top of the configs package that are not study configs.
_NOT_EXAMPLES = {"warm_start.yaml"}


def packaged_file(relative: str) -> Traversable:
    """A file of the configs package (it may not exist: check ``is_file()``)."""
    node = files(_PACKAGE)
    for part in relative.split("/"):
        node = node.joinpath(part)
    return node


def packaged_path(relative: str) -> Path:
    """A packaged file as a path on disk, for tools that take a path (DeepSpeed).

    Raises ``FileNotFoundError`` naming the file when this install lacks it."""
    node = packaged_file(relative)
    if not node.is_file():
        raise FileNotFoundError(f"{relative} is missing from this install of stagetune")
    return Path(str(node))


def example_configs() -> list[str]:
    """Names of the packaged example study configs (``lora``, ``sft``, ...), sorted."""
    return sorted(
        node.name.removesuffix(".yaml")
        for node in files(_PACKAGE).iterdir()
        if node.name.endswith(".yaml") and node.name not in _NOT_EXAMPLES
    )


def packaged_example(name: str) -> Traversable | None:
    """The packaged example config called ``name`` (``lora`` or ``lora.yaml``), if any."""
    stem = name.removesuffix(".yaml")
    if "/" in stem or "\\" in stem or stem not in example_configs():
        return None
    return packaged_file(f"{stem}.yaml")
