"""KAPOK_ENGINE: where Kapok's batch work runs (the feature build, Feast's historical retrieval and
materialization, batch decisions).

- ``local`` (default): this process and its own process pool, as on a laptop.
- ``ray``: a Ray instance started by this process on this machine (Ray's local mode), limited to
  KAPOK_RAY_CPUS cores and KAPOK_RAY_MEMORY bytes of object store, so it never takes the whole
  machine.
- ``ray://HOST:PORT`` (Ray Client) or ``auto`` (the cluster this machine's ``ray start`` joined):
  an existing Ray cluster; its size is the cluster's, the limits above do not apply.

The same code runs either way (docs/SCALING.md); only where the chunks run changes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Literal

# Ray's usage statistics are off before Ray is imported anywhere (no network beyond loopback)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class EngineConfigError(ValueError):
    """KAPOK_ENGINE, KAPOK_RAY_CPUS or KAPOK_RAY_MEMORY is not understood; one line says why."""


@dataclass(frozen=True)
class Engine:
    kind: Literal["local", "ray"]
    address: str | None = None  # None: start Ray on this machine; else ray://HOST:PORT or auto

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"

    def __str__(self) -> str:
        if self.kind == "local":
            return "local"
        return f"ray ({self.address})" if self.address else "ray (local mode on this machine)"


def parse_engine(value: str) -> Engine:
    """'local' | 'ray' | 'ray://HOST:PORT' | 'auto' (case-insensitive, blank: local)."""
    text = value.strip()
    low = text.lower()
    if low in ("", "local"):
        return Engine("local")
    if low == "ray":
        return Engine("ray")
    if low == "auto":
        return Engine("ray", "auto")
    if low.startswith("ray://"):
        host, _, port = text[len("ray://") :].partition(":")
        if host and port.isdigit():
            return Engine("ray", text)
    raise EngineConfigError(
        "KAPOK_ENGINE must be 'local' (default), 'ray' (Ray on this machine), "
        f"'ray://HOST:PORT' or 'auto' (an existing Ray cluster), got {value!r}"
    )


def engine() -> Engine:
    """KAPOK_ENGINE from the environment."""
    return parse_engine(os.environ.get("KAPOK_ENGINE", ""))


def _whole(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name, "").strip().replace("_", "")
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise EngineConfigError(f"{name} must be a whole number ≥ {minimum}, got {value!r}")
    return int(value)


def ray_cpus() -> int:
    """KAPOK_RAY_CPUS: cores a local Ray may use (default: every core, at most 4)."""
    return _whole("KAPOK_RAY_CPUS", max(1, min(os.cpu_count() or 1, 4)), 1)


DEFAULT_OBJECT_STORE = 2 << 30  # 2 GiB: a 100,000-enterprise chunk's tables are ~50 MB


def ray_memory() -> int:
    """KAPOK_RAY_MEMORY: bytes of shared object store for a local Ray (default 2 GiB, at least
    80 MB, Ray's own minimum). Ray's default is 30% of the machine's memory."""
    return _whole("KAPOK_RAY_MEMORY", DEFAULT_OBJECT_STORE, 80 * 1024 * 1024)


def ray_conf() -> dict:
    """ray.init keyword arguments for the current engine: the limits for a local Ray, the
    address for a cluster. Also rendered into feature_store.yaml (the Ray offline store's
    ray_conf), so that Feast's Ray and Kapok's agree."""
    e = engine()
    if not e.is_ray:
        raise EngineConfigError("KAPOK_ENGINE is 'local': no Ray configuration")
    if e.address:
        return {"address": e.address}
    return {"num_cpus": ray_cpus(), "object_store_memory": ray_memory()}


_lock = threading.Lock()


def ray_init() -> None:
    """Connect to (or start) the engine's Ray once per process; later calls do nothing.

    No dashboard, no usage statistics, and the workers' logs stay in Ray's session folder rather
    than interleaving with Kapok's progress bars. Workers import Kapok from the same
    installation as this process (the package is installed, editable or not)."""
    import ray

    with _lock:
        if ray.is_initialized():
            return
        conf = ray_conf()
        if "address" not in conf:  # starting Ray here: no dashboard process
            conf["include_dashboard"] = False
            conf["_node_ip_address"] = "127.0.0.1"  # loopback only: no port on the network
        ray.init(**conf, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)


def ray_shutdown() -> None:
    import ray

    with _lock:
        if ray.is_initialized():
            ray.shutdown()
