"""Fuzzing the lending API against its own OpenAPI document (issue 12).

Schemathesis generates requests from the OpenAPI 3.1 document the server serves at /openapi.json
(built by serving/api_docs.py from the pydantic models of serving/api_models.py; the test loads
it from there and checks that the server serves the same) for every POST endpoint: valid bodies,
bodies that break the schema, bytes that are not JSON, other media types and methods, the
document's examples and its boundary values. Each request is sent with a key of every role, with
no key and with an unknown key. Every answer must be no 5xx, a status the document lists for the
endpoint, and conform to the document's schema for that status (schemathesis's checks, then
Kapok's models): a 200 validates against the endpoint's answer model, every error against
`ErrorBody` (`{"error": {"code", "message", "field"}}`); a role not allowed gets 403, no key or an
unknown key 401, whatever the body (checked before anything reads it, serving/gate.py); an
allowed caller's body under another Content-Type than application/json gets 415; another method
than POST gets 405.

Random enterprise ids hardly ever name an enterprise of the feature store, so a second test draws
bodies whose ids are the simulated region's (and request ids of logged decisions for /decision),
with amounts and terms anywhere from the boundaries to absurd: those reach the decision path, and
the test counts the 200s to make sure some did.

What fuzzing found where the server and its document disagreed is at the end, each a test of
its own: a body that is not JSON answered 400 before the key was checked, /screen accepted rows
the document forbids, and a JSON body sent as multipart/form-data was a 500 turned into a
misleading 400 invalid_json.

Short in CI (KAPOK_FUZZ_EXAMPLES=25 generated examples per endpoint and test, deterministic, plus
schemathesis's examples and boundary cases); run it longer by hand with e.g.
KAPOK_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from features.schema import PRODUCTS
from serving.api_docs import ENDPOINTS, Endpoint, openapi
from serving.api_errors import CODES
from serving.api_models import EXAMPLE_ID, Applicant, ErrorBody, ScoreAnswer, ScreenAnswer
from serving.auth import ROLE_PERMISSIONS
from tests.test_service import Api, request, served  # noqa: F401

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("KAPOK_FUZZ_EXAMPLES", "25"))
BY_PATH: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}
ROLES = sorted(ROLE_PERMISSIONS)
UNKNOWN_KEY = "kpk_" + "0" * 43  # the shape of a key, in no key file


def allowed(path: str) -> list[str]:
    return [r for r in ROLES if BY_PATH[path].permission in ROLE_PERMISSIONS[r]]


def not_allowed(path: str) -> list[str]:
    return [r for r in ROLES if r not in allowed(path)]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# schemathesis's own checks, run on every answer
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,  # a body that breaks the schema is a 4xx
]


def conforms(path: str, status: int, body: Any, said: str) -> None:
    """Kapok's own models: a 200 is the endpoint's answer model, anything else `ErrorBody` with
    a documented status."""
    endpoint = BY_PATH[path]
    assert status < 500, f"{said}: {status} {body}"
    model: type[BaseModel]
    if status == 200:
        model = endpoint.answer
    else:
        assert status in endpoint.errors, f"{said}: undocumented {status} {body}"
        model = ErrorBody
    model.model_validate(body)


def settled(case: schemathesis.Case, response: Any, headers: dict[str, str]) -> None:
    """schemathesis's checks, on every endpoint (/screen's applicants are, in the document, an
    Applicant or any object: an object that is not a valid Applicant is answered in `errors`,
    which `screened` checks, and anything else breaks the schema and is a 400)."""
    case.validate_response(response, checks=CHECKS, headers=headers)
    if case.operation.path == "/screen" and response.status_code == 200:
        screened(case.body, response.json())


def screened(sent: Any, answer: dict[str, Any]) -> None:
    """A /screen answer accounts for every applicant: decided (ranked) or in `errors` with its
    index, and every row that is not a valid Applicant is in `errors`."""
    rows = sent["applicants"]
    failed = {e["index"] for e in answer["errors"]}
    assert answer["count"] == len(answer["ranked"]), answer
    assert len(answer["ranked"]) + len(answer["errors"]) == len(rows), (sent, answer)
    assert failed <= set(range(len(rows))), (sent, answer)
    for i, row in enumerate(rows):
        try:
            Applicant.model_validate(row)
        except ValidationError:
            assert i in failed, f"applicants[{i}] = {row!r} is not an Applicant: {answer}"


# -- every endpoint, bodies generated from the document ----------------------------------------
# The document as the server serves it (test_served_document checks that it is). It is loaded at
# import, so that each endpoint is a test of its own; schemathesis.pytest.from_fixture, which
# would load it from the running server, does not work under pytest 9.2 (it sets the item's
# private `_nodeid`, which pytest 9.2 no longer has).
DOCUMENT = json.loads(json.dumps(openapi()))
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 12,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "generation": {
            "mode": "all",  # valid bodies and bodies that break the schema
            "max-examples": EXAMPLES,
            "deterministic": True,
            "database": "none",
            "with-security-parameters": False,  # the test sends the keys itself
        },
        "phases": {"stateful": {"enabled": False}},
    }
)
# every endpoint of ENDPOINTS with its method (POST, and GET /queue); not the probes
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).include(path=list(BY_PATH))


def test_served_document(served) -> None:  # noqa: F811
    """The server serves the document the tests fuzz against, and schemathesis reads it as a
    valid OpenAPI 3.1 document with every endpoint."""
    api: Api = served[0]
    response = requests.get(api.base + "/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.json() == DOCUMENT
    loaded = schemathesis.openapi.from_url(api.base + "/openapi.json", config=CONFIG)
    routes = {(op.ok().method.upper(), op.ok().path) for op in loaded.get_all_operations()}
    assert routes - {("GET", "/livez"), ("GET", "/readyz")} == {
        (e.method, e.path) for e in ENDPOINTS
    }


def sent_as(response: requests.Response) -> str:
    """The media type the request went out with ("" without a Content-Type)."""
    content_type = str(response.request.headers.get("Content-Type", ""))
    return content_type.split(";", 1)[0].strip().lower()


@schema.parametrize()
def test_generated_requests(case: schemathesis.Case, served) -> None:  # noqa: F811
    """Every generated request, as each role, with no key and with an unknown key: no 5xx, a
    documented status with the documented shape; 403 for a role not allowed and 401 without a
    valid key, whatever the body (JSON or not, under any content type); a body under another
    Content-Type than application/json is 415 for an allowed caller; another method than POST
    is 405, in the error shape."""
    api: Api = served[0]
    path = case.operation.path
    calls: list[tuple[str, dict[str, str]]] = [(r, bearer(api.keys[r])) for r in ROLES]
    calls += [("no key", {}), ("unknown key", bearer(UNKNOWN_KEY))]
    for who, headers in calls:
        response = case.call(base_url=api.base, headers=headers)
        settled(case, response, headers)
        status, body = response.status_code, response.json()
        said = f"{case.method} {path} as {who}, {case.media_type} body {case.body!r}"
        assert status < 500, f"{said}: {status} {body}"
        if case.method.upper() != BY_PATH[path].method:
            assert status == 405, f"{said}: {status} {body}"
            ErrorBody.model_validate(body)
            continue
        conforms(path, status, body, said)
        if who in allowed(path):
            has_body = BY_PATH[path].request is not None  # GET /queue takes none to type
            if has_body and sent_as(response) not in ("", "application/json"):
                assert status == 415, f"{said}: {status} {body}"
                assert body["error"]["code"] == "unsupported_media_type", f"{said}: {body}"
            continue
        expected = 403 if who in ROLES else 401
        assert status == expected, f"{said}: {status} {body}"
        assert body["error"]["code"] == CODES[expected], f"{said}: {body}"


# -- bodies that name real enterprises: the decision path ----------------------------------------
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
AMOUNTS = st.one_of(
    st.integers(1, 5_000_000),
    st.floats(1.0, 5_000_000.0),
    st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-300, 0.01, 1e12, 1e300, 1.7976931348623157e308]),
)
TERMS = st.one_of(st.integers(1, 60), st.integers(1, 2**63 - 1), st.sampled_from([1, 12, 36]))


def loan_bodies(ids: list[str], amount_key: str) -> st.SearchStrategy[dict[str, Any]]:
    enterprise = st.one_of(
        st.sampled_from(ids),  # in the feature store
        st.sampled_from(ids).map(str.lower),
        st.just(EXAMPLE_ID),  # a valid code that is not in the store
    )
    return st.fixed_dictionaries(
        {
            "enterprise_id": enterprise,
            "product": st.sampled_from(PRODUCTS),
            amount_key: AMOUNTS,
            "term_months": TERMS,
        }
    )


def bodies(path: str, ids: list[str], request_ids: list[str]) -> st.SearchStrategy[Any]:
    if path in ("/score", "/limit"):
        return loan_bodies(ids, "requested_amount")
    if path == "/price":
        return loan_bodies(ids, "amount")
    if path == "/explain":  # amount and term are optional
        return loan_bodies(ids, "requested_amount").flatmap(
            lambda b: st.sets(st.sampled_from(["requested_amount", "term_months"])).map(
                lambda drop: {k: v for k, v in b.items() if k not in drop}
            )
        )
    if path == "/screen":
        applicant = loan_bodies(ids, "requested_amount").map(
            lambda b: {k: v for k, v in b.items() if k != "product"}
        )
        junk = st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=2),
            applicant.map(lambda a: {**a, "extra": 1}),
            applicant.map(lambda a: {k: v for k, v in a.items() if k != "term_months"}),
        )
        rows = st.lists(st.one_of(applicant, applicant, junk), max_size=6)
        return st.fixed_dictionaries({"product": st.sampled_from(PRODUCTS), "applicants": rows})
    if path == "/queue":
        return st.fixed_dictionaries(
            {},
            optional={"product": st.sampled_from(PRODUCTS), "limit": st.integers(1, 1000)},
        )
    if path == "/queue/{request_id}":
        known = st.sampled_from(request_ids)
        body = st.fixed_dictionaries(
            {"decision": st.sampled_from(["approve", "decline"]),
             "reason": st.one_of(st.just("checked on site"), st.text(min_size=1, max_size=30))},
            optional={"limit": AMOUNTS, "price": st.floats(0.001, 0.5)},
        )  # fmt: skip
        return st.fixed_dictionaries(
            {"request_id": st.one_of(known, known, known.map(lambda r: r[:-1] or "x")),
             "body": body}
        )  # fmt: skip
    if path == "/whatif":  # a grid of amounts and terms, or none
        grid = st.fixed_dictionaries(
            {},
            optional={
                "amounts": st.lists(AMOUNTS, max_size=5),
                "terms": st.lists(TERMS, max_size=5),
            },
        )
        return st.tuples(loan_bodies(ids, "amount"), st.one_of(st.none(), grid)).map(
            lambda b: b[0] if b[1] is None else {**b[0], "grid": b[1]}
        )
    if path == "/decision":
        known = st.sampled_from(request_ids)
        return st.fixed_dictionaries(
            {
                "request_id": st.one_of(
                    known, known, known.map(lambda r: r[:-1]), st.text(min_size=1, max_size=100)
                )
            }
        )
    raise AssertionError(f"no body strategy for {path}")


@pytest.fixture(scope="module")
def request_ids(served) -> list[str]:  # noqa: F811
    """Request ids of logged decisions: three each from /score, /limit and /price, three from
    /screen."""
    api: Api = served[0]
    ids: list[str] = []
    for eid in served[2][:3]:
        for path, body in (
            ("/score", request(eid)),
            ("/limit", request(eid)),
            ("/price", {"enterprise_id": eid, "product": "microloan", "amount": 100_000,
                        "term_months": 12}),
        ):  # fmt: skip
            status, answer = api.call(path, body, role="lender")
            assert status == 200, (path, answer)
            ids.append(answer["request_id"])
    status, answer = api.call(
        "/screen",
        {"product": "microloan", "applicants": [
            {"enterprise_id": eid, "requested_amount": 100_000, "term_months": 12}
            for eid in served[2][3:6]
        ]},
        role="lender",
    )  # fmt: skip
    assert status == 200 and answer["count"] == 3, answer
    ids += [row["request_id"] for row in answer["ranked"]]
    return ids


@pytest.fixture(scope="module")
def referred_ids(served, request_ids: list[str]) -> list[str]:  # noqa: F811
    """Request ids of referred /score decisions (for POST /queue/{request_id}), up to 40, and
    the other logged decisions (approvals, declines: a 409)."""
    api: Api = served[0]
    referred: list[str] = []
    for eid in served[2][:400]:
        # guarantees: no price cap turns a PD in the refer band into a decline
        body = request(eid, product="guarantee", amount=500_000)
        status, answer = api.call("/score", body, role="lender")
        assert status == 200, answer
        if answer["decision"] == "refer":
            referred.append(answer["request_id"])
        if len(referred) >= 40:
            break
    assert referred, "no referred decision among 400 enterprises"
    return referred + request_ids


def case_of(operation: Any, path: str, drawn: Any) -> schemathesis.Case:
    """The request `bodies(path)` drew: a JSON body, GET /queue's query, or POST
    /queue/{request_id}'s path parameter and body."""
    if path == "/queue":
        return operation.Case(query=drawn)
    if path == "/queue/{request_id}":
        return operation.Case(
            path_parameters={"request_id": drawn["request_id"]},
            body=drawn["body"],
            media_type="application/json",
        )
    return operation.Case(body=drawn, media_type="application/json")


