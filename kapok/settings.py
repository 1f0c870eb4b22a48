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
