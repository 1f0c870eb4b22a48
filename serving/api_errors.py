"""One error shape for every error the lending API answers, and one log line per client error.

Every error is `{"error": {"code": "...", "message": "...", "field": "..." | null}}` with its HTTP
status. Kapok's own errors are `ApiError`s, answered as that shape by the endpoints. Errors that
BentoML or Starlette answer before Kapok's code runs (a body that is not JSON, an unknown path, an
unexpected fault) pass through `ErrorShapeMiddleware`, which rewrites them into the same shape:
BentoML alone would hide 401/403/5xx messages behind "Authorization error" and "An unexpected
error has occurred", and answer validation errors with pydantic's own shape and URLs.

Client errors (4xx) are one line in the server log, written by the middleware; BentoML's
traceback for them is dropped (`quiet_client_error_tracebacks`). Server faults (5xx) keep theirs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

logger = logging.getLogger("kapok.api")
M = TypeVar("M", bound=BaseModel)

CODES: dict[int, str] = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "cannot_decide",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


def code_for(status: int) -> str:
    return CODES.get(status, "client_error" if status < 500 else "server_error")


class ApiError(Exception):
    """An error with its HTTP status, a stable code, a message that says what was wrong and,
    where one field is at fault, its name."""

    def __init__(
        self, status: int, message: str, code: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code or code_for(self.status)
        self.field = field

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def is_error_body(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"code", "message", "field"} <= error.keys()


# -- validation errors in words -----------------------------------------------------------------
def field_path(loc: Iterable[str | int], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _said(error: dict[str, Any], field: str, allowed: Iterable[str] = ()) -> str:
    kind, msg = error["type"], error["msg"]
    got = f", got {error['input']!r}" if "input" in error else ""
    if kind == "missing":
        return f"{field}: required"
    if kind == "extra_forbidden":
        known = ", ".join(allowed)
        return f"{field}: unknown field" + (f" (expected: {known})" if known else "")
    if kind == "value_error":  # Kapok's own check (the USCC validator): its message is whole
        text = msg.removeprefix("Value error, ")
        leaf = field.rsplit(".", 1)[-1]
        return field + text[len(leaf) :] if text.startswith(leaf) else f"{field}: {text}"
    if kind == "literal_error":
        return f"{field} must be one of {error['ctx']['expected'].replace(' or ', ', ')}{got}"
    if kind == "json_invalid":
        return f"the body is not valid JSON: {msg.removeprefix('Invalid JSON: ')}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if not error["loc"]:
            return "the body must be a JSON object"
        if "input" in error:
            return f"{field}: should be an object, got {json_kind(error['input'])}"
    text = msg[0].lower() + msg[1:] if msg else kind
    return f"{field}: {text.replace('input should', 'should')}{got}"


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (null, boolean, number, string, array,
    object)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def from_validation(
    errors: list[dict[str, Any]], prefix: str = "", model: type[BaseModel] | None = None
) -> ApiError:
    """The first of pydantic's errors as a 400 that names its field (and how many more there
    are). `errors` come from ValidationError.errors(); `prefix` is where the object sits in the
    request (e.g. "applicants[3]")."""
    first = errors[0]
    field = field_path(first["loc"], prefix) or None
    allowed = list(model.model_fields) if model is not None else []
    message = _said(first, field or "body", allowed)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more: " + ", ".join(
            field_path(e["loc"], prefix) or "body" for e in errors[1:4]
        )
        message += ", …)" if len(errors) > 4 else ")"
    code = "invalid_json" if first["type"] == "json_invalid" else "invalid_request"
    return ApiError(HTTPStatus.BAD_REQUEST, message, code=code, field=field)


def validate(model: type[M], data: Any, prefix: str = "") -> M:
    """`data` as `model`, or a 400 ApiError naming the first field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False), prefix, model) from None


# -- errors answered outside Kapok's endpoints --------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROBES = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})

_FALLBACK = {
    401: "missing or unknown API key",
    403: "this key's role may not call this endpoint",
    404: "no such endpoint",
    405: "method not allowed (GET /queue; every other endpoint takes POST with a JSON body)",
    500: "internal error; the server log has the details",
    503: "the service is unavailable; try again shortly",
}