@pytest.mark.parametrize("path", list(BY_PATH))
def test_known_enterprises(path: str, served, request_ids: list[str], referred_ids) -> None:  # noqa: F811
    """Bodies that name the region's enterprises (and logged decisions; referred ones for the
    queue), each sent as an allowed role (drawn): no 5xx, the documented status and shape, and
    some 200s; the same request as every role not allowed is 403 and without a key 401."""
    api: Api = served[0]
    operation = schema[path][BY_PATH[path].method]
    ids = referred_ids if path.startswith("/queue") else request_ids
    statuses: Counter[int] = Counter()
    may, may_not = allowed(path), not_allowed(path)

    @FUZZ_SETTINGS
    @given(body=bodies(path, served[2][:300], ids), role=st.sampled_from(may))
    def run(body: dict[str, Any], role: str) -> None:
        case = case_of(operation, path, body)
        calls = [(role, bearer(api.keys[role]))] + [(r, bearer(api.keys[r])) for r in may_not]
        for who, headers in [*calls, ("no key", {})]:
            response = case.call(base_url=api.base, headers=headers)
            settled(case, response, headers)
            said = f"POST {path} as {who} with {body!r}"
            conforms(path, response.status_code, response.json(), said)
            if who == role:
                statuses[response.status_code] += 1
            elif who == "no key":
                assert response.status_code == 401, f"{said}: {response.text}"
            else:
                assert response.status_code == 403, f"{said}: {response.text}"

    run()
    print(f"POST {path}: {dict(statuses)}")
    assert statuses[200] > 0, f"no request reached a decision: {dict(statuses)}"


