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
unknown key 401, whatever the JSON body; another method than POST gets 405.

Random enterprise ids hardly ever name an enterprise of the feature store, so a second test draws
bodies whose ids are the simulated region's (and request ids of logged decisions for /decision),
with amounts and terms anywhere from the boundaries to absurd: those reach the decision path, and
the test counts the 200s to make sure some did.

What fuzzing found where the server and its document disagree is at the end, as strict xfails.

Short in CI (KAPOK_FUZZ_EXAMPLES=25 generated examples per endpoint and test, deterministic, plus
schemathesis's examples and boundary cases); run it longer by hand with e.g.
KAPOK_FUZZ_EXAMPLES=300 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from features.schema import PRODUCTS
from serving.api_docs import ENDPOINTS, Endpoint, openapi
from serving.api_errors import CODES
from serving.api_models import EXAMPLE_ID, Applicant, ErrorBody
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
    """schemathesis's checks. /screen is the exception to a body that breaks the schema being a
    4xx: it answers 200 and reports each applicant that is not an Applicant in `errors` (see
    test_screen_rows_the_document_forbids); `screened` checks that it does."""
    checks = CHECKS
    if case.operation.path == "/screen":
        checks = [c for c in CHECKS if c is not schemathesis.checks.negative_data_rejection]
    case.validate_response(response, checks=checks, headers=headers)
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
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).include(method="POST")


def test_served_document(served) -> None:  # noqa: F811
    """The server serves the document the tests fuzz against, and schemathesis reads it as a
    valid OpenAPI 3.1 document with every endpoint."""
    api: Api = served[0]
    response = requests.get(api.base + "/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.json() == DOCUMENT
    loaded = schemathesis.openapi.from_url(api.base + "/openapi.json", config=CONFIG)
    posted = {op.ok().path for op in loaded.get_all_operations() if op.ok().method == "post"}
    assert posted == set(BY_PATH)


def sent_as_json(response: requests.Response) -> bool:
    """The request went out as a JSON body (schemathesis also sends bytes that are not JSON, and
    bodies under another media type)."""
    sent = response.request
    if "json" not in str(sent.headers.get("Content-Type", "")):
        return False
    try:
        json.loads(sent.body or b"")
    except ValueError:
        return False
    return True


@schema.parametrize()
def test_generated_requests(case: schemathesis.Case, served) -> None:  # noqa: F811
    """Every generated request, as each role, with no key and with an unknown key: no 5xx, a
    documented status with the documented shape; 403 for a role not allowed and 401 without a
    valid key, whatever the JSON body; another method than POST is 405, in the error shape."""
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
        if case.method.upper() != "POST":
            assert status == 405, f"{said}: {status} {body}"
            ErrorBody.model_validate(body)
            continue
        conforms(path, status, body, said)
        if who in allowed(path):
            continue
        expected = 403 if who in ROLES else 401
        if not sent_as_json(response) and status == 400:
            # BentoML reads the body before Kapok's endpoint checks the key: see
            # test_unreadable_body_without_a_valid_key
            assert body["error"]["code"] == "invalid_json", f"{said}: {body}"
            continue
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


@pytest.mark.parametrize("path", list(BY_PATH))
def test_known_enterprises(path: str, served, request_ids: list[str]) -> None:  # noqa: F811
    """Bodies that name the region's enterprises (and logged decisions), each sent as an allowed
    role (drawn): no 5xx, the documented status and shape, and some 200s; the same body as every
    role not allowed is 403 and without a key 401."""
    api: Api = served[0]
    operation = schema[path]["POST"]
    statuses: Counter[int] = Counter()
    may, may_not = allowed(path), not_allowed(path)

    @FUZZ_SETTINGS
    @given(body=bodies(path, served[2][:300], request_ids), role=st.sampled_from(may))
    def run(body: dict[str, Any], role: str) -> None:
        case = operation.Case(body=body, media_type="application/json")
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


# -- what fuzzing found: the server and its document disagree ------------------------------------
# Each test below fails today (strict xfail): when the owner fixes the server or the document, it
# passes, pytest reports XPASS as a failure, and the marker comes off.
def raw_post(api: Api, path: str, data: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(api.base + path, data=data, headers=headers, timeout=60)


@pytest.mark.xfail(
    strict=True,
    reason="BentoML parses the body before Kapok's endpoint checks the key: a body that is not "
    "JSON answers 400 invalid_json to a caller without a valid key (401) or whose role may not "
    "call the endpoint (403)",
)
def test_unreadable_body_without_a_valid_key(served) -> None:  # noqa: F811
    api: Api = served[0]
    json_type = {"Content-Type": "application/json"}
    for path in BY_PATH:
        no_key = raw_post(api, path, b"xx", json_type)
        assert no_key.status_code == 401, (path, no_key.text)
        role = not_allowed(path)[0]
        forbidden = raw_post(api, path, b"xx", json_type | bearer(api.keys[role]))
        assert forbidden.status_code == 403, (path, role, forbidden.text)


@pytest.mark.xfail(
    strict=True,
    reason="/screen answers 200 (the row in `errors`) for applicants that are not objects, while "
    "the document's ScreenRequest.applicants items are Applicant objects, so a request the "
    "document forbids is accepted: the document or the server has to change",
)
def test_screen_rows_the_document_forbids(served) -> None:  # noqa: F811
    api: Api = served[0]
    items = DOCUMENT["components"]["schemas"]["ScreenRequest"]["properties"]["applicants"]["items"]
    assert items["type"] == "object"  # so [null, null] is not an applicant
    body = {"product": "microloan", "applicants": [[None, None]]}
    status, answer = api.call("/screen", body, role="lender")
    assert status == 400, answer  # what the document says; the server answers 200


@pytest.mark.xfail(
    strict=True,
    reason="a JSON body sent as multipart/form-data (no boundary) fails in Starlette's form "
    "parser, which BentoML turns into a 500 (traceback in the log) and the error middleware into "
    "400 invalid_json 'the body is not valid JSON: Expecting value: line 1 column 1 (char 0)' "
    "although the body is valid JSON: the content type is what is wrong",
)
def test_json_sent_as_multipart(served) -> None:  # noqa: F811
    api: Api = served[0]
    body = json.dumps(request(served[2][0])).encode()
    headers = {"Content-Type": "multipart/form-data"} | bearer(api.keys["lender"])
    response = raw_post(api, "/score", body, headers)
    assert response.status_code in (400, 415), response.text
    assert response.json()["error"]["code"] != "invalid_json", response.text
