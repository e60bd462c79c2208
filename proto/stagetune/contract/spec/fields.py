"""Readers and checks of one field of parsed config data; each error names the field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stagetune.contract.errors import InvalidArgument

__all__ = ["as_mapping", "check_known", "as_number", "check_finite"]


def as_mapping(value: Any, where: str) -> Mapping[str, Any]:
    """A mapping field; an absent one (None) is empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(where, f"must be a mapping, got {type(value).__name__}")
    return value


def check_known(data: Mapping[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    """Refuse the first key of ``data`` not in ``allowed``."""
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise InvalidArgument(
                f"{prefix}{key}", f"unknown field; expected one of {sorted(allowed)}"
            )


def as_number(value: Any, where: str, kind: type[int] | type[float] = float) -> Any:
    """A number field (never a bool); with ``kind=int`` a whole number, as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(where, f"must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidArgument(where, f"must be an integer, got {value!r}")
        return int(value)
    return float(value)


def check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(where, f"must be finite, got {value}")
