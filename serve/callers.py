"""Caller authentication: which caller may call which route of the A/B app.

Every caller holds a random key and sends it as ``Authorization: Bearer <key>``. The routers know only
the keys' SHA-256 digests, from the environment variable ``serve.callers_env`` (``MARN_SERVE_CALLERS``):
``name:role:digest`` entries separated by commas. A leaked pod environment therefore does not reveal a
usable key, and a key is revoked by removing its entry.

Roles, checked before a body is read:
- ``client``: ``POST /predict`` and ``POST /feedback``. The trusted front end that already authenticated its
  user: the ``user_id`` it sends is taken as that user's. Without this, anyone reaching the port could read
  any user's personal scores and write the feedback the canary acts on (docs/reviews/serving-2026-12-03.md,
  finding 1).
- ``operator``: ``GET /ab`` and ``GET /ab/history`` (per-arm numbers, each ``GET /ab`` a ledger query) and
  every path not listed here (default deny: an unknown path is refused before it is a 404).
Open: ``/healthz`` (probes), the dashboard page and its assets (static; the page reads ``/ab/history`` with
the operator key its user gives it), ``/docs`` and ``/openapi.json`` (the contract, public in this repo).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["client", "operator"]
ROLES: tuple[Role, ...] = ("client", "operator")
CLIENT_ROUTES = frozenset({"/predict", "/feedback"})
OPEN_PATHS = frozenset({"/healthz", "/dashboard", "/docs", "/openapi.json"})
OPEN_PREFIXES = ("/dashboard/assets/", "/docs/static/")
KEY_PREFIX = "marn_"
MIN_KEY_CHARS = 32
MAX_HEADER_CHARS = 512  # a longer Authorization header is not a key of ours: refused before hashing
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Caller:
    name: str
    role: Role


def new_key() -> str:
    """A fresh caller key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def caller_entry(name: str, role: Role, key: str) -> str:
    """The ``name:role:digest`` entry that lets ``key`` in as ``role``."""
    entry = f"{name}:{role}:{key_digest(key)}"
    parse_callers(entry)  # the same checks as the routers'
    return entry


def new_caller_keys() -> dict[Role, str]:
    """A fresh key per role (a local ``marn serve up``'s, a test's)."""
    return {role: new_key() for role in ROLES}


def callers_entries(keys: dict[Role, str], prefix: str = "local") -> str:
    """The ``$MARN_SERVE_CALLERS`` value that lets in each ``role: key`` as ``<prefix>-<role>``."""
    return ",".join(caller_entry(f"{prefix}-{role}", role, key) for role, key in keys.items())


def required_role(path: str) -> Role | None:
    """The role a path needs; None for the open ones."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    return "client" if path in CLIENT_ROUTES else "operator"


class CallerKeys:
    """The callers the routers let in, by key digest."""

    def __init__(self, callers: dict[str, Caller]):
        if not callers:
            raise ValueError("no callers: nobody could call /predict")
        self._by_digest = {bytes.fromhex(digest): caller for digest, caller in callers.items()}

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller a ``Bearer`` header names; None for a missing, malformed or unknown key."""
        if not authorization or len(authorization) > MAX_HEADER_CHARS:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or len(key.strip()) < MIN_KEY_CHARS:
            return None
        digest = hashlib.sha256(key.strip().encode("utf-8", "replace")).digest()
        found = None
        for known, caller in self._by_digest.items():  # constant time per entry; a few entries
            if hmac.compare_digest(known, digest):
                found = caller
        return found

    @property
    def names(self) -> list[str]:
        return sorted(f"{c.name} ({c.role})" for c in self._by_digest.values())


def parse_callers(text: str) -> CallerKeys:
    """``name:role:digest[,name:role:digest...]``; a clear ValueError for anything else."""
    callers: dict[str, Caller] = {}
    names: set[str] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ValueError(f"caller entry {entry[:80]!r} is not name:role:sha256-hex-digest")
        name, role, digest = parts
        if not _NAME.match(name):
            raise ValueError(f"caller name {name[:80]!r}: 1-64 letters, digits, '_', '.', '-'")
        if role not in ROLES:
            raise ValueError(f"caller {name!r}: role {role[:40]!r} is not one of {', '.join(ROLES)}")
        if not _DIGEST.match(digest):
            raise ValueError(f"caller {name!r}: the digest must be 64 lowercase hex characters (SHA-256)")
        if name in names or digest in callers:
            raise ValueError(f"caller {name!r}: a name or key listed twice")
        names.add(name)
        callers[digest] = Caller(name, role)  # type: ignore[arg-type]
    return CallerKeys(callers)


def resolve_callers(env_name: str) -> CallerKeys:
    """The callers from ``$env_name``; a RuntimeError that says how to make one when unset or invalid."""
    text = os.environ.get(env_name, "")
    how = "`marn serve key --name NAME --role client|operator` prints a key and its entry"
    if not text.strip():
        raise RuntimeError(
            f"${env_name} must list the callers (name:role:sha256-digest, comma-separated): {how}"
        )
    try:
        return parse_callers(text)
    except ValueError as err:
        raise RuntimeError(f"${env_name}: {err}; {how}") from None


# -- the ASGI gate ---------------------------------------------------------------------------------------

Refusal = Literal["missing", "unknown", "wrong_role"]


class CallerGate:
    """ASGI middleware: a route's role is checked before the route (or its body) is touched. Refusals are
    counted by ``on_refused`` (this replica's memory, never the ledger: an anonymous flood must not write
    there) and answered 401 (no or unknown key) or 403 (a key of the other role), in JSON."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        keys: CallerKeys,
        on_refused: Callable[[Refusal], None],
        refuse: Callable[[int, str], Any],
    ):
        self.app, self.keys, self.on_refused, self.refuse = app, keys, on_refused, refuse

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        role = required_role(scope["path"])
        if role is None:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        caller = self.keys.identify(header.decode("latin-1") if header is not None else None)
        if caller is None:
            self.on_refused("unknown" if header else "missing")
            response = self.refuse(
                401, f"{scope['path'][:100]} needs a {role} key: Authorization: Bearer KEY"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="marn-serve"'
            return await response(scope, receive, send)
        if caller.role != role:
            self.on_refused("wrong_role")
            message = f"caller {caller.name!r} has the {caller.role} role; {scope['path'][:100]} needs {role}"
            return await self.refuse(403, message)(scope, receive, send)
        scope.setdefault("state", {})["caller"] = caller
        return await self.app(scope, receive, send)
