"""API keys and roles: hashed storage, 401 for bad keys, 403 for missing permissions."""

from __future__ import annotations

import pytest

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
)

ALL = ("score", "limit", "price", "screen", "explain", "log")


@pytest.fixture(autouse=True)
def _no_keys_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAPOK_API_KEYS", raising=False)


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
    for permission in ("score", "limit", "price", "screen"):
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
