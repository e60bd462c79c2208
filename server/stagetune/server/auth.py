"""Authentication, roles and tenancy.

A token file (``ServerSettings.auth_file``, ``stagetune serve --auth-file``) maps bearer
tokens to a name, a team and a role::

    tokens:
      - {name: alice, team: nlp, role: member, sha256: <hex of sha256(token)>}
      - {name: gpu-pool-1, team: nlp, role: worker, token: <the token itself>}
      - {name: ops, role: admin, sha256: <hex>}

Clients send ``authorization: Bearer <token>`` metadata. The SHA-256 of what they send is
compared with every entry in constant time (``hmac.compare_digest``, no early exit).
Roles: ``member`` manages its team's studies and may run their trials, ``worker`` may only
call the WorkerService for its team's studies, ``admin`` may do anything.

Tenancy: a study created by a member belongs to its team (a study user attribute). Every
other team sees such a study exactly as if it did not exist: ``NOT_FOUND`` with the
message a missing study gets, and it is left out of lists. A study without an owner
(created with auth off, or by an admin without a team) is visible to admins only.

The identity of the current call travels from the interceptor to the servicers in a
context variable; with auth off there is no identity and nothing is checked.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stagetune.contract.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from stagetune.contract.spec import StudySpec, read_yaml_file
from stagetune.server.records import StudyRecord
from stagetune.server.storage import StudyStore
from stagetune.server.trial_service import Acquired, NoWork, TrialService, WorkerFit
from stagetune.v1 import pipeline_service_pb2 as ps
from stagetune.v1 import study_service_pb2 as ss
from stagetune.v1 import worker_service_pb2 as ws

__all__ = [
    "Identity",
    "TokenTable",
    "Tenancy",
    "load_token_file",
    "parse_tokens",
    "current_identity",
    "acting_as",
    "authorize",
    "acquire_for_team",
    "METADATA_KEY",
]

Role = Literal["member", "worker", "admin"]
ROLES: tuple[Role, ...] = ("member", "worker", "admin")
METADATA_KEY = "authorization"
MIN_TOKEN_LENGTH = 16

STUDY_SERVICE = ss.DESCRIPTOR.services_by_name["StudyService"].full_name
WORKER_SERVICE = ws.DESCRIPTOR.services_by_name["WorkerService"].full_name
PIPELINE_SERVICE = ps.DESCRIPTOR.services_by_name["PipelineService"].full_name
PROTECTED_SERVICES = frozenset({STUDY_SERVICE, WORKER_SERVICE, PIPELINE_SERVICE})

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_FIELDS = {"name", "team", "role", "sha256", "token"}


@dataclass(frozen=True)
class Identity:
    """Who is calling: the token's name, its team ("" for an admin without one), its role."""

    name: str
    team: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class _Entry:
    identity: Identity
    digest: bytes  # sha256 of the token; the token itself is never kept

    def __repr__(self) -> str:  # no digest in reprs or logs
        return f"_Entry({self.identity!r})"


class TokenTable:
    """The accepted tokens (as SHA-256 digests) and whom each stands for."""

    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def teams(self) -> set[str]:
        return {e.identity.team for e in self._entries if e.identity.team}

    def count(self, role: Role) -> int:
        return sum(e.identity.role == role for e in self._entries)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        """The identity of the bearer token in ``metadata``; ``Unauthenticated`` if none
        or unknown. The message never contains what the caller sent."""
        header = ""
        for key, value in metadata or ():
            if key.lower() == METADATA_KEY:
                header = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                break
        if not header:
            raise Unauthenticated(
                f"missing credentials: send '{METADATA_KEY}: Bearer <token>' metadata"
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(f"malformed {METADATA_KEY} metadata: expected 'Bearer <token>'")
        digest = hashlib.sha256(token.encode()).digest()
        found: Identity | None = None
        for entry in self._entries:  # every entry, matched or not: constant time
            if hmac.compare_digest(digest, entry.digest) and found is None:
                found = entry.identity
        if found is None:
            raise Unauthenticated("invalid token")
        return found


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}.{key}", f"must be a string, got {type(value).__name__}")
    return value.strip()


def parse_tokens(data: Any) -> TokenTable:
    """Build the token table from the parsed YAML; errors name the offending field."""
    if not isinstance(data, Mapping):
        raise InvalidArgument("", "must be a mapping with a 'tokens' list")
    unknown = sorted(str(k) for k in data if k != "tokens")
    if unknown:
        raise InvalidArgument(unknown[0], "unknown field; expected only 'tokens'")
    items = data.get("tokens")
    if not isinstance(items, list) or not items:
        raise InvalidArgument("tokens", "must be a non-empty list of token entries")
    entries: list[_Entry] = []
    seen_digests: dict[bytes, str] = {}
    seen_names: dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"tokens[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidArgument(where, "must be a mapping (name, team, role, sha256 or token)")
        for key in item:
            if key not in _FIELDS:
                raise InvalidArgument(
                    f"{where}.{key}", "unknown field; expected name, team, role, sha256, token"
                )
        name = _text(item, "name", where)
        if not name:
            raise InvalidArgument(f"{where}.name", "is required")
        if not _NAME.fullmatch(name):
            raise InvalidArgument(f"{where}.name", "must be 1-64 letters, digits, '_.@-'")
        if name in seen_names:
            raise InvalidArgument(f"{where}.name", f"duplicate of {seen_names[name]}.name")
        role = _text(item, "role", where)
        if role not in ROLES:
            raise InvalidArgument(
                f"{where}.role", f"unknown role {role!r}; expected member, worker or admin"
            )
        team = _text(item, "team", where)
        if role != "admin" and not team:
            raise InvalidArgument(f"{where}.team", f"is required for role {role}")
        if team and not _NAME.fullmatch(team):
            raise InvalidArgument(f"{where}.team", "must be 1-64 letters, digits, '_.@-'")
        sha = _text(item, "sha256", where)
        token = item.get("token")
        if bool(sha) == (token is not None):
            raise InvalidArgument(where, "needs exactly one of sha256 or token")
        if sha:
            if not _HEX64.fullmatch(sha):
                raise InvalidArgument(f"{where}.sha256", "must be 64 hex digits")
            digest = bytes.fromhex(sha)
        else:
            # Never echo the value: it is a secret.
            if not isinstance(token, str):
                raise InvalidArgument(f"{where}.token", "must be a string")
            token = token.strip()
            if len(token) < MIN_TOKEN_LENGTH:
                raise InvalidArgument(
                    f"{where}.token", f"must be at least {MIN_TOKEN_LENGTH} characters"
                )
            if not (token.isascii() and token.isprintable()) or " " in token:
                raise InvalidArgument(f"{where}.token", "must be printable ASCII without spaces")
            digest = hashlib.sha256(token.encode()).digest()
        if digest in seen_digests:
            raise InvalidArgument(where, f"duplicate token (same as {seen_digests[digest]})")
        seen_digests[digest] = where
        seen_names[name] = where
        entries.append(_Entry(Identity(name, team, role), digest))
    return TokenTable(entries)


