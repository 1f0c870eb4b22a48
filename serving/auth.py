"""API keys with roles: keys are stored as SHA-256 hashes in a TOML file (KAPOK_API_KEYS)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapok.settings import paths

ENV_VAR = "KAPOK_API_KEYS"
KEY_PREFIX = "kpk_"

PERMISSIONS = frozenset({"score", "limit", "price", "screen", "explain", "log", "whatif", "queue"})
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "lender": frozenset({"score", "limit", "price", "screen", "whatif"}),
    "reviewer": frozenset({"explain", "log"}),
    # credit officers: the referral queue (GET /queue, POST /queue/{request_id})
    "officer": frozenset({"queue"}),
    "admin": PERMISSIONS,
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,99}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS = ("name", "role", "sha256")
_OPTIONAL_FIELDS = ("created",)  # files written before `created` existed load without it
_KEYS_TABLE = re.compile(r"^\s*\[\[\s*keys\s*\]\]")


class AuthError(Exception):
    """Authentication (401) or authorization (403) failed; `message` is safe to return."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"AuthError(status={self.status}, message={self.message!r})"


class AuthConfigError(ValueError):
    """The API-key file is missing or invalid; the message names the file and the field."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's name (logged as the decision's caller) and its role."""

    name: str
    role: str


@dataclass(frozen=True)
class KeyEntry:
    """One configured key: name, role, the hex SHA-256 of the key (never the key) and when it
    was created (UTC; None for keys added before add_key recorded it)."""

    name: str
    role: str
    sha256: str
    created: dt.datetime | None = None


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key's UTF-8 bytes, as stored in the key file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key: 'kpk_' + secrets.token_urlsafe(32)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def keys_path() -> Path:
    """KAPOK_API_KEYS if set, else $KAPOK_HOME/api_keys.toml."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else paths().home / "api_keys.toml"


def _roles() -> str:
    return ", ".join(sorted(ROLE_PERMISSIONS))


def _check_role(role: Any, where: str) -> str:
    if not isinstance(role, str) or role not in ROLE_PERMISSIONS:
        raise AuthConfigError(f"{where}.role: unknown role {role!r} (expected one of {_roles()})")
    return role


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AuthConfigError(
            f"{where}.name: invalid name {name!r} (1-100 characters: letters, digits, "
            "'.', '_', '@', ':', '-', starting with a letter or digit)"
        )
    return name


def _check_created(created: Any, where: str) -> dt.datetime:
    if isinstance(created, dt.datetime) and created.utcoffset() is not None:
        return created.astimezone(dt.UTC)
    if isinstance(created, dt.datetime):
        got = f"{created.isoformat()}, a date-time without offset"
    elif isinstance(created, dt.date | dt.time):
        got = f"{created.isoformat()}, a {type(created).__name__} alone"
    elif isinstance(created, str):
        got = f"the string {created!r}"
    else:
        got = f"a value of type {type(created).__name__}"
    raise AuthConfigError(
        f"{where}.created: expected a TOML date-time with offset, unquoted, "
        f"e.g. 2025-01-31T09:30:00Z (got {got})"
    )


def _parse(text: str, source: Path | str) -> list[KeyEntry]:
    """Validate the TOML text of a key file; errors name the file and the field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuthConfigError(f"{source}: invalid TOML: {e}") from e
    unknown = sorted(set(data) - {"keys"})
    if unknown:
        raise AuthConfigError(f"{source}: unknown top-level field {unknown[0]!r} (expected 'keys')")
    keys = data.get("keys", [])
    if not isinstance(keys, list):
        raise AuthConfigError(f"{source}: keys: expected an array of tables ([[keys]])")
    entries: list[KeyEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(keys):
        where = f"{source}: keys[{i}]"
        if not isinstance(item, dict):
            raise AuthConfigError(f"{where}: expected a table ([[keys]])")
        extra = sorted(set(item) - set(_ENTRY_FIELDS) - set(_OPTIONAL_FIELDS))
        if extra:
            expected = ", ".join((*_ENTRY_FIELDS, *_OPTIONAL_FIELDS))
            raise AuthConfigError(f"{where}.{extra[0]}: unknown field (expected {expected})")
        for field in _ENTRY_FIELDS:
            if field not in item:
                raise AuthConfigError(f"{where}.{field}: missing")
        name = _check_name(item["name"], where)
        role = _check_role(item["role"], where)
        digest = item["sha256"]
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
            length = len(digest) if isinstance(digest, str) else type(digest).__name__
            raise AuthConfigError(
                f"{where}.sha256: expected 64 hexadecimal characters (got {length}); "
                "store hash_key(key), never the key itself"
            )
        if name in seen:
            raise AuthConfigError(
                f"{where}.name: duplicate name {name!r} (also keys[{seen[name]}])"
            )
        created = _check_created(item["created"], where) if "created" in item else None
        seen[name] = i
        entries.append(KeyEntry(name, role, digest.lower(), created))
    return entries


class _DemoAttribute:
    """`KeyStore.demo()` builds a demo store; `store.demo` (bool) tells whether a store is one.

    A demo store lets every request in as Caller("demo", "admin"): for local use, never production.
    """

    def __get__(self, instance: KeyStore | None, owner: type[KeyStore]) -> Any:
        if instance is None:
            return lambda: owner(demo=True)
        return instance._demo


class KeyStore:
    """The configured API keys; authenticate() a header, then authorize() a permission."""

    def __init__(
        self, entries: Iterable[KeyEntry] = (), *, path: Path | None = None, demo: bool = False
    ) -> None:
        self._entries = tuple(entries)
        self._digests = [bytes.fromhex(e.sha256) for e in self._entries]
        self._path = path
        self._demo = demo

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> KeyStore:
        """Read the key file (default: KAPOK_API_KEYS or $KAPOK_HOME/api_keys.toml)."""
        p = Path(path).expanduser() if path is not None else keys_path()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise AuthConfigError(
                f"{p}: API-key file not found (create keys with add_key, or run in demo mode)"
            ) from e
        except (OSError, UnicodeDecodeError) as e:
            raise AuthConfigError(f"{p}: cannot read the API-key file: {e}") from e
        return cls(_parse(text, p), path=p)

    demo = _DemoAttribute()

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        """The configured entries, in file order (hashes, never keys)."""
        return self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        if self._demo:
            return "KeyStore(demo=True)"
        return f"KeyStore({len(self._entries)} keys from {self._path})"

    def authenticate(self, authorization_header: str | None) -> Caller:
        """The caller for an 'Authorization: Bearer <key>' header; AuthError(401) otherwise."""
        if self._demo:
            return Caller("demo", "admin")
        if not authorization_header or not authorization_header.strip():
            raise AuthError(401, "missing Authorization header (expected 'Bearer <api key>')")
        parts = authorization_header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise AuthError(401, "malformed Authorization header (expected 'Bearer <api key>')")
        presented = hashlib.sha256(parts[1].encode("utf-8")).digest()
        found: KeyEntry | None = None
        for entry, digest in zip(self._entries, self._digests, strict=True):
            # every entry is compared, so the time taken does not reveal which one matched
            if hmac.compare_digest(presented, digest) and found is None:
                found = entry
        if found is None:
            raise AuthError(401, "unknown API key")
        return Caller(found.name, found.role)

    def authorize(self, caller: Caller, permission: str) -> None:
        """AuthError(403) unless the caller's role grants the permission."""
        if permission not in PERMISSIONS:
            raise ValueError(
                f"unknown permission {permission!r} (expected one of {sorted(PERMISSIONS)})"
            )
        if permission not in ROLE_PERMISSIONS.get(caller.role, frozenset()):
            raise AuthError(
                403,
                f"role {caller.role!r} (caller {caller.name!r}) "
                f"does not have permission {permission!r}",
            )


def demo_mode() -> bool:
    """KAPOK_DEMO (set by `kapok serve --demo`): the server checks no keys."""
    return os.environ.get("KAPOK_DEMO", "").lower() in ("1", "true", "yes")


@functools.cache
def server_keys() -> KeyStore:
    """The keys a serving process checks, loaded once (a running server keeps the keys it loaded
    at start): the demo store in demo mode, else the key file. The request gate and the
    endpoints share this one store."""
    return KeyStore.demo() if demo_mode() else KeyStore.load()


def add_key(path: str | os.PathLike[str], name: str, role: str) -> str:
    """Append a hashed key entry (with its UTC creation time) to the TOML file and return the
    plaintext key (shown once)."""
    p = Path(path).expanduser()
    where = f"{p}: new key"
    _check_name(name, where)
    _check_role(role, where)
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    entries = _parse(text, p)
    if any(e.name == name for e in entries):
        raise AuthConfigError(f"{where}.name: a key named {name!r} already exists")
    key = generate_key()
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    block = (
        "[[keys]]\n"
        f"name = {json.dumps(name)}\n"
        f"role = {json.dumps(role)}\n"
        f"sha256 = {json.dumps(hash_key(key))}\n"
        f"created = {_toml_datetime(created)}\n"
    )
    new_text = text
    if new_text and not new_text.endswith("\n"):
        new_text += "\n"
    new_text += ("\n" if new_text else "") + block
    _parse(new_text, p)  # never write a file that would not load
    _write_atomic(p, new_text)
    return key


def remove_key(path: str | os.PathLike[str], name: str) -> KeyEntry:
    """Remove the key named `name` from the TOML file (atomic rewrite) and return its entry.

    The other entries, and comments outside the removed entry's [[keys]] table, stay as they
    are. An unknown name is an AuthConfigError naming the file and the known names.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise AuthConfigError(f"{p}: API-key file not found (no keys to revoke)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AuthConfigError(f"{p}: cannot read the API-key file: {e}") from e
    entries = _parse(text, p)
    found = [e for e in entries if e.name == name]
    if not found:
        known = ", ".join(repr(e.name) for e in entries) or "none"
        raise AuthConfigError(f"{p}: no key named {name!r} (keys: {known})")
    kept = [e for e in entries if e.name != name]
    cut = _without_table(text, entries.index(found[0]))
    try:
        same = cut is not None and _parse(cut, p) == kept
    except AuthConfigError:
        same = False
    # not laid out as one [[keys]] table per entry: write the entries anew
    new_text = cut if same and cut is not None else _render(kept)
    if _parse(new_text, p) != kept:  # never write a file that loads differently
        raise AuthConfigError(f"{p}: cannot remove {name!r} without changing other entries")
    _write_atomic(p, new_text)
    return found[0]


def _toml_datetime(value: dt.datetime) -> str:
    """A TOML offset date-time in UTC, e.g. 2025-01-31T09:30:00Z."""
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _without_table(text: str, index: int) -> str | None:
    """`text` without its index-th [[keys]] table (header to the next table), or None when the
    file does not have that many [[keys]] headers."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _KEYS_TABLE.match(line)]
    if index >= len(starts):
        return None
    start = starts[index]
    if index + 1 < len(starts):
        end = starts[index + 1]
        while end - 1 > start and lines[end - 1].lstrip().startswith("#"):
            end -= 1  # comment lines just above the next table are about that table
    else:
        end = len(lines)
    if start > 0 and end == len(lines) and not lines[start - 1].strip():
        start -= 1  # the blank line add_key put before the last table
    return "".join(lines[:start] + lines[end:])


def _render(entries: Iterable[KeyEntry]) -> str:
    blocks = []
    for e in entries:
        block = (
            "[[keys]]\n"
            f"name = {json.dumps(e.name)}\n"
            f"role = {json.dumps(e.role)}\n"
            f"sha256 = {json.dumps(e.sha256)}\n"
        )
        if e.created is not None:
            block += f"created = {_toml_datetime(e.created)}\n"
        blocks.append(block)
    return "\n".join(blocks)


def _write_atomic(p: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace it: readers see the
    old file or the new one, never half of one. A new file is 0600; an existing one keeps its
    mode."""
    p.parent.mkdir(parents=True, exist_ok=True)
    mode = p.stat().st_mode & 0o777 if p.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
