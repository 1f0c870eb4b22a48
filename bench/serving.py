"""How fast is Kapok's lending API, against its floor and a naive stack, on this machine? Times it.

    .venv/bin/python bench/serving.py [--home DIR] [--duration 15] [--concurrency 1,8,32]
                                      [--endpoints score,limit,price,explain,screen]
                                      [--screen-size 1000] [--wrk-threads 2]
                                      [--naive-explainer start|request] [--keep]
    .venv/bin/python bench/serving.py --quick     # CI: ~2 s runs, exit 1 if any run had errors

A load benchmark run by hand, never a test. It needs a trained KAPOK_HOME (`--home`, default
$KAPOK_HOME or the checkout): simulated enterprises in data/raw/registration, a materialized Feast
online store and the three `@champion` models in MLflow. Nothing under the home is written: each
server logs its decisions to a temporary SQLite file (KAPOK_DECISION_LOG) and runs with
BENTOML_HOME in a temporary folder, in demo mode (KAPOK_DEMO=1, no API keys).

Two servers, started one at a time on free loopback ports so they never share the cores while
measured (`--quick` starts both together to save a minute, then measures one at a time):

  kapok  `python -m bentoml serve serving.service:Kapok`, the API as shipped (feature cache,
         columnar decision core, decision log).
  naive  `bench/naive_service.py`: per request Feast `get_online_features` of the product's
         FeatureService, LightGBM predict and `shap.TreeExplainer` reasons; no cache, no log.

The load comes from `wrk` (installed with apt-get when missing) and `bench/serving_wrk.lua`: one
event-loop process in C that costs the server little CPU, closed loop (each connection sends its
next request when the previous answer arrived), keep-alive, `--timeout 60s` like the service.
Runs, each `--duration` seconds, at every `--concurrency` (connections); before them one cold
request per endpoint is timed, and cold runs of an endpoint that slow (a /screen of 1,000) are
lengthened to about five answers per connection, up to `--max-duration` (120 s):

  floor  GET /livez on the same server: BentoML's own HTTP path, no Kapok code.
  cold   every request a different enterprise id (a shuffled list of the home's ids; /screen sends
         `--screen-size` distinct ids per request), so Kapok's feature cache does not help. Ids
         are not reused on a server until its list is used up; runs after that are marked.
  warm   /score with the same enterprise id on every request (Kapok's feature cache hits).

Endpoints: /score, /limit, /price, /explain (reviewer's SHAP of every feature), /screen; the naive
stack only has /score (and, outside --quick, its own /livez floor). Reported per run: p50/p95/p99
latency (wrk's, over every answer), requests/s, errors (socket errors, timeouts and non-2xx
answers, with the first such answer), peak RSS of the server (VmRSS summed over its process tree,
sampled every 0.5 s); per server the start-up time (process start to the first 200 from /readyz)
and RSS once ready, per process (BentoML's `serve` arbiter imports the service module too). Then
the ratios: Kapok req/s / floor req/s, Kapok req/s / naive req/s (raw, and with each divided by
its own server's floor first, which takes out the machine's drift between the two servers'
turns), Kapok p50 - floor p50. Also printed: date, load average before and after, CPU count, the
command line; everything is written as JSON to bench/out/serving-<timestamp>.json. Exit status 1
when any run had an error or no answer, or a server did not start.

Time: start-up dominates (each server imports mlflow, feast, shap and lightgbm twice, in BentoML's
arbiter and in its worker: 30-40 s on an idle 2-core machine, more under load); then
`--duration` per run: the full default is 27 runs of 15 s (cold /screen runs up to 120 s), about
12 minutes in all; `--quick` has 10 runs of 2 s, so it takes the start-ups plus about 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "bench" / "serving_wrk.lua"
OUT = REPO / "bench" / "out"
ENDPOINTS = ("score", "limit", "price", "explain", "screen")
MiB = 1024 * 1024
SEED = 7

# one request per endpoint, @ID@ = enterprise id; /screen repeats ITEM at @ITEMS@
BODIES = {
    "score": '{"enterprise_id": "@ID@", "product": "microloan", '
    '"requested_amount": 300000, "term_months": 12}',
    "limit": '{"enterprise_id": "@ID@", "product": "microloan", '
    '"requested_amount": 2000000, "term_months": 12}',
    "price": '{"enterprise_id": "@ID@", "product": "guarantee", '
    '"amount": 1000000, "term_months": 12}',
    "explain": '{"enterprise_id": "@ID@", "product": "microloan"}',
    "screen": '{"product": "guarantee", "applicants": [@ITEMS@]}',
}
SCREEN_ITEM = '{"enterprise_id": "@ID@", "requested_amount": 500000, "term_months": 12}'


# -- the load generator --------------------------------------------------------------------------
def ensure_wrk() -> str:
    """wrk on PATH, installed from Debian's packages when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found: apt-get install -y -qq wrk", flush=True)
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(install, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench/serving.py: wrk is missing and `apt-get install wrk` failed (root needed)")
    return found


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def run_wrk(
    wrk: str, url: str, connections: int, threads: int, duration: float, script_args: list[str]
) -> dict[str, Any]:
    cmd = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
        "--timeout", "60s", "-s", str(LUA), url, "--", f"threads={threads}", *script_args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 180)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(
        f"wrk gave no result (exit {done.returncode}): {shlex.join(cmd)}\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


# -- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_rss(root: int) -> int:
    """Bytes: VmRSS summed over the process and all its descendants."""
    return sum(tree_rss_one(pid) for pid in process_tree(root))


def rss_by_process(root: int) -> list[tuple[str, int]]:
    """(role, bytes) of each process of the tree: BentoML's arbiter (`serve`), its workers."""
    out = []
    for pid in process_tree(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv:
            role = "serve"
        elif any(b"worker" in a for a in argv):
            role = "worker"
        else:
            role = Path(argv[0].decode(errors="replace")).name
        out.append((f"{role}[{pid}]", tree_rss_one(pid)))
    return out


def tree_rss_one(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of the process tree (its live processes, all their threads)."""
    ticks = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(root: int, quiet: float = 0.1, window: float = 0.5, timeout: float = 300) -> float:
    """Wait until the server uses under `quiet` of a core over `window` s: a run that ended with
    requests in flight (wrk stops at its duration, BentoML finishes them anyway) must not load
    the next run. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = tree_cpu_seconds(root)
        time.sleep(window)
        if tree_cpu_seconds(root) - before < quiet * window:
            break
    return time.monotonic() - t0


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.halt.wait(self.every)

    def stop(self) -> int:
        self.halt.set()
        self.join()
        return max(self.peak, tree_rss(self.pid))


@dataclass
class Server:
    name: str
    target: str  # module:Service for `bentoml serve`
    env: dict[str, str]
    log: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    started: float = 0.0
    startup_s: float | None = None
    rss_ready: int = 0
    rss_detail: str = ""  # per process of the tree
    cursor: int = 0  # next cold id on this server

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "bentoml", "serve", self.target,
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        out = self.log.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        out.close()

    def wait_ready(self, timeout: float = 600) -> float:
        assert self.proc is not None
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - self.started
                        self.rss_ready = tree_rss(self.proc.pid)
                        self.rss_detail = ", ".join(
                            f"{name} {rss / MiB:.0f}" for name, rss in rss_by_process(self.proc.pid)
                        )
                        return self.startup_s
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} server not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the server (BentoML stops its workers), SIGKILL to its group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def post(url: str, body: str, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def fill(endpoint: str, ids: list[str]) -> str:
    if endpoint == "screen":
        items = ", ".join(SCREEN_ITEM.replace("@ID@", i) for i in ids)
        return BODIES["screen"].replace("@ITEMS@", items)
    return BODIES[endpoint].replace("@ID@", ids[0])


# -- one run -------------------------------------------------------------------------------------
@dataclass
class Plan:
    wrk: str
    ids_file: Path
    cold_ids: list[str]
    warm_id: str
    duration: float
    max_duration: float
    wrk_threads: int
    screen_size: int
    probe_s: dict[tuple[str, str], float] = field(default_factory=dict)  # (server, endpoint)

    def per_request(self, endpoint: str) -> int:
        return self.screen_size if endpoint == "screen" else 1

    def seconds(self, server: str, endpoint: str, kind: str, connections: int) -> float:
        """--duration, or longer for a slow endpoint: about five answers per connection when one
        cold request alone takes `probe` seconds and the server works through them one by one."""
        probe = self.probe_s.get((server, endpoint), 0.0) if kind == "cold" else 0.0
        return max(self.duration, min(self.max_duration, round(5 * probe * connections)))


def preflight(server: Server, endpoints: list[str], plan: Plan) -> None:
    """Per endpoint one request with the warm id and one with cold ids, timed: both must answer
    200 before anything is measured."""
    for endpoint in endpoints:
        per = plan.per_request(endpoint)
        status, text = post(f"{server.base}/{endpoint}", fill(endpoint, [plan.warm_id] * per))
        if status == 200:
            start = server.cursor % len(plan.cold_ids)
            ids = (plan.cold_ids * 2)[start : start + per]
            server.cursor += per
            t0 = time.perf_counter()
            status, text = post(f"{server.base}/{endpoint}", fill(endpoint, ids))
            plan.probe_s[(server.name, endpoint)] = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(
                f"{server.name} /{endpoint} answered {status}: {text[:1000]}\n"
                f"server log:\n{server.tail()}"
            )


def measure(
    plan: Plan, server: Server, endpoint: str, kind: str, connections: int
) -> dict[str, Any]:
    """One wrk run: `kind` floor (GET /livez), cold (a new id per request) or warm (one id)."""
    assert server.proc is not None
    per = plan.per_request(endpoint)
    threads = max(1, min(plan.wrk_threads, connections))
    start = server.cursor % len(plan.cold_ids)
    seconds = plan.seconds(server.name, endpoint, kind, connections)
    if kind == "floor":
        path, args = "/livez", ["mode=get"]
    elif kind == "warm":
        if per > 1:
            raise ValueError("warm runs are single-id endpoints only")
        template = BODIES[endpoint]
        path, args = f"/{endpoint}", ["mode=fixed", f"id={plan.warm_id}", f"template={template}"]
    else:
        path = f"/{endpoint}"
        args = [
            "mode=cold", f"ids={plan.ids_file}", f"start={start}", f"per={per}",
            f"template={BODIES[endpoint]}", f"item={SCREEN_ITEM}",
        ]  # fmt: skip
    settled = settle(server.proc.pid)
    load_before = os.getloadavg()
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    result = run_wrk(plan.wrk, server.base + path, connections, threads, seconds, args)
    rss_peak = sampler.stop()
    seconds = result["duration_us"] / 1e6
    requests = result["requests"]
    socket_errors = sum(
        result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    run: dict[str, Any] = {
        "stack": server.name,
        "endpoint": endpoint,
        "kind": kind,
        "concurrency": connections,
        "wrk_threads": threads,
        "duration_s": round(seconds, 3),
        "applicants_per_request": per if kind != "floor" else 0,
        "requests": requests,
        "req_per_s": round(requests / seconds, 2) if seconds else 0.0,
        "p50_ms": result["p50_us"] / 1000,
        "p95_ms": result["p95_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "mean_ms": round(result["latency_mean_us"] / 1000, 3),
        "max_ms": result["latency_max_us"] / 1000,
        "errors": socket_errors + result["non2xx"],
        "error_detail": {k: result[k] for k in (
            "connect_errors", "read_errors", "write_errors", "timeouts", "non2xx")},
        "first_error": result["first_error"],
        "rss_peak_mib": round(rss_peak / MiB, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "settle_s": round(settled, 1),
    }  # fmt: skip
    if kind == "floor":
        run["endpoint"] = "livez"
    if per > 1:
        run["applicants_per_s"] = round(run["req_per_s"] * per, 1)
    if kind == "cold":
        used = max(result["sent_per_thread"], default=0) * threads * per
        server.cursor += used
        run["ids_from"], run["ids_used"] = start, used
        run["ids_fresh"] = server.cursor <= len(plan.cold_ids)  # no id sent twice to this server
    return run


def show(run: dict[str, Any]) -> str:
    ids = {"floor": "-", "warm": "1 id", "cold": "cold"}[run["kind"]]
    if run["kind"] == "cold" and not run["ids_fresh"]:
        ids = "reused"
    per = run["applicants_per_request"]
    endpoint = f"/{run['endpoint']}" + (f" x{per}" if per > 1 else "")
    notes = []
    if run["errors"]:
        notes.append(f"{run['errors']} errors: {run['first_error'][:80]}")
    if 0 < run["requests"] < 100:
        notes.append("few requests: p99 ~ max")
    if not run["requests"]:
        notes.append("NO ANSWER")
    if run["settle_s"] > 1:
        notes.append(f"began after {run['settle_s']:.0f} s: the server was still busy")
    return (
        f"{run['stack']:<6} {endpoint:<14} {ids:<6} {run['concurrency']:>4} "
        f"{run['duration_s']:>5.0f} {run['req_per_s']:>9.1f} {run['p50_ms']:>9.2f} "
        f"{run['p95_ms']:>9.2f} {run['p99_ms']:>9.2f} {run['requests']:>8} {run['errors']:>6} "
        f"{run['rss_peak_mib']:>8.0f}  {'; '.join(notes)}"
    )


HEADER = (
    f"{'stack':<6} {'endpoint':<14} {'ids':<6} {'conc':>4} {'secs':>5} {'req/s':>9} {'p50 ms':>9} "
    f"{'p95 ms':>9} {'p99 ms':>9} {'requests':>8} {'errors':>6} {'RSS MiB':>8}"
)


RATIO_HEADER = (
    f"\n{'endpoint':<10} {'ids':<5} {'conc':>4} {'kapok/floor req/s':>18} "
    f"{'kapok/naive req/s':>18} {'same, per floor':>16} {'p50 - floor p50 ms':>19}"
)


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(stack: str, endpoint: str, kind: str, c: int) -> dict[str, Any] | None:
        return next(
            (r for r in runs if (r["stack"], r["endpoint"], r["kind"], r["concurrency"])
             == (stack, endpoint, kind, c)),
            None,
        )  # fmt: skip

    out = []
    for r in runs:
        if r["stack"] != "kapok" or r["kind"] == "floor" or not r["requests"]:
            continue
        floor = find("kapok", "livez", "floor", r["concurrency"])
        naive = find("naive", r["endpoint"], "cold", r["concurrency"])
        naive_floor = find("naive", "livez", "floor", r["concurrency"])
        row: dict[str, Any] = {
            "endpoint": r["endpoint"],
            "kind": r["kind"],
            "concurrency": r["concurrency"],
            "kapok_per_floor_rps": None,
            "kapok_per_naive_rps": None,
            "kapok_per_naive_rps_floor_adjusted": None,
            "p50_minus_floor_ms": None,
        }
        if floor and floor["req_per_s"]:
            row["kapok_per_floor_rps"] = round(r["req_per_s"] / floor["req_per_s"], 4)
            row["p50_minus_floor_ms"] = round(r["p50_ms"] - floor["p50_ms"], 3)
        if naive and naive["req_per_s"]:
            row["kapok_per_naive_rps"] = round(r["req_per_s"] / naive["req_per_s"], 3)
            if floor and floor["req_per_s"] and naive_floor and naive_floor["req_per_s"]:
                # each server's req/s as a share of its own floor, measured minutes apart: the
                # ratio without the machine's drift between the two servers' turns
                kapok_share = r["req_per_s"] / floor["req_per_s"]
                naive_share = naive["req_per_s"] / naive_floor["req_per_s"]
                row["kapok_per_naive_rps_floor_adjusted"] = round(kapok_share / naive_share, 3)
        out.append(row)
    return out


def probes(plan: Plan, server: str) -> str:
    timed = [f"/{e} {t * 1000:.0f} ms" for (s, e), t in plan.probe_s.items() if s == server]
    return "one cold request: " + ", ".join(timed)


def loadavg(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", default=os.environ.get("KAPOK_HOME", str(REPO)))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument(
        "--max-duration",
        type=float,
        default=120.0,
        help="cold runs of a slow endpoint are lengthened to ~5 answers per connection, up to this",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="connections, comma-separated")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--screen-size", type=int, default=1000, help="applicants per /screen")
    parser.add_argument("--wrk-threads", type=int, default=2, help="at most one per connection")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI: 2 s runs, concurrency 1,8, /score and /screen of 10, servers started together",
    )
    parser.add_argument(
        "--naive-explainer",
        choices=("start", "request"),
        default="start",
        help="naive stack: build shap.TreeExplainer once at start-up or on every request",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.max_duration, args.concurrency, args.screen_size = 2.0, 2.0, "1,8", 10
        args.endpoints = "score,screen"
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--concurrency: comma-separated whole numbers, got {args.concurrency!r}")
    args.endpoints = [e.strip().lstrip("/") for e in args.endpoints.split(",") if e.strip()]
    unknown = [e for e in args.endpoints if e not in ENDPOINTS]
    if unknown:
        parser.error(f"--endpoints: unknown {', '.join(unknown)}; choose from {ENDPOINTS}")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: at least one value, each >= 1")
    if not 1 <= args.screen_size <= 1000:
        parser.error("--screen-size: 1 to 1000 (the API's limit)")
    return args


def enterprise_ids(home: Path) -> list[str]:
    from features import raw_tables
    from kapok.settings import Paths

    try:
        ids = sorted(raw_tables.enterprise_ids(Paths(home).raw).to_list())
    except (FileNotFoundError, raw_tables.RawTableError) as e:
        sys.exit(f"bench/serving.py: {e}")
    random.Random(SEED).shuffle(ids)
    return ids


def server_env(home: Path, work: Path, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KAPOK_API_KEYS", None)
    env.update(
        KAPOK_HOME=str(home),
        KAPOK_DEMO="1",
        KAPOK_DECISION_LOG=f"sqlite:///{work / name / 'decisions.db'}",
        BENTOML_HOME=str(work / name / "bentoml"),
        BENTOML_DO_NOT_TRACK="True",
        FEAST_USAGE="False",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
    )
    (work / name).mkdir(parents=True, exist_ok=True)
    return env


def git_version() -> str:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    command = shlex.join([sys.executable, *sys.argv])
    home = Path(args.home).expanduser().resolve()
    wrk = ensure_wrk()
    ids = enterprise_ids(home)
    warm_id, cold = ids[0], ids[1:]
    work = Path(tempfile.mkdtemp(prefix="kapok-bench-serving-"))
    ids_file = work / "ids.txt"
    ids_file.write_text("\n".join(cold) + "\n")
    plan = Plan(wrk, ids_file, cold, warm_id, args.duration, args.max_duration, args.wrk_threads,
                args.screen_size)  # fmt: skip
    load_start = os.getloadavg()
    print(f"date      {started.isoformat(timespec='seconds')}")
    print(f"command   {command}")
    print(f"machine   {os.cpu_count()} CPUs, load average {loadavg(load_start)}")
    print(f"load      {wrk_version(wrk)} + bench/serving_wrk.lua, --timeout 60s")
    print(f"home      {home} ({len(ids):,} enterprises); work folder {work}")
    print(f"runs      {args.duration:g} s each, concurrency {args.concurrency}, "
          f"endpoints {args.endpoints}, /screen of {args.screen_size}", flush=True)  # fmt: skip

    servers = {
        "kapok": Server("kapok", "serving.service:Kapok", server_env(home, work, "kapok"),
                        work / "kapok.log"),
        "naive": Server("naive", "bench.naive_service:Naive", server_env(home, work, "naive"),
                        work / "naive.log"),
    }  # fmt: skip
    servers["naive"].env["KAPOK_NAIVE_EXPLAINER"] = args.naive_explainer
    runs: list[dict[str, Any]] = []
    failure = None

    def ready(server: Server) -> None:
        if server.proc is None:
            server.start()
        startup = server.wait_ready()
        print(f"\n{server.name}: ready in {startup:.1f} s, RSS {server.rss_ready / MiB:.0f} MiB "
              f"({server.rss_detail})", flush=True)  # fmt: skip

    def record(run: dict[str, Any]) -> None:
        runs.append(run)
        print(show(run), flush=True)

    try:
        if args.quick:  # both start together, one wait instead of two; neither measured meanwhile
            for server in servers.values():
                server.start()
            for server in servers.values():
                ready(server)
        kapok = servers["kapok"]
        if kapok.startup_s is None:
            ready(kapok)
        preflight(kapok, args.endpoints, plan)
        print(probes(plan, "kapok"), flush=True)
        print(f"\n{HEADER}", flush=True)
        for c in args.concurrency:
            record(measure(plan, kapok, "livez", "floor", c))
            for endpoint in args.endpoints:
                record(measure(plan, kapok, endpoint, "cold", c))
                if endpoint == "score":
                    record(measure(plan, kapok, endpoint, "warm", c))
        kapok.stop()
        if "score" in args.endpoints:
            naive = servers["naive"]
            if naive.startup_s is None:
                ready(naive)
            preflight(naive, ["score"], plan)
            print(probes(plan, "naive"), flush=True)
            print(f"\n{HEADER}", flush=True)
            for c in args.concurrency:
                if not args.quick:  # does the machine's speed drift between the two servers?
                    record(measure(plan, naive, "livez", "floor", c))
                record(measure(plan, naive, "score", "cold", c))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        failure = str(e)
        print(f"\nFAILED: {failure}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()

    table = ratios(runs)
    load_end = os.getloadavg()
    together = " - both servers started together (--quick): not comparable" if args.quick else ""
    print(f"\nstart-up (process start to /readyz 200) and RSS once ready{together}")
    for s in servers.values():
        if s.startup_s is not None:
            print(f"  {s.name:<6} {s.startup_s:6.1f} s  {s.rss_ready / MiB:6.0f} MiB")
    print(f"\nall runs\n{HEADER}")
    for run in sorted(runs, key=lambda r: (r["stack"], r["endpoint"], r["kind"], r["concurrency"])):
        print(show(run))
    print(RATIO_HEADER)
    for r in sorted(table, key=lambda r: (r["endpoint"], r["kind"], r["concurrency"])):
        print(
            f"/{r['endpoint']:<9} {r['kind']:<5} {r['concurrency']:>4} "
            f"{fmt(r['kapok_per_floor_rps'], '.3f'):>18} {fmt(r['kapok_per_naive_rps'], '.2f'):>18}"
            f" {fmt(r['kapok_per_naive_rps_floor_adjusted'], '.2f'):>16}"
            f" {fmt(r['p50_minus_floor_ms'], '.2f'):>19}"
        )
    bad = [r for r in runs if r["errors"] or not r["requests"]]
    elapsed = time.monotonic() - t0
    print(f"\nload average {loadavg(load_start)} before, {loadavg(load_end)} after; "
          f"{os.cpu_count()} CPUs; {elapsed:.0f} s in all")  # fmt: skip

    result = {
        "date": started.isoformat(),
        "command": command,
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "elapsed_s": round(elapsed, 1),
        "git": git_version(),
        "load_generator": wrk_version(wrk) + " + bench/serving_wrk.lua",
        "home": str(home),
        "enterprises": len(ids),
        "options": {
            "duration_s": args.duration,
            "max_duration_s": args.max_duration,
            "concurrency": args.concurrency,
            "endpoints": args.endpoints,
            "screen_size": args.screen_size,
            "wrk_threads": args.wrk_threads,
            "naive_explainer": args.naive_explainer,
            "quick": args.quick,
        },
        "servers": {
            s.name: {
                "target": s.target,
                "startup_s": None if s.startup_s is None else round(s.startup_s, 2),
                "rss_ready_mib": round(s.rss_ready / MiB, 1),
                "rss_ready_by_process_mib": s.rss_detail,
                "started_together": args.quick,
            }
            for s in servers.values()
        },
        "probe_s": {f"{k[0]} /{k[1]}": round(v, 4) for k, v in plan.probe_s.items()},
        "runs": runs,
        "ratios": table,
        "failure": failure,
        "runs_with_errors": len(bad),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"serving-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written   {out.relative_to(REPO)}")
    if args.keep:
        print(f"kept      {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failure or bad:
        print(f"{len(bad)} run(s) with errors or no answer" if bad else "failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