def load_token_file(path: str | Path) -> TokenTable:
    """Read and validate a token file. Errors are one ``InvalidArgument`` naming the file
    and the field, never a value from the file."""
    try:
        data = read_yaml_file(path, quote=False)
    except InvalidArgument as e:
        raise InvalidArgument("", f"auth file {path}: {e.problem}") from None
    try:
        return parse_tokens(data)
    except InvalidArgument as e:
        raise InvalidArgument("", f"auth file {path}: {e.message}") from None


# ------------------------------------------------------------------ identity of the call

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "stagetune_identity", default=None
)


def current_identity() -> Identity | None:
    """Who makes the current RPC; None when auth is off."""
    return _current.get()


@contextmanager
def acting_as(identity: Identity | None) -> Iterator[None]:
    reset = _current.set(identity)
    try:
        yield
    finally:
        _current.reset(reset)


def authorize(identity: Identity, method: str) -> None:
    """Role check of one RPC (``/package.Service/Method``); tenancy is the servicers'."""
    service, _, name = method.lstrip("/").rpartition("/")
    if identity.role == "worker" and service != WORKER_SERVICE:
        raise PermissionDenied(f"role worker may not call {service.rpartition('.')[2]}.{name}")


# ------------------------------------------------------------------ tenancy


def _study_not_found(name: str) -> NotFound:
    return NotFound(f"study {name!r} not found")  # as server.storage words it


class Tenancy:
    """Which studies and trials the caller of the current RPC may see.

    With auth off (no identity) and for admins every check passes."""

    def __init__(self, store: StudyStore) -> None:
        self._store = store

    @staticmethod
    def _restricted() -> Identity | None:
        identity = current_identity()
        return None if identity is None or identity.is_admin else identity

    def may_see(self, name: str) -> bool:
        identity = self._restricted()
        return identity is None or self._store.owner(name) == identity.team

    def check_study(self, name: str) -> None:
        """``NOT_FOUND`` (as for a missing study) unless the caller may see it."""
        if not self.may_see(name):
            raise _study_not_found(name)

    def check_trial(self, trial_id: int) -> None:
        """``NOT_FOUND`` (as for a missing trial) unless the trial's study is the caller's."""
        identity = self._restricted()
        if identity is None:
            return
        study = self._store.study_of(trial_id)  # NotFound when there is no such trial
        if self._store.owner(study) != identity.team:
            raise NotFound(f"trial {trial_id} not found")

    def visible(self, records: Iterable[StudyRecord]) -> list[StudyRecord]:
        identity = self._restricted()
        if identity is None:
            return list(records)
        records = list(records)
        owners = self._store.owners()
        return [r for r in records if owners.get(r.spec.name) == identity.team]

    def before_create(self, spec: StudySpec) -> None:
        """Refuse names taken by another team and warm starts from its studies."""
        identity = self._restricted()
        if identity is None:
            return
        for i, source in enumerate(spec.warm_start.studies):
            if self._store.owner(source) != identity.team:  # as the service words a missing one
                raise InvalidArgument(f"warm_start.studies[{i}]", f"no study named {source!r}")
        self._not_taken(spec.name, identity)

    def _not_taken(self, name: str, identity: Identity) -> None:
        # Unavoidable: the name space is shared, so a taken name says the study exists.
        if self._store.study_exists(name) and self._store.owner(name) != identity.team:
            raise AlreadyExists(f"study {name!r} already exists; choose another name")

    @staticmethod
    def creating_team() -> str:
        """The team a new study belongs to: the caller's, if it has one ("": none)."""
        identity = current_identity()
        return identity.team if identity is not None else ""

    def after_create(self, name: str, created: bool) -> None:
        """An existing study returned for an equal spec must be the caller's team's."""
        identity = self._restricted()
        if identity is not None and not created:
            self._not_taken(name, identity)


def acquire_for_team(
    service: TrialService, worker_id: str, team: str, fit: WorkerFit | None = None
) -> Acquired | NoWork:
    """``service.acquire`` without a study name, limited to ``team``'s studies."""
    mine = {name for name, owner in service.store.owners().items() if owner == team}
    return service.acquire(worker_id, among=mine, fit=fit)
