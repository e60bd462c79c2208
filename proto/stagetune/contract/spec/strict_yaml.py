"""The strict YAML reader every config file goes through (study configs, token files).

Safe loading (no Python tags), no anchors or aliases, and a size limit read before parsing.
"""

from __future__ import annotations

from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from stagetune.contract.errors import InvalidArgument

__all__ = ["MAX_SPEC_BYTES", "read_yaml_file"]

MAX_SPEC_BYTES = 1 << 20
_NO_ALIASES = "aliases (*name) are not allowed in a config"


class _StrictLoader(yaml.SafeLoader):
    """The safe loader (no Python tags) that also refuses anchors and aliases: a config
    never needs them, and nested aliases ("billion laughs") expand exponentially once the
    data is copied or serialised."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, _NO_ALIASES, event.start_mark)
        return super().compose_node(parent, index)


def read_yaml_file(path: str | Path | Traversable, *, quote: bool = True) -> Any:
    """A YAML config file's data, read with the strict safe loader; at most
    ``MAX_SPEC_BYTES`` are read. Errors: ``InvalidArgument`` naming the file; with
    ``quote=False`` (a file of secrets) they give only the line, never a word of the file
    (the parser's own descriptions quote it: a tag, a character)."""
    p = path if isinstance(path, Traversable) else Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # a pipe or a growing file has no honest size
    except OSError as e:
        raise InvalidArgument(str(path), f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_SPEC_BYTES:
        limit = MAX_SPEC_BYTES
        raise InvalidArgument(str(path), f"file is over {limit} bytes; the limit is {limit}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(str(path), f"not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (safe, no aliases)
    except yaml.YAMLError as e:
        if quote:
            raise InvalidArgument(str(path), f"not valid YAML: {e}") from None
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        ours = f": {_NO_ALIASES}" if getattr(e, "problem", None) == _NO_ALIASES else ""
        raise InvalidArgument(str(path), f"not valid YAML{at}{ours}") from None
    except ValueError:  # a value YAML types but cannot build (a date such as 2024-13-45)
        raise InvalidArgument(str(path), "not valid YAML: a value could not be read") from None