# -- what fuzzing found: the server and its document disagreed -----------------------------------
def raw_post(api: Api, path: str, data: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(api.base + path, data=data, headers=headers, timeout=60)


def new_log(served_home: Any, before: str, marker: str) -> str:
    """What the server wrote to its log since `before`, once `marker` is in it."""
    log = served_home.home / "server.log"
    deadline = time.time() + 10
    while marker not in log.read_text()[len(before) :] and time.time() < deadline:
        time.sleep(0.2)
    return log.read_text()[len(before) :]


def test_unreadable_body_without_a_valid_key(served) -> None:  # noqa: F811
    """The key and the role come before anything about the body (BentoML used to parse it first:
    400 invalid_json to a caller without a key): a body that is not JSON, under any content
    type, is 401 without a key or with an unknown one and 403 for a role that may not call the
    endpoint; the same body from an allowed caller is 400 invalid_json."""
    api: Api = served[0]
    for route, endpoint in BY_PATH.items():
        if endpoint.request is None:
            continue  # GET /queue takes no body
        path = route.replace("{request_id}", "req_0")
        for content_type in ("application/json", "multipart/form-data", "text/plain"):
            typed = {"Content-Type": content_type}
            for headers in (typed, typed | bearer(UNKNOWN_KEY)):
                no_key = raw_post(api, path, b"xx", headers)
                assert no_key.status_code == 401, (path, headers, no_key.text)
                assert no_key.json()["error"]["code"] == "unauthenticated", no_key.text
                assert no_key.headers["WWW-Authenticate"] == "Bearer"
            role = not_allowed(route)[0]
            forbidden = raw_post(api, path, b"xx", typed | bearer(api.keys[role]))
            assert forbidden.status_code == 403, (path, role, forbidden.text)
            assert forbidden.json()["error"]["code"] == "forbidden", forbidden.text
            assert f"role {role!r}" in forbidden.json()["error"]["message"], forbidden.text
        key = bearer(api.keys[allowed(route)[0]])
        unreadable = raw_post(api, path, b"xx", {"Content-Type": "application/json"} | key)
        assert unreadable.status_code == 400, (path, unreadable.text)
        assert unreadable.json()["error"]["code"] == "invalid_json", unreadable.text


def test_screen_rows_the_document_forbids(served) -> None:  # noqa: F811
    """A /screen row that is not a JSON object breaks the document's ScreenRequest and is a 400
    naming the row; a row that is an object but not a valid applicant is allowed by the document
    and answered in `errors` while the others are decided (200)."""
    api: Api = served[0]
    eid = served[2][0]
    good = {"enterprise_id": eid, "requested_amount": 100_000, "term_months": 12}
    document = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ScreenRequest", "components": DOCUMENT["components"]}
    )
    for row, kind in (([None, None], "array"), (None, "null"), ("x", "string"), (3, "number")):
        body = {"product": "microloan", "applicants": [good, row]}
        assert not document.is_valid(body), body
        status, answer = api.call("/screen", body, role="lender")
        assert status == 400, answer
        assert answer["error"] == {
            "code": "invalid_request",
            "message": f"applicants[1]: should be an object, got {kind}",
            "field": "applicants[1]",
        }
    bad = {"enterprise_id": eid, "requested_amount": -5}
    body = {"product": "microloan", "applicants": [good, bad]}
    assert document.is_valid(body)
    status, answer = api.call("/screen", body, role="lender")
    assert status == 200, answer
    ScreenAnswer.model_validate(answer)
    assert answer["count"] == 1 and answer["ranked"][0]["enterprise_id"] == eid, answer
    (error,) = answer["errors"]
    assert error["index"] == 1 and error["enterprise_id"] == eid, error
    assert error["error"]["field"] == "applicants[1].requested_amount", error


