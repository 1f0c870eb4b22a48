"""Where Kapok reads and writes: every path derives from one setting, KAPOK_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def kapok_home() -> Path:
    """KAPOK_HOME from the environment; default: the repository root."""
    value = os.environ.get("KAPOK_HOME")
    return Path(value).expanduser().resolve() if value else REPO_ROOT


@dataclass(frozen=True)
class Paths:
    """The layout under KAPOK_HOME. Nothing Kapok writes lives anywhere else."""

    home: Path

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def raw(self) -> Path:
        """Raw tables exported by the regional big-data system (or its simulator)."""
        return self.data / "raw"

    @property
    def features(self) -> Path:
        """Point-in-time feature tables, one folder per source family (Feast's offline store)."""
        return self.data / "features"

    @property
    def feature_repo(self) -> Path:
        return self.home / "feature_repo"

    @property
    def feast_data(self) -> Path:
        """Feast registry and SQLite online store."""
        return self.feature_repo / "data"

    @property
    def mlruns(self) -> Path:
        return self.home / "mlruns"


def paths() -> Paths:
    return Paths(kapok_home())


def online_store_url() -> str:
    """KAPOK_ONLINE_STORE: 'sqlite' (default) or a redis:// URL such as redis://127.0.0.1:6379."""
    return os.environ.get("KAPOK_ONLINE_STORE", "sqlite").strip() or "sqlite"


def feast_registry_url() -> str:
    """KAPOK_FEAST_REGISTRY: 'file' (default: KAPOK_HOME/feature_repo/data/registry.db) or a
    postgresql:// URL, the SQL registry several API replicas and workers share."""
    return os.environ.get("KAPOK_FEAST_REGISTRY", "file").strip() or "file"


# -- the lending API's access limits (serving/access.py applies them) ---------------------------
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a /screen of 1,000 applicants is ~92 KB of JSON


def max_body_bytes() -> int:
    """KAPOK_MAX_BODY_BYTES: the largest request body the API reads (default 1 MiB; above it
    413). A whole number of bytes ≥ 1; ValueError (one line) otherwise."""
    value = os.environ.get("KAPOK_MAX_BODY_BYTES", "").strip().replace("_", "")
    if not value:
        return DEFAULT_MAX_BODY_BYTES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"KAPOK_MAX_BODY_BYTES must be a whole number of bytes ≥ 1 (default "
            f"{DEFAULT_MAX_BODY_BYTES}), got {value!r}"
        )
    return int(value)


_PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
            "hour": 3600}  # fmt: skip


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` per `seconds` per API key (a token bucket of `requests` tokens)."""

    requests: int
    seconds: int

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour"}[self.seconds]
        return f"{self.requests} requests per {unit}"


def parse_rate_limit(value: str) -> RateLimit | None:
    """'600/minute' (also /second, /hour, /s, /min, /h) → RateLimit; 'off', '0', '' → None."""
    text = value.strip().lower()
    if text in ("", "off", "0", "none"):
        return None
    count, _, period = text.replace(" ", "").partition("/")
    seconds = _PERIODS.get(period) or _PERIODS.get(period.removesuffix("s"))
    if not count.isdigit() or seconds is None:
        raise ValueError(
            "KAPOK_RATE_LIMIT must be N/second, N/minute or N/hour (e.g. 600/minute), "
            f"or off, got {value!r}"
        )
    return RateLimit(int(count), seconds) if int(count) > 0 else None


def rate_limit() -> RateLimit | None:
    """KAPOK_RATE_LIMIT: requests per API key (e.g. 600/minute); unset or 'off': no limit."""
    return parse_rate_limit(os.environ.get("KAPOK_RATE_LIMIT", ""))
