"""Access limits of the request gate without a server (issue 12, item 6): the body size (413),
the rate per key (429, shared by worker processes), demo mode on loopback only, and their
settings. The same over HTTP, on a real server: tests/test_service.py (`access`)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kapok.settings import RateLimit, max_body_bytes, parse_rate_limit
from serving import access
from serving.access import RateLimiter, demo_refusal, is_loopback
from serving.auth import KeyStore, add_key
from serving.gate import RequestGate
from tests import asgi_driver
from tests.asgi_driver import through
from tests.cli_processes import run_kapok

GATED = {"/score": "score", "/screen": "screen"}


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "api_keys.toml"
    plain = {name: add_key(path, name, "lender") for name in ("a-co", "b-co")}
    return KeyStore.load(path), plain


def gate_for(store: KeyStore, **kwargs) -> RequestGate:
    return asgi_driver.gate_for(store, GATED, **kwargs)


# -- 413 ----------------------------------------------------------------------------------------
def test_a_body_above_the_limit_is_413_before_it_is_read(keys):
    """A Content-Length above the limit: 413 without reading a byte, the message names the limit
    and, for /screen, says to split the list; a chunked body (no Content-Length) is counted as
    it streams and refused once past the limit, the rest never read; within the limit the app
    gets the body whole. Without a key it is 401 first, whatever the size."""
    store, plain = keys
    gate = gate_for(store, max_body=1000)
    lender = {"Authorization": f"Bearer {plain['a-co']}", "Content-Type": "application/json"}
    r = through(gate, lender | {"Content-Length": "1001"}, path="/screen")
    assert (r.status, r.read, r.got) == (413, 0, None), r.error
    assert r.error["error"] == {
        "code": "too_large",
        "message": "the body is 1,001 bytes, above this server's limit of 1,000 bytes "
        "(KAPOK_MAX_BODY_BYTES): split the applicants into several /screen requests",
        "field": None,
    }
    r = through(gate, lender | {"Content-Length": str(10**9)})
    assert (r.status, r.read) == (413, 0) and "send a smaller body" in r.error["error"]["message"]
    # chunked: 4 x 300 bytes, refused on the 4th (1,200 > 1,000); a 5th chunk is never read
    chunks = [b"x" * 300] * 5
    r = through(gate, lender, chunks=chunks, path="/screen")
    assert (r.status, r.read, r.got) == (413, 4, None), r.error
    assert r.error["error"]["code"] == "too_large" and "1,000 bytes" in r.error["error"]["message"]
    assert "split the applicants" in r.error["error"]["message"]
    # within the limit, chunked or not: the app reads the body as it was sent
    chunks = [b'{"a": ', b"1" * 990, b"}"]
    r = through(gate, lender, chunks=chunks)
    assert (r.status, r.got) == (200, b"".join(chunks))
    r = through(gate, lender | {"Content-Length": "1000"}, chunks=[b"y" * 1000])
    assert (r.status, r.got) == (200, b"y" * 1000)
    # the key first: no key or an unknown one is 401 whatever the size
    for headers in ({}, {"Authorization": "Bearer kpk_unknown"}):
        r = through(gate, headers | {"Content-Length": str(10**9)})
        assert (r.status, r.error["error"]["code"], r.read) == (401, "unauthenticated", 0)


def test_the_default_limit_fits_a_screen_of_1000_applicants_many_times(monkeypatch):
    monkeypatch.delenv("KAPOK_MAX_BODY_BYTES", raising=False)
    applicants = [
        {"enterprise_id": "91440106326110621P", "requested_amount": 1234567.89, "term_months": 12}
    ] * 1000
    body = json.dumps({"product": "guarantee", "applicants": applicants}, indent=2)
    assert max_body_bytes() == 1 << 20 and max_body_bytes() > 8 * len(body)


# -- 429 ----------------------------------------------------------------------------------------
def test_a_key_above_its_rate_is_429_with_retry_after(keys, tmp_path, monkeypatch):
    """3 requests a minute per key: the 4th of a key is 429 with Retry-After (whole seconds ≥ 1)
    and a message naming the limit; another key has its own bucket; a token comes back after a
    third of a minute."""
    store, plain = keys
    monkeypatch.setenv("KAPOK_HOME", str(tmp_path))
    clock = [1000.0]
    monkeypatch.setattr(access.time, "time", lambda: clock[0])
    gate = gate_for(store, rate=RateLimit(3, 60))
    a = {"Authorization": f"Bearer {plain['a-co']}"}
    b = {"Authorization": f"Bearer {plain['b-co']}"}
    assert [through(gate, a)[0] for _ in range(3)] == [200, 200, 200]
    clock[0] += 5
    r = through(gate, a)
    assert (r.status, r.read) == (429, 0), r.error
    assert r.headers["retry-after"] == "15"  # 20 s a token, 5 of them gone
    assert r.error["error"] == {
        "code": "too_many_requests",
        "message": "more than 3 requests per minute for this key (KAPOK_RATE_LIMIT): try again "
        "in 15 s (Retry-After)",
        "field": None,
    }
    assert through(gate, b)[0] == 200  # a bucket per key
    clock[0] += 15
    assert [through(gate, a)[0] for _ in range(2)] == [200, 429]
    assert (tmp_path / "api" / "rate_limit.db").exists()  # under KAPOK_HOME


def test_the_rate_is_shared_by_worker_processes(tmp_path):
    """Two processes (as two API workers) taking tokens of one key at once: together they get
    exactly the bucket's 200, not 200 each."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from kapok.settings import RateLimit
        from serving.access import RateLimiter
        limiter = RateLimiter(RateLimit(200, 3600), Path({str(tmp_path / "rate.db")!r}))
        print(sum(limiter.take("acme").allowed for _ in range(300)))
        """
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    ran = [w.communicate(timeout=120) for w in workers]
    allowed = [int(out) for out, _ in ran]
    # a rate store that could not be used lets requests through and says so on stderr
    assert sum(allowed) == 200, (allowed, [err for _, err in ran])
    limiter = RateLimiter(RateLimit(200, 3600), tmp_path / "rate.db")
    verdict = limiter.take("acme")
    assert not verdict.allowed and 1 <= verdict.retry_after <= 18


def test_a_rate_store_locked_while_another_worker_creates_it_still_counts(tmp_path):
    """A worker whose rate store is held by another process while it sets it up (a new store,
    two workers starting together) waits for it and counts the request; it used to let the
    request through uncounted and try again on the next one."""
    path = tmp_path / "rate.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # longer than the limiter's busy_timeout of 2 s
    release = threading.Timer(2.5, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        verdict = RateLimiter(RateLimit(5, 3600), path).take("acme")
    finally:
        release.join()
        holder.close()
    assert verdict.allowed
    with sqlite3.connect(path) as db:
        (tokens,) = db.execute("SELECT tokens FROM buckets WHERE caller = 'acme'").fetchone()
    assert tokens == pytest.approx(4, abs=0.01)  # the request took its token


def test_rate_limit_setting():
    assert parse_rate_limit("600/minute") == RateLimit(600, 60)
    assert parse_rate_limit(" 10 / s ") == RateLimit(10, 1)
    assert parse_rate_limit("36000/hours") == RateLimit(36000, 3600)
    assert str(RateLimit(600, 60)) == "600 requests per minute"
    for off in ("", "off", "OFF", "0", "0/minute"):
        assert parse_rate_limit(off) is None
    for bad in ("600", "600/fortnight", "lots/minute", "-5/minute", "1.5/s"):
        with pytest.raises(ValueError, match=r"KAPOK_RATE_LIMIT must be N/second.*got"):
            parse_rate_limit(bad)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"KAPOK_RATE_LIMIT": "600 a minute"}, "KAPOK_RATE_LIMIT must be N/second"),
        ({"KAPOK_MAX_BODY_BYTES": "1MB"}, "KAPOK_MAX_BODY_BYTES must be a whole number"),
    ],
)
def test_a_malformed_access_setting_stops_kapok_serve_in_one_line(tmp_path, env, said):
    ran = run_kapok(["serve", "--port", "1"], env={"KAPOK_HOME": str(tmp_path), **env})
    assert ran.returncode == 2, ran.stderr
    assert len(ran.stderr_lines) == 1 and said in ran.stderr_lines[0], ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr


# -- demo mode ----------------------------------------------------------------------------------
def test_loopback_addresses():
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "10.0.0.1", "example.com", "", None, "::ffff:0:0"):
        assert not is_loopback(host), host


def test_a_demo_server_answers_on_loopback_only(monkeypatch):
    """In demo mode the gate lets every caller in on loopback; a request that came in on another
    address, or any request to a server listening on 0.0.0.0 (even one reached via 127.0.0.1),
    is 403 "demo mode serves loopback only" — the docs page and the probes too."""
    demo = gate_for(KeyStore.demo())
    monkeypatch.setattr(access, "listening_hosts", lambda: ("127.0.0.1",))
    assert through(demo, {})[0] == 200
    assert through(demo, {}, server=("::1", 3000))[0] == 200
    r = through(demo, {}, server=("192.0.2.2", 3000))
    assert (r.status, r.read) == (403, 0)
    assert r.error["error"] == {
        "code": "forbidden",
        "message": "demo mode serves loopback only: this request came in on 192.0.2.2",
        "field": None,
    }
    monkeypatch.setattr(access, "listening_hosts", lambda: ("0.0.0.0",))
    for path, method in (("/score", "POST"), ("/", "GET"), ("/readyz", "GET")):
        r = through(demo, {}, path=path, method=method)
        assert r.status == 403, (path, r.error)
        said = "demo mode serves loopback only: this server listens on 0.0.0.0"
        assert r.error["error"]["message"] == said
    assert demo_refusal(None) is not None
    # a keyed server on 0.0.0.0 is not refused: its keys are checked
    store = KeyStore()
    assert through(gate_for(store), {})[0] == 401


def test_the_listening_socket_is_read_from_the_workers_fd(monkeypatch):
    """BentoML hands a worker its socket as --fd N: the bind address is read from the socket."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        access.listening_hosts.cache_clear()
        monkeypatch.setattr(sys, "argv", ["worker", "--fd", str(s.fileno()), "--worker-id", "1"])
        try:
            assert access.listening_hosts() == ("0.0.0.0",)
        finally:
            access.listening_hosts.cache_clear()
        assert s.getsockname()[0] == "0.0.0.0"  # the socket itself is left open


@pytest.mark.parametrize(
    ("how", "host"),
    [(["--demo"], "0.0.0.0"), (["--demo"], "::"), (["--demo"], "192.0.2.2"),
     (["--demo"], "lan-host.example"), ([], "0.0.0.0")],  # [] : KAPOK_DEMO=1
)  # fmt: skip
def test_kapok_serve_demo_refuses_a_host_other_than_loopback(tmp_path: Path, how, host):
    """`kapok serve --demo --host H` (or KAPOK_DEMO=1) with H not loopback: exit 2, one line,
    before anything starts (no BentoML home is created, nothing listens)."""
    env = {"KAPOK_HOME": str(tmp_path), "KAPOK_DEMO": "" if how else "1"}
    ran = run_kapok(["serve", *how, "--host", host, "--port", "1"], env=env)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr_lines == [
        f"error: demo mode serves loopback only: --host {host} is not a loopback address (use "
        "127.0.0.1, ::1 or localhost, or serve with API keys)"
    ], ran.stderr
    assert not (tmp_path / "bentoml").exists()
