"""Load and soak: the lending API at a steady rate for minutes, mixed endpoints, checked for what a
lender would notice — errors, latency creeping up, memory growing, decisions answered but not
logged (issue 12, item 2).

    python bench/soak.py --home /tmp/kh --rate 150 --minutes 10      # by hand: 80% of capacity
    python bench/soak.py --home /tmp/kapok-bench-smoke --rate 20 --minutes 0.5 --smoke   # CI

`--rate` is requests a second across the mix; set it to 80% of the mixed capacity that
`bench/serving.py` measures on the same home (its /score, /limit, /price req/s at 8 clients). The
server is Kapok in demo mode with its own decision log (SQLite in a temporary folder, so the
row count is this run's alone). The client is an asyncio loop in this process (httpx) that
starts requests on a fixed schedule, whatever the server's latency (open loop: a slow server
builds a queue, as real traffic would), a different enterprise per request.

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
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
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


def body(endpoint: str, ids: list[str]) -> dict:
    if endpoint == "screen":
        return {
            "product": "guarantee",
            "applicants": [
                {"enterprise_id": i, "requested_amount": 500000, "term_months": 12} for i in ids
            ],
        }
    return {"enterprise_id": ids[0], **BODY[endpoint]}


async def drive(base: str, rate: float, seconds: float, ids: list[str], seed: int) -> list:
    """Start requests at `rate` a second for `seconds`; (start offset, endpoint, status, s)."""
    rng = np.random.default_rng(seed)
    names = [m[0] for m in MIX]
    shares = np.array([m[1] for m in MIX])
    per = {m[0]: max(m[2], 1) for m in MIX}
    n = int(rate * seconds)
    plan = rng.choice(len(names), n, p=shares / shares.sum())
    results: list[tuple[float, str, int, float]] = []
    cursor = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        t0 = time.monotonic()

        async def one(at: float, endpoint: str, payload: dict) -> None:
            start = time.monotonic()
            try:
                r = await client.post(f"/{endpoint}", json=payload)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            results.append((at, endpoint, status, time.monotonic() - start))

        tasks = []
        for i, k in enumerate(plan):
            at = i / rate
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            endpoint = names[k]
            chosen = [ids[(cursor + j) % len(ids)] for j in range(per[endpoint])]
            cursor += per[endpoint]
            tasks.append(asyncio.create_task(one(at, endpoint, body(endpoint, chosen))))
        await asyncio.gather(*tasks)
    return results


async def sample_rss(pid: int, every: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        out.append((time.monotonic(), tree_rss(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def run(server: Server, rate: float, seconds: float, ids: list[str]) -> tuple[list, list]:
    rss: list[tuple[float, int]] = []
    stop = asyncio.Event()
    assert server.proc is not None
    sampler = asyncio.create_task(sample_rss(server.proc.pid, 1.0, rss, stop))
    started = time.monotonic()
    results = await drive(server.base, rate, seconds, ids, seed=7)
    stop.set()
    await sampler
    return results, [(t - started, v) for t, v in rss]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("KAPOK_HOME", ".")))
    parser.add_argument("--rate", type=float, required=True, help="requests a second (the mix)")
    parser.add_argument("--minutes", type=float, default=10.0)
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
    ids = enterprise_ids(home)
    work = Path(tempfile.mkdtemp(prefix="kapok-soak-"))
    env = server_env(home, work, "kapok")
    server = Server("kapok", "serving.service:Kapok", env, work / "kapok.log")
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {load[0]:.2f}/{load[1]:.2f}/"
        f"{load[2]:.2f}, {args.rate:g} requests/s for {seconds:.0f} s, mix "
        + ", ".join(f"{e} {s:.0%}" for e, s, _ in MIX)
    )
    server.start()
    try:
        print(f"server ready in {server.wait_ready():.1f} s")
        results, rss = asyncio.run(run(server, args.rate, seconds, ids))
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
    logged = sum(per[r[1]] for r in results if r[2] == 200)
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
            f"{logged:,} logged decisions answered 200, {log_rows:,} rows in the log",
        ),
    }
    print(
        f"{len(results):,} requests in {seconds:.0f} s ({len(results) / seconds:.1f}/s), "
        f"p50 {np.percentile(latency, 50) * 1000:.1f} ms, "
        f"p99 {np.percentile(latency, 99) * 1000:.1f} ms"
    )
    judged = ("no errors", "every decision logged") if args.smoke else tuple(checks)
    for name, (passed, detail) in checks.items():
        verdict = ("PASS" if passed else "FAIL") if name in judged else "info"
        print(f"{verdict:4s}  {name}: {detail}")
    print(json.dumps({"requests": len(results), "errors": errors, "log_rows": log_rows}))
    return 0 if all(checks[name][0] for name in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
