"""API keys and roles: hashed storage, 401 for bad keys, 403 for missing permissions."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import replace
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from kapok.cli import app
from kapok.settings import paths
from serving.auth import (
    ROLE_PERMISSIONS,
    AuthConfigError,
    AuthError,
    Caller,
    KeyStore,
    add_key,
    generate_key,
    hash_key,
    remove_key,
)
from tests.asgi_driver import gate_for, through
from tests.cli_processes import run_kapok

ALL = ("score", "limit", "price", "screen", "explain", "log", "whatif", "queue")


@pytest.fixture(autouse=True)
def _no_keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPOK_API_KEYS", raising=False)
    monkeypatch.delenv("KAPOK_DECISION_LOG", raising=False)


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "api_keys.toml"
    plain = {role: add_key(path, f"{role}-co", role) for role in ("lender", "reviewer", "admin")}
    return path, plain


def test_add_key_then_authenticate_and_no_plaintext_on_disk(keys):
    path, plain = keys
    text = path.read_text()
    for key in plain.values():
        assert key.startswith("kpk_") and key not in text
        assert hash_key(key) in text
    store = KeyStore.load(path)
    assert store.authenticate(f"Bearer {plain['lender']}") == Caller("lender-co", "lender")
    assert store.authenticate(f"bearer  {plain['admin']} ") == Caller("admin-co", "admin")
    assert not store.demo and len(store) == 3


def test_default_location_is_under_kapok_home(monkeypatch: pytest.MonkeyPatch, tmp_path):
    key = add_key(paths().home / "api_keys.toml", "acme-microloans", "lender")
    assert KeyStore.load().authenticate(f"Bearer {key}").name == "acme-microloans"
    other = tmp_path / "elsewhere.toml"
    key2 = add_key(other, "beta", "reviewer")
    monkeypatch.setenv("KAPOK_API_KEYS", str(other))
    assert KeyStore.load().authenticate(f"Bearer {key2}") == Caller("beta", "reviewer")


def test_wrong_key_is_401(keys):
    store = KeyStore.load(keys[0])
    with pytest.raises(AuthError) as e:
        store.authenticate(f"Bearer {generate_key()}")
    assert e.value.status == 401


@pytest.mark.parametrize(
    "header", [None, "", "   ", "kpk_abc", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"]
)
def test_missing_or_malformed_header_is_401(keys, header):
    store = KeyStore.load(keys[0])
    with pytest.raises(AuthError) as e:
        store.authenticate(header)
    assert e.value.status == 401


def test_key_without_bearer_prefix_is_401(keys):
    path, plain = keys
    with pytest.raises(AuthError) as e:
        KeyStore.load(path).authenticate(plain["admin"])
    assert e.value.status == 401


def test_roles_and_permissions(keys):
    path, plain = keys
    store = KeyStore.load(path)
    lender = store.authenticate(f"Bearer {plain['lender']}")
    reviewer = store.authenticate(f"Bearer {plain['reviewer']}")
    admin = store.authenticate(f"Bearer {plain['admin']}")
    for permission in ("score", "limit", "price", "screen", "whatif"):
        store.authorize(lender, permission)
    with pytest.raises(AuthError) as e:
        store.authorize(lender, "explain")
    assert e.value.status == 403 and "lender" in e.value.message and "explain" in e.value.message
    store.authorize(reviewer, "explain")
    store.authorize(reviewer, "log")
    with pytest.raises(AuthError) as e:
        store.authorize(reviewer, "score")
    assert e.value.status == 403 and "reviewer" in e.value.message and "score" in e.value.message
    for permission in ALL:
        store.authorize(admin, permission)
    assert ROLE_PERMISSIONS["admin"] == frozenset(ALL)
    with pytest.raises(ValueError):
        store.authorize(admin, "fly")


def test_demo_store_lets_everyone_in_as_admin():
    store = KeyStore.demo()
    assert store.demo
    for header in (None, "", "Bearer whatever", "junk"):
        assert store.authenticate(header) == Caller("demo", "admin")
    store.authorize(store.authenticate(None), "log")


def test_add_key_validates_role_and_unique_name(keys):
    path, _ = keys
    with pytest.raises(AuthConfigError, match="role"):
        add_key(path, "new-co", "superuser")
    with pytest.raises(AuthConfigError, match="name"):
        add_key(path, "lender-co", "lender")
    with pytest.raises(AuthConfigError, match="name"):
        add_key(path, 'bad"name', "lender")
    assert len(KeyStore.load(path)) == 3


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(AuthConfigError, match="not found"):
        KeyStore.load(tmp_path / "absent.toml")


GOOD_HASH = hash_key("kpk_x")


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (f'[[keys]]\nname = "a"\nrole = "root"\nsha256 = "{GOOD_HASH}"\n', "keys[0].role"),
        ('[[keys]]\nname = "a"\nrole = "lender"\nsha256 = "abc123"\n', "keys[0].sha256"),
        (f'[[keys]]\nname = "a"\nrole = "lender"\nsha256 = "{"z" * 64}"\n', "keys[0].sha256"),
        (
            f'[[keys]]\nname = "a"\nrole = "lender"\nsha256 = "{GOOD_HASH}"\n'
            f'[[keys]]\nname = "a"\nrole = "admin"\nsha256 = "{hash_key("y")}"\n',
            "keys[1].name",
        ),
        ('[[keys]]\nname = "a"\nrole = "lender"\n', "keys[0].sha256"),
        (
            f'[[keys]]\nname = "a"\nrole = "lender"\nsha256 = "{GOOD_HASH}"\nkey = "x"\n',
            "keys[0].key",
        ),
        ("[[keys]\nname = ", "invalid TOML"),
        ('keys = "nope"\n', "keys"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, content, field):
    path = tmp_path / "api_keys.toml"
    path.write_text(content)
    with pytest.raises(AuthConfigError) as e:
        KeyStore.load(path)
    assert str(path) in str(e.value) and field in str(e.value)


@pytest.mark.parametrize(
    ("created", "shown"),
    [
        ('"2025-01-31T09:30:00Z"', "the string '2025-01-31T09:30:00Z'"),  # quoted
        ("2025-01-31T09:30:00", "2025-01-31T09:30:00, a date-time without offset"),
        ("2025-01-31", "2025-01-31, a date alone"),
        ("20250131", "type int"),
    ],
)
def test_bad_created_names_file_and_entry(tmp_path, created, shown):
    path = tmp_path / "api_keys.toml"
    path.write_text(
        f'[[keys]]\nname = "a"\nrole = "lender"\nsha256 = "{GOOD_HASH}"\n\n'
        f'[[keys]]\nname = "b"\nrole = "admin"\nsha256 = "{hash_key("y")}"\n'
        f"created = {created}\n"
    )
    with pytest.raises(AuthConfigError) as e:
        KeyStore.load(path)
    message = str(e.value)
    assert str(path) in message and "keys[1].created" in message and shown in message


def test_old_files_without_created_still_load(tmp_path):
    path = tmp_path / "api_keys.toml"
    key = generate_key()
    path.write_text(f'[[keys]]\nname = "old-co"\nrole = "lender"\nsha256 = "{hash_key(key)}"\n')
    store = KeyStore.load(path)
    assert store.authenticate(f"Bearer {key}") == Caller("old-co", "lender")
    assert store.entries[0].created is None
    add_key(path, "new-co", "reviewer")  # appending keeps the old entry as it was
    old, new = KeyStore.load(path).entries
    assert old.name == "old-co" and old.created is None
    assert new.created is not None
    assert abs(dt.datetime.now(dt.UTC) - new.created) < dt.timedelta(minutes=1)


# -- kapok keys add / list / revoke ----------------------------------------------------------
runner = CliRunner()
STAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def rows(output: str) -> dict[str, list[str]]:
    """The table's rows by name: the cells between the box-drawing bars."""
    table = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if len(cells) == 4 and cells[0] and cells[0] != "name":
            table[cells[0]] = cells[1:]
    return table


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_keys_list_shows_names_roles_created_never_keys(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    monkeypatch.setenv("KAPOK_API_KEYS", str(path))
    old_key = generate_key()
    path.write_text(  # written before add_key recorded `created`
        f'[[keys]]\nname = "old-co"\nrole = "reviewer"\nsha256 = "{hash_key(old_key)}"\n'
    )
    added = cli("keys", "add", "acme-microloans", "--role", "lender")
    key = added.strip().splitlines()[-1]
    assert key.startswith("kpk_")
    output = cli("keys", "list")
    for secret in (key, hash_key(key), old_key, hash_key(old_key)):
        assert secret not in output
    table = rows(output)
    assert set(table) == {"old-co", "acme-microloans"}
    assert table["old-co"] == ["reviewer", "unknown", "never"]
    role, created, last = table["acme-microloans"]
    assert role == "lender" and last == "never" and STAMP.fullmatch(created)
    assert (paths().home / "decisions").exists() is False  # no empty decision log created


def test_keys_list_last_decision_is_the_callers_latest_logged_decision(tmp_path, monkeypatch):
    from serving.decision_log import DecisionLog
    from tests.test_decision_log import record

    monkeypatch.setenv("KAPOK_API_KEYS", str(tmp_path / "keys.toml"))
    db = tmp_path / "log" / "decisions.db"
    monkeypatch.setenv("KAPOK_DECISION_LOG", f"sqlite:///{db}")
    cli("keys", "add", "acme-microloans", "--role", "lender")
    cli("keys", "add", "beta-bank", "--role", "lender")
    cli("keys", "add", "idle", "--role", "reviewer")
    assert rows(cli("keys", "list"))["acme-microloans"][2] == "never"
    assert not db.exists()  # listing did not create the log
    when = dt.datetime(2025, 3, 1, 9, 30, 5, 123456, tzinfo=dt.UTC)
    with DecisionLog() as log:
        log.write(record(decided_at=when))  # caller acme-microloans
        log.write(record(decided_at=when - dt.timedelta(days=3)))
        log.write(replace(record(decided_at=when + dt.timedelta(hours=1)), caller="beta-bank"))
    table = rows(cli("keys", "list"))
    assert table["acme-microloans"][2] == "2025-03-01T09:30:05Z"
    assert table["beta-bank"][2] == "2025-03-01T10:30:05Z"
    assert table["idle"][2] == "never"


def test_last_decision_by_caller_does_not_create_a_log(tmp_path):
    from serving.decision_log import DecisionLog

    db = tmp_path / "absent" / "decisions.db"
    with DecisionLog(f"sqlite:///{db}") as log:
        assert log.last_decision_by_caller() == {}
    assert not db.exists() and not db.parent.exists()
    empty = tmp_path / "empty.db"
    empty.touch()  # a database file without the decisions table
    with DecisionLog(f"sqlite:///{empty}") as log:
        assert log.last_decision_by_caller() == {}


@pytest.mark.postgres
def test_last_decision_by_caller_on_postgres(pg_url):
    import sqlalchemy as sa

    from serving.decision_log import DecisionLog
    from tests.test_decision_log import record

    when = dt.datetime(2025, 3, 1, 9, 30, 5, 123456, tzinfo=dt.UTC)
    with DecisionLog(pg_url) as log:
        assert log.last_decision_by_caller() == {}
        engine = sa.create_engine(pg_url)
        try:
            assert not sa.inspect(engine).has_table("decisions")  # reading created nothing
        finally:
            engine.dispose()
        log.write(record(decided_at=when))
        log.write(record(decided_at=when - dt.timedelta(days=1)))
        log.write(replace(record(decided_at=when - dt.timedelta(hours=2)), caller="beta-bank"))
        assert log.last_decision_by_caller() == {
            "acme-microloans": when,
            "beta-bank": when - dt.timedelta(hours=2),
        }


def test_keys_revoke_removes_the_key_and_it_gets_401(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    monkeypatch.setenv("KAPOK_API_KEYS", str(path))
    path.write_text("# Kapok API keys\n")
    path.chmod(0o600)
    keys = {}
    for name, role in (("a-co", "lender"), ("b-co", "reviewer"), ("c-co", "admin")):
        keys[name] = cli("keys", "add", name, "--role", role).strip().splitlines()[-1]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    output = cli("keys", "revoke", "b-co")
    assert "revoked b-co" in output and "restarted" in output and "warning" not in output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [f for f in os.listdir(tmp_path) if f != "keys.toml"] == []  # no temporary left
    assert path.read_text().startswith("# Kapok API keys\n")  # the rest kept as it was
    store = KeyStore.load(path)
    assert store.names == ["a-co", "c-co"]
    with pytest.raises(AuthError) as e:
        store.authenticate(f"Bearer {keys['b-co']}")
    assert e.value.status == 401 and e.value.message == "unknown API key"
    assert store.authenticate(f"Bearer {keys['a-co']}") == Caller("a-co", "lender")
    assert store.authenticate(f"Bearer {keys['c-co']}") == Caller("c-co", "admin")
    assert set(rows(cli("keys", "list"))) == {"a-co", "c-co"}


def test_revoking_the_last_admin_key_warns(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    monkeypatch.setenv("KAPOK_API_KEYS", str(path))
    cli("keys", "add", "root-1", "--role", "admin")
    cli("keys", "add", "root-2", "--role", "admin")
    cli("keys", "add", "lender-co", "--role", "lender")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # a new key file: owner only
    assert "warning" not in cli("keys", "revoke", "root-1")
    output = cli("keys", "revoke", "root-2")
    assert "warning" in output and "last admin key" in output
    assert KeyStore.load(path).names == ["lender-co"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_remove_key_rewrites_files_not_laid_out_as_tables(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(
        f'keys = [{{name = "a", role = "lender", sha256 = "{GOOD_HASH}"}}, '
        f'{{name = "b", role = "admin", sha256 = "{hash_key("y")}", '
        "created = 2025-01-31T09:30:00Z}]\n"
    )
    assert remove_key(path, "a").name == "a"
    (entry,) = KeyStore.load(path).entries
    assert entry.name == "b" and entry.created == dt.datetime(2025, 1, 31, 9, 30, tzinfo=dt.UTC)


def test_revoke_unknown_name_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "keys.toml"
    add_key(path, "acme-microloans", "lender")
    before = path.read_text()
    ran = run_kapok(
        ["keys", "revoke", "nobody"],
        env={"KAPOK_HOME": str(tmp_path / "home"), "KAPOK_API_KEYS": str(path)},
        cwd=tmp_path,
    )
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr + ran.stdout
    assert len(ran.stderr_lines) == 1, ran.stderr
    assert ran.stderr_lines[0].startswith("error: ") and "'nobody'" in ran.stderr_lines[0]
    assert ran.stdout == ""
    assert path.read_text() == before


# -- the request gate: key, role and content type before anything reads the body ---------------
GATED = {"/score": "score", "/explain": "explain"}


def through_gate(store: KeyStore, path: str, headers: dict[str, str], method: str = "POST"):
    """A request through RequestGate checking `store`'s keys (tests/asgi_driver.py)."""
    return through(gate_for(store, GATED), headers, path=path, method=method)


def test_the_gate_answers_401_403_and_415_before_the_body_is_read(keys):
    """Without a valid key 401, with a role that may not call the endpoint 403, whatever the
    content type; a valid key and a body that is not JSON-typed 415 naming application/json.
    None of them reads the body; a JSON-typed (or untyped) body of an allowed caller passes."""
    path, plain = keys
    store = KeyStore.load(path)
    lender, reviewer = f"Bearer {plain['lender']}", f"Bearer {plain['reviewer']}"
    for content_type in ("application/json", "multipart/form-data", "text/plain"):
        typed = {"Content-Type": content_type}
        r = through_gate(store, "/score", typed)
        assert (r.status, r.error["error"]["code"], r.read) == (401, "unauthenticated", 0), r
        assert r.error["error"]["message"].startswith("missing Authorization header"), r
        r = through_gate(store, "/score", typed | {"Authorization": "Bearer x"})
        assert (r.status, r.error["error"]["message"], r.read) == (401, "unknown API key", 0)
        r = through_gate(store, "/score", typed | {"Authorization": reviewer})
        assert (r.status, r.error["error"]["code"], r.read) == (403, "forbidden", 0), r
        assert "'reviewer'" in r.error["error"]["message"]
        assert "'score'" in r.error["error"]["message"]
    for content_type in (
        "multipart/form-data",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "text/plain",
        "application/vnd.bentoml+pickle",
    ):
        headers = {"Content-Type": content_type, "Authorization": lender}
        r = through_gate(store, "/score", headers)
        assert (r.status, r.read) == (415, 0), r
        assert r.error["error"] == {
            "code": "unsupported_media_type",
            "message": f"Content-Type {content_type.split(';')[0]!r} is not accepted: send the "
            "body as JSON, with Content-Type: application/json",
            "field": None,
        }
    for headers in (
        {"Content-Type": "application/json"},
        {"Content-Type": "Application/JSON; charset=utf-8"},
        {},  # no Content-Type: read as JSON, as before
    ):
        r = through_gate(store, "/score", headers | {"Authorization": lender})
        assert (r.status, r.got, r.caller) == (200, b"{}", Caller("lender-co", "lender")), r
    r = through_gate(store, "/explain", {"Authorization": reviewer})
    assert (r.status, r.caller) == (200, Caller("reviewer-co", "reviewer"))
    # other methods and paths are not the gate's: BentoML answers them (405, 404, probes)
    for r in (through_gate(store, "/score", {}, method="GET"), through_gate(store, "/livez", {})):
        assert (r.status, r.caller) == (200, None)


def test_the_endpoint_takes_the_caller_the_gate_let_in(keys, monkeypatch):
    """The key is checked once per request, by the gate: the endpoint takes the caller's name
    (the decision log's `caller`) from the request's state. A request that reached an endpoint
    without passing the gate is refused, never answered as nobody; a caller whose role the
    endpoint does not allow is still 403 there."""
    from starlette.requests import Request

    from serving.api_errors import ApiError
    from serving.service import Kapok

    path, plain = keys
    store = KeyStore.load(path)
    presented: list[str | None] = []
    authenticate = store.authenticate
    monkeypatch.setattr(store, "authenticate", lambda h: presented.append(h) or authenticate(h))
    service = SimpleNamespace(ready=True, keys=store)

    def caller_name(scope: dict, permission: str) -> str:
        ctx = SimpleNamespace(request=Request(scope))
        return Kapok.inner._caller(service, ctx, permission)

    r = through_gate(store, "/score", {"Authorization": f"Bearer {plain['lender']}"})
    assert caller_name(r.scope, "score") == "lender-co"
    assert presented == [f"Bearer {plain['lender']}"]  # once, in the gate
    assert all(plain["lender"] not in repr(v) for v in r.scope["state"].values())
    with pytest.raises(ApiError) as e:
        caller_name(r.scope, "explain")
    assert e.value.status == 403 and "'lender-co'" in e.value.message
    demo = through_gate(KeyStore.demo(), "/explain", {})
    assert caller_name(demo.scope, "log") == "demo"
    ungated = {"type": "http", "method": "POST", "path": "/score", "headers": [
        (b"authorization", f"Bearer {plain['admin']}".encode())]}  # fmt: skip
    with pytest.raises(ApiError) as e:
        caller_name(ungated, "score")
    assert e.value.status == 500 and "without the request gate's key check" in e.value.message


def test_demo_mode_lets_requests_without_a_key_through_the_gate(monkeypatch, keys):
    """`kapok serve --demo` checks no key: the gate lets a request without one in, and the
    serving process's store is the demo store."""
    from serving.auth import server_keys

    r = through_gate(KeyStore.demo(), "/explain", {"Content-Type": "application/json"})
    assert (r.status, r.got, r.caller) == (200, b"{}", Caller("demo", "admin"))
    assert through_gate(KeyStore.demo(), "/score", {"Content-Type": "text/plain"})[0] == 415
    server_keys.cache_clear()
    try:
        monkeypatch.setenv("KAPOK_DEMO", "1")
        assert server_keys().demo
        server_keys.cache_clear()
        monkeypatch.setenv("KAPOK_DEMO", "")
        monkeypatch.setenv("KAPOK_API_KEYS", str(keys[0]))
        assert not server_keys().demo and len(server_keys()) == 3
    finally:
        server_keys.cache_clear()