def test_json_sent_as_multipart(served) -> None:  # noqa: F811
    """A JSON body sent as multipart/form-data (BentoML's form parser failed on it: a 500 with a
    traceback, rewritten into 400 invalid_json although the body is JSON), or under any other
    content type than application/json, is 415 unsupported_media_type saying what to send, one
    line in the log and no traceback; application/json with a charset, or no Content-Type, is
    read as JSON."""
    from serving.client import KapokAPIError

    api: Api = served[0]
    home = served[1]
    body = json.dumps(request(served[2][0])).encode()
    lender = bearer(api.keys["lender"])
    before = (home.home / "server.log").read_text()
    for content_type in (
        "multipart/form-data",
        "multipart/form-data; boundary=xyz",
        "application/x-www-form-urlencoded",
        "text/plain",
    ):
        response = raw_post(api, "/score", body, {"Content-Type": content_type} | lender)
        assert response.status_code == 415, (content_type, response.text)
        error = KapokAPIError(response.status_code, response.json())
        assert (error.code, error.field) == ("unsupported_media_type", None), response.text
        media = content_type.split(";")[0]
        assert error.message == (
            f"Content-Type {media!r} is not accepted: send the body as JSON, with "
            "Content-Type: application/json"
        ), error.message
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {}):
        response = raw_post(api, "/score", body, headers | lender)
        assert response.status_code == 200, (headers, response.text)
        ScoreAnswer.model_validate(response.json())
    log = new_log(home, before, "'text/plain' is not accepted")
    lines = [line for line in log.splitlines() if "415 POST /score" in line]
    assert len(lines) == 4 and "unsupported_media_type" in lines[0], log
    assert "Traceback" not in log, log