def reshape(status: int, path: str, body: bytes) -> dict[str, Any]:
    """Any error body in Kapok's shape."""
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:  # BentoML's ({"error": ...},) for a 4xx
        parsed = parsed[0]
    if is_error_body(parsed):
        return parsed  # type: ignore[return-value]
    if isinstance(parsed, dict) and status == 400 and isinstance(parsed.get("detail"), list):
        errors = [e for e in parsed["detail"] if isinstance(e, dict) and "type" in e]
        if errors:
            for e in errors:
                e.setdefault("loc", [])
                e.setdefault("msg", e["type"])
            return from_validation(errors).body()
    said = parsed.get("error") if isinstance(parsed, dict) else None
    generic = (
        status >= 500
        or status in (401, 403)  # BentoML's "Authorization error" says neither which nor why
        or not isinstance(said, str)
        or not said
    )
    message = _FALLBACK.get(status, HTTPStatus(status).phrase.lower()) if generic else said
    if status == 404 and generic:
        message = f"no such endpoint: {path}"
    return error_body(code_for(status), message)  # type: ignore[arg-type]


class ErrorShapeMiddleware:
    """ASGI: every error answer in Kapok's shape, and one log line per error (4xx and 5xx).
    Successful answers pass untouched (only their start message is looked at).

    Two answers are made here rather than reshaped:
    - a 500 for a POST body BentoML read whole and could not parse as JSON (BentoML answers a
      parse failure with its generic 500) is the client's 400 `invalid_json`. Only then: any
      other 500 (a fault in the endpoint, on a body that parsed) stays a 500. BentoML reads an
      empty body as `{}`, so an empty body is no parse failure either;
    - an exception that escapes the layers below (the request gate, the docs page, BentoML's
      context) before any answer went out is a 500 `internal_error`, at once, logged with its
      traceback. (Left to BentoML, the request waited for its traffic timeout and got no
      answer from the app: the server's plain-text 500 after 60 s.)
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in PROBES:
            await self.app(scope, receive, send)  # a probe's 503 is its answer, not an error
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        start: Message | None = None
        answered = False  # an answer's start went to the client
        chunks: list[bytes] = []
        request: list[bytes] = []  # the body as it passes (kept by reference, read on error)
        whole = False  # the app read the body to its end

        # the request body, to tell a client's bad JSON from a server fault
        async def keep() -> Message:
            nonlocal whole
            message = await receive()
            if message["type"] == "http.request":
                request.append(message.get("body", b""))
                whole = not message.get("more_body", False)
            return message

        async def watch(message: Message) -> None:
            nonlocal start, answered
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # hold it: the body decides the headers
                return
            if start is None:
                answered = answered or message["type"] == "http.response.start"
                await send(message)
                return
            if message["type"] != "http.response.body":
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            status = start["status"]
            body = reshape(status, path, b"".join(chunks))
            parse_failure = status == 500 and method == "POST" and whole  # it may be one
            if parse_failure and (bad_json := _json_error(b"".join(request))):
                status, body = 400, error_body("invalid_json", bad_json)
            log_error(status, method, path, body)
            answered = True
            await _send_error(send, status, body, start)

        try:
            await self.app(scope, keep, watch)
        except Exception:
            if answered:
                raise  # part of an answer went out: nothing else can be sent
            body = error_body(code_for(500), _FALLBACK[500])
            log_error(500, method, path, body, exc_info=True)
            await _send_error(send, 500, body, {})


async def _send_error(send: Send, status: int, body: dict[str, Any], start: Message) -> None:
    """`body` as the JSON answer, with the rest of the app's start message (its other headers,
    e.g. Retry-After; `start` is {} when the app sent none)."""
    data = json.dumps(body, ensure_ascii=False).encode()
    headers = start.get("headers", [])
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({**start, "type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": data})


def _json_error(body: bytes) -> str | None:
    """What is wrong with a request body that is not JSON (None if it is). Empty is `{}`, as
    BentoML reads it."""
    try:
        json.loads(body or b"{}")
    except ValueError as e:
        return f"the body is not valid JSON: {e}"
    return None


def log_error(
    status: int, method: str, path: str, body: dict[str, Any], exc_info: bool = False
) -> None:
    error = body["error"]
    line = f"{status} {method} {path} {error['code']}: {error['message']}"
    (logger.warning if status < 500 else logger.error)(line, exc_info=exc_info)


class _QuietClientErrors(logging.Filter):
    """Drops BentoML's traceback for an exception that is the client's fault (the middleware
    has logged it in one line); a server fault keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError | ApiError):
            return False
        if isinstance(exc, ValueError) and _while_parsing_the_request(exc):
            return False  # a body that is not JSON (answered 400 by the middleware)
        status = getattr(getattr(exc, "error_code", None), "value", 500)
        return not (isinstance(status, int) and status < 500)


def _while_parsing_the_request(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("from_http_request", "parse_request"):
            return True
        tb = tb.tb_next
    return False


def quiet_client_error_tracebacks() -> None:
    """Install the filter on BentoML's HTTP app logger (in each worker, once)."""
    http_logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _QuietClientErrors) for f in http_logger.filters):
        http_logger.addFilter(_QuietClientErrors())
    logger.setLevel(logging.INFO)
