"""What ErrorShapeMiddleware (serving/api_errors.py) makes of BentoML's 500s and of faults below
it, without a server: a body that is not JSON is the client's 400 `invalid_json`; a genuine
internal error stays a 500 `internal_error`, in the same shape, and is never mistaken for a bad
body; a fault that escapes the gate is answered at once. Over HTTP on a real server:
tests/test_service.py (`test_bad_input_is_a_4xx_naming_the_field`)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serving.api_errors import ErrorShapeMiddleware
from tests.asgi_driver import Receive, Send, through

# BentoML's answer to any exception in an endpoint, a body it cannot parse included
BENTOML_500 = b'{"error": "An unexpected error has occurred, please check the server log."}'
INTERNAL = {
    "code": "internal_error",
    "message": "internal error; the server log has the details",
    "field": None,
}


async def bentoml_fails(scope: dict, receive: Receive, send: Send) -> None:
    """As BentoML for an endpoint that fails: the body read whole (an empty one is taken for
    `{}`), then its generic 500."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": BENTOML_500})


def shaped(chunks: list[bytes], method: str = "POST"):
    return through(ErrorShapeMiddleware(None), {}, chunks, method=method, app=bentoml_fails)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chunks", "said"),
    [
        ([b"{not json"], "Expecting property name enclosed in double quotes"),
        ([b'{"a": 1} x'], "Extra data"),
        ([b"  "], "Expecting value"),
        ([b"\xff\xfe"], "Expecting value"),
        ([b'{"enterprise_id": ', b'"9144"'], "Expecting ',' delimiter"),  # chunked
    ],
)
def test_a_body_that_is_not_json_is_400_invalid_json(chunks, said):
    r = shaped(chunks)
    assert r.status == 400, r.error
    assert r.error["error"]["code"] == "invalid_json" and r.error["error"]["field"] is None
    assert r.error["error"]["message"].startswith("the body is not valid JSON: " + said), r.error
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("chunks", "method"),
    [
        ([b'{"enterprise_id": "91440106326110621P"}'], "POST"),
        ([b""], "POST"),  # BentoML reads an empty body as {}: the endpoint ran, and failed
        ([b""], "GET"),  # no body to parse at all
    ],
)
def test_an_internal_error_stays_500_in_the_error_shape(chunks, method, caplog):
    """Never a 400 'the body is not valid JSON' for a fault of the server's, never BentoML's
    words: a 500 internal_error, logged as an error."""
    with caplog.at_level(logging.WARNING, logger="kapok.api"):
        r = shaped(chunks, method)
    assert (r.status, r.error) == (500, {"error": INTERNAL})
    assert [(x.levelname, x.getMessage()) for x in caplog.records] == [
        ("ERROR", f"500 {method} /score internal_error: {INTERNAL['message']}")
    ]


def test_a_fault_below_the_error_shape_is_a_500_at_once(caplog):
    """An exception that escapes the layers under the middleware (the gate, the docs page)
    before anything was answered: a 500 internal_error there and then, its traceback in the
    log, the exception's words not in the answer. Once an answer has started, it goes on up."""

    async def gate_fails(scope: dict, receive: Receive, send: Send) -> None:
        raise RuntimeError("the key store broke: secret detail")

    with caplog.at_level(logging.WARNING, logger="kapok.api"):
        r = through(ErrorShapeMiddleware(None), {}, app=gate_fails)  # type: ignore[arg-type]
    assert (r.status, r.error) == (500, {"error": INTERNAL})
    assert r.headers["content-type"] == "application/json"
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.getMessage().startswith("500 POST /score")
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError)

    async def fails_while_answering(scope: dict, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("half an answer")

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/score", "headers": []}
    with pytest.raises(RuntimeError, match="half an answer"):
        asyncio.run(ErrorShapeMiddleware(fails_while_answering)(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start"]
