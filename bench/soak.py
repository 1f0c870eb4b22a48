"""Load and soak: the lending API at a steady rate for minutes, mixed endpoints, checked for what a
lender would notice — errors, latency creeping up, memory growing, decisions answered but not
logged (issue 12, item 2).

    python bench/soak.py --home /tmp/kh --share 0.8 --minutes 10     # by hand: 80% of capacity
    python bench/soak.py --home /tmp/kapok-bench-smoke --rate 20 --minutes 0.5 --smoke   # CI

The rate is requests a second across the mix. With `--share`, the script first measures the
mix's capacity on this server in this run (closed loop, 8 connections, `--probe` seconds, as
`bench/serving.py` measures each endpoint at 8 clients) and soaks at that share of it; `--rate`
sets it by hand instead. The server is Kapok in demo mode with its own decision log (SQLite in a
temporary folder, so the row count is this run's alone). The client is an asyncio loop in this
process on raw keep-alive HTTP/1.1 connections that starts requests on a fixed schedule, whatever
the server's latency (open loop: a slow server builds a queue, as real traffic would), a
different enterprise per request; the client's own CPU is printed so that a run where the
client, not the server, was the limit shows it.

Checks, each printed with its figures; the exit status is 1 if any fails:
- no error: every answer is 200 (a 4xx/5xx or a connection error is an error);
- the 99th percentile latency of the last minute (the last third when shorter) within 1.5× of the
  first one's;
- the server's resident memory (all its processes) grows less than 10% from the end of the first
  window to the end of the run;
- the decision log holds exactly one row per logged decision answered 200 (/score, /limit,
  /price; each /screen applicant).
Run by hand, never as a timed test; `make bench-smoke` runs the 30-second version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kapok  # noqa: F401  (telemetry off)

# bench/serving.py's server and helpers (loaded by path: `serving` is also Kapok's package)
_spec = importlib.util.spec_from_file_location(
    "bench_serving", Path(__file__).with_name("serving.py")
)
bench_serving = importlib.util.module_from_spec(_spec)
sys.modules["bench_serving"] = bench_serving  # dataclasses look their module up there
_spec.loader.exec_module(bench_serving)
Server, enterprise_ids = bench_serving.Server, bench_serving.enterprise_ids
server_env, tree_rss = bench_serving.server_env, bench_serving.tree_rss

# endpoint, share of requests, applicants per request (logged decisions per 200)
MIX = (("score", 0.5, 1), ("limit", 0.2, 1), ("price", 0.2, 1), ("explain", 0.08, 0),
       ("screen", 0.02, 20))  # fmt: skip
BODY = {
    "score": {"product": "microloan", "requested_amount": 300000, "term_months": 12},
    "limit": {"product": "microloan", "requested_amount": 2000000, "term_months": 12},
    "price": {"product": "guarantee", "amount": 1000000, "term_months": 12},
    "explain": {"product": "microloan"},
}


def body(endpoint: str, ids: list[str]) -> bytes:
    if endpoint == "screen":
        payload: dict = {
            "product": "guarantee",
            "applicants": [
                {"enterprise_id": i, "requested_amount": 500000, "term_months": 12} for i in ids
            ],
        }
    else:
        payload = {"enterprise_id": ids[0], **BODY[endpoint]}
    return json.dumps(payload).encode()


class Http:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: a pool of connections to one
    host, one request at a time per connection. httpx's AsyncClient cost ~6 ms of client CPU per
    request here, so at 150 requests/s the load generator, not the server, was the limit; this
    costs a few hundred microseconds (JSON bodies in, status and body length out)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, payload: bytes) -> int:
        """POST `payload` (JSON) to `path`; the status, or 0 on a connection error. A kept-alive
        connection the server has closed meanwhile (its keep-alive timeout) is retried once on a
        new connection, as HTTP clients do: nothing was sent on it."""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        while self.idle:
            status = await self._exchange(self.idle.pop(), head + payload)
            if status != -1:
                return status
        try:
            conn = await self._connect()
        except OSError:
            return 0
        return max(await self._exchange(conn, head + payload), 0)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> int:
        """One request on `conn`: its status; 0 on an error; -1 if the server had closed the
        connection before answering anything (stale keep-alive)."""
        reader, writer = conn
        try:
            writer.write(request)
            first = await reader.readline()
            if not first:
                writer.close()
                return -1
            status = int(first.split()[1])
            length, chunked, close = 0, False, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value:
                    chunked = True
                elif name == "connection" and value == "close":
                    close = True
            if chunked:
                while size := int((await reader.readline()).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readline()
            else:
                await reader.readexactly(length)
        except ConnectionResetError:
            writer.close()
            return -1
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            writer.close()
            return 0
        if close:
            writer.close()
        else:
            self.idle.append(conn)
        return status

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class Mix:
    """The endpoint of each request, drawn with the mix's shares, and the enterprises it asks
    about, taken in turn so that each request reads features not read before (while they last)."""

    def __init__(self, ids: list[str], seed: int):
        self.ids, self.cursor = ids, 0
        self.rng = np.random.default_rng(seed)
        self.names = [m[0] for m in MIX]
        shares = np.array([m[1] for m in MIX])
        self.p = shares / shares.sum()
        self.per = {m[0]: max(m[2], 1) for m in MIX}

    def next(self) -> tuple[str, bytes]:
        endpoint = self.names[int(self.rng.choice(len(self.names), p=self.p))]
        n = self.per[endpoint]
        chosen = [self.ids[(self.cursor + j) % len(self.ids)] for j in range(n)]
        self.cursor += n
        return endpoint, body(endpoint, chosen)


async def timed(
    http: Http, endpoint: str, payload: bytes, at: float, out: list, label: str = ""
) -> None:
    start = time.monotonic()
    status = await http.post(f"/{endpoint}", payload)
    out.append((at, label or endpoint, status, time.monotonic() - start))


async def drive(base: str, rate: float, seconds: float, mix: Mix) -> tuple[list, float]:
    """Start requests at `rate` a second for `seconds`: [(start offset, endpoint, status, s)] and
    how late, at worst, a request started against its schedule (the client keeping up)."""
    url = urlsplit(base)
    http = Http(url.hostname or "127.0.0.1", url.port or 80)
    results: list[tuple[float, str, int, float]] = []
    pending: set[asyncio.Task] = set()
    t0, late = time.monotonic(), 0.0
    for i in range(int(rate * seconds)):
        at = i / rate
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        endpoint, payload = mix.next()
        task = asyncio.create_task(timed(http, endpoint, payload, at, results))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    await http.close()
    return results, late


async def capacity(base: str, seconds: float, mix: Mix, connections: int = 8) -> tuple[float, list]:
    """Closed loop: `connections` requests always in flight for `seconds`; answered requests a
    second (of the mix) and the results (the log counts their decisions too)."""
    url = urlsplit(base)
    http = Http(url.hostname or "127.0.0.1", url.port or 80)
    results: list[tuple[float, str, int, float]] = []
    t0 = time.monotonic()

    async def worker() -> None:
        while time.monotonic() - t0 < seconds:
            endpoint, payload = mix.next()
            await timed(http, endpoint, payload, time.monotonic() - t0, results)

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.monotonic() - t0
    await http.close()
    return sum(1 for r in results if r[2] == 200) / elapsed, results


async def warm(base: str, ids: list[str], passes: int, batch: int = 500) -> list:
    """Bring the server to its steady state before the soak: every enterprise screened `passes`
    times in /screen batches of `batch`, 8 connections. Each API worker keeps the features it has
    read in a bounded per-enterprise cache, so a cold server's memory grows for as long as the
    soak meets enterprises it has not seen (up to the cache's bound) — a filling cache, not a
    leak. Which worker answers a batch is the server's choice, so each pass warms each worker
    with about even odds; 4 passes leave ~6% of ids cold per worker with 2 workers.
    The results (endpoint "warm") count in the log check like any /screen."""
    url = urlsplit(base)
    http = Http(url.hostname or "127.0.0.1", url.port or 80)
    results: list[tuple[float, str, int, float]] = []
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)] * passes
    queue = iter(chunks)
    t0 = time.monotonic()

    async def worker() -> None:
        for chunk in queue:
            payload = body("screen", chunk)
            at = time.monotonic() - t0
            await timed(http, "screen", payload, at, results, label=f"warm{len(chunk)}")

    await asyncio.gather(*(worker() for _ in range(8)))
    await http.close()
    bad = sum(1 for r in results if r[2] != 200)
    print(f"warm-up: {len(ids):,} enterprises × {passes} passes in {time.monotonic() - t0:.0f} s "
          f"({len(results):,} /screen of ≤{batch}, {bad} not 200)")  # fmt: skip
    return results


async def sample_rss(pid: int, every: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), tree_rss(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def run(
    server: Server,
    rate: float | None,
    share: float,
    probe: float,
    seconds: float,
    mix: Mix,
    warm_passes: int = 0,
) -> tuple[float, list, list, list]:
    """The warm-up (`warm_passes` > 0), the capacity probe (when `rate` is None), then the soak
    with the server's memory sampled each second: (rate, warm-up and probe results, soak
    results, [(s since the soak started, RSS)])."""
    probed: list = []
    if warm_passes:
        print(f"server memory before the warm-up: {tree_rss(server.proc.pid) / 2**20:.0f} MiB")
        probed += await warm(server.base, mix.ids, warm_passes)
    if rate is None:
        cap, capacity_results = await capacity(server.base, probe, mix)
        probed += capacity_results
        rate = share * cap
        print(f"capacity of the mix: {cap:.1f} answered requests/s (8 connections, {probe:.0f} s); "
              f"soaking at {share:.0%}: {rate:.1f} requests/s")  # fmt: skip
    rss: list[tuple[float, int]] = []
    stop = asyncio.Event()
    assert server.proc is not None
    sampler = asyncio.create_task(sample_rss(server.proc.pid, 1.0, rss, stop))
    started = time.monotonic()
    results, late = await drive(server.base, rate, seconds, mix)
    stop.set()
    await sampler
    print(f"the client started every request within {late * 1000:.0f} ms of its schedule")
    return rate, probed, results, [(t - started, v) for t, v in rss]


def minute_table(
    at: np.ndarray, ok: np.ndarray, latency: np.ndarray, rss: list, seconds: float
) -> str:
    """Per minute of the soak (per tenth when shorter than 3 minutes): requests, errors,
    latency percentiles and the server's memory at the window's end, to see where latency or
    memory moved."""
    width = 60.0 if seconds >= 180 else seconds / 10
    lines = ["  window     requests  errors   p50 ms   p99 ms   max ms   RSS MiB"]
    for k in range(int(np.ceil(seconds / width))):
        lo, hi = k * width, (k + 1) * width
        sel = (at >= lo) & (at < hi)
        good = sel & ok
        end = [v for t, v in rss if t < hi]
        p50, p99, top = (
            (np.percentile(latency[good], q) * 1000 for q in (50, 99, 100))
            if good.any()
            else (np.nan,) * 3
        )
        lines.append(
            f"  {lo:4.0f}-{hi:<4.0f} s {int(sel.sum()):9,} {int((sel & ~ok).sum()):7,} "
            f"{p50:8.1f} {p99:8.1f} {top:8.1f} {(end[-1] if end else 0) / 2**20:9.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="requests a second (the mix), set by hand")
    how.add_argument(
        "--share", type=float, help="soak at this share of the mix's capacity, measured first"
    )
    parser.add_argument("--probe", type=float, default=30.0, help="capacity probe length, s")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        metavar="PASSES",
        help="screen every enterprise PASSES times before the probe and soak, so that the "
        "servers' feature caches are full and memory growth measures leaks, not a filling cache",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: only errors and unlogged decisions fail the run; latency and memory drift "
        "over 30 s on a tiny home are printed, not judged",
    )
    args = parser.parse_args()
    home = args.home.resolve()
    seconds = args.minutes * 60
    window = 60.0 if seconds >= 180 else seconds / 3
    mix = Mix(enterprise_ids(home), seed=7)
    work = Path(tempfile.mkdtemp(prefix="kapok-soak-"))
    env = server_env(home, work, "kapok")
    server = Server("kapok", "serving.service:Kapok", env, work / "kapok.log")
    load = os.getloadavg()
    target = f"{args.rate:g} requests/s" if args.rate else f"{args.share:.0%} of capacity"
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}/{load[1]:.2f}/"
        f"{load[2]:.2f}, {target} for {seconds:.0f} s, mix "
        + ", ".join(f"{e} {s:.0%}" for e, s, _ in MIX)
    )
    server.start()
    try:
        print(f"server ready in {server.wait_ready():.1f} s")
        cpu0, wall0 = time.process_time(), time.monotonic()
        rate, probed, results, rss = asyncio.run(
            run(server, args.rate, args.share or 0.8, args.probe, seconds, mix, args.warm)
        )
        client_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    finally:
        server.stop()
    log_rows = (
        sa.create_engine(env["KAPOK_DECISION_LOG"])
        .connect()
        .execute(sa.text("SELECT count(*) FROM decisions"))
        .scalar_one()
    )

    at = np.array([r[0] for r in results])
    status = np.array([r[2] for r in results])
    latency = np.array([r[3] for r in results])
    ok = status == 200
    errors = {str(s): int((status == s).sum()) for s in np.unique(status[~ok])}
    first, last = at < window, at >= seconds - window
    p99_first = float(np.percentile(latency[first & ok], 99)) if (first & ok).any() else 0.0
    p99_last = float(np.percentile(latency[last & ok], 99)) if (last & ok).any() else 0.0
    rss_first = next((v for t, v in rss if t >= window), rss[0][1] if rss else 0)
    rss_end = rss[-1][1] if rss else 0
    per = {m[0]: m[2] for m in MIX}

    def decisions(endpoint: str) -> int:
        return int(endpoint[4:]) if endpoint.startswith("warm") else per[endpoint]

    logged = sum(decisions(r[1]) for r in itertools.chain(probed, results) if r[2] == 200)
    print(minute_table(at, ok, latency, rss, seconds))
    checks = {
        "no errors": (not errors, f"{ok.sum():,} of {len(results):,} answered 200; {errors or ''}"),
        "p99 last ≤ 1.5× first": (
            p99_last <= 1.5 * p99_first,
            f"first {window:.0f} s p99 {p99_first * 1000:.1f} ms, last {p99_last * 1000:.1f} ms",
        ),
        "memory growth < 10%": (
            rss_end < 1.10 * rss_first,
            f"{rss_first / 2**20:.0f} MiB → {rss_end / 2**20:.0f} MiB",
        ),
        "every decision logged": (
            log_rows == logged,
            f"{logged:,} logged decisions answered 200 (probe and soak), {log_rows:,} rows in the "
            "log",
        ),
    }
    print(
        f"{len(results):,} requests in {seconds:.0f} s ({rate:.1f}/s), "
        f"p50 {np.percentile(latency, 50) * 1000:.1f} ms, "
        f"p99 {np.percentile(latency, 99) * 1000:.1f} ms; the client used "
        f"{client_cpu:.0%} of a core"
    )
    judged = ("no errors", "every decision logged") if args.smoke else tuple(checks)
    for name, (passed, detail) in checks.items():
        verdict = ("PASS" if passed else "FAIL") if name in judged else "info"
        print(f"{verdict:4s}  {name}: {detail}")
    print(
        json.dumps(
            {"rate": round(rate, 1), "requests": len(results), "errors": errors,
             "log_rows": log_rows, "logged_200": logged}
        )
    )  # fmt: skip
    return 0 if all(checks[name][0] for name in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
