"""The database behind the store: opening it, and what its failures mean to a caller.

At start, a database that cannot be opened is a setting the server cannot use:
``InvalidArgument("storage_url", ...)``, one line saying what is wrong and what to use
instead. Once serving, a database that is down, unreachable or out of connections is a
passing condition: ``Unavailable``, so clients retry instead of giving up.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import optuna
import sqlalchemy.exc

from stagetune.contract.errors import InvalidArgument, Unavailable
from stagetune.contract.redact import redact_text
from stagetune.server import optuna_rdb as rdb

__all__ = ["default_storage_url", "open_database", "storage_errors"]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def default_storage_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'stagetune.db').resolve()}"


# What a database that is down, unreachable or out of free connections raises.
_OUTAGES = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # no free connection in the pool: busy, not broken
)


def storage_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn database outages into ``Unavailable``, so clients retry instead of giving up."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except _OUTAGES as e:
            _log.warning("storage unavailable in %s: %s", fn.__name__, e)
            raise Unavailable("storage unavailable; retry later") from None
        except optuna.exceptions.StorageInternalError as e:
            _log.warning("storage error in %s: %s", fn.__name__, e)
            raise Unavailable("storage unavailable; retry later") from None

    return wrapper


def open_database(url: str) -> optuna.storages.RDBStorage:
    """The storage at ``url``, or ``InvalidArgument("storage_url", ...)``: one line that
    says what is wrong with it and what to use instead."""
    shown = redact_text(url)
    try:
        parsed = sqlalchemy.make_url(url)
        parsed.get_dialect()  # ArgumentError when SQLAlchemy knows no such database
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise InvalidArgument(
                "storage_url",
                f"{shown!r} is a {backend} database; stagetune stores studies in "
                "PostgreSQL (postgresql+psycopg://USER@HOST:5432/DB) or SQLite",
            )
        return rdb.open_storage(url)
    except sqlalchemy.exc.ArgumentError:
        problem = f"{shown!r} is not a database URL SQLAlchemy knows"
    except _OUTAGES as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        problem = f"cannot connect to {shown} ({redact_text(reason)})"
    except ImportError as e:
        problem = f"no driver for {shown} ({e})"
    raise InvalidArgument(
        "storage_url",
        f"{problem}; give a reachable database, e.g. postgresql+psycopg://USER@HOST:5432/DB, "
        "or leave it unset for SQLite in the data folder",
    ) from None
