"""What a request to a decision endpoint passes before BentoML reads its body.

BentoML parses the body (as JSON, or as a form for multipart/form-data and
application/x-www-form-urlencoded) before the endpoint runs, so a check made in the endpoint
comes after it: a caller without a key got 400 invalid_json for a body that is not JSON, and a
JSON body sent as multipart/form-data a 500 from the form parser. `RequestGate`, an ASGI
middleware inside `ErrorShapeMiddleware` (which logs its answers), answers first, in this order,
without reading the body:

1. the key: 401 `unauthenticated` without a valid one (serving/auth.py);
2. the role: 403 `forbidden` when the key's role may not call the endpoint;
3. the content type: 415 `unsupported_media_type` unless the body is sent as
   `application/json` (parameters such as `charset=utf-8` are fine) or without a Content-Type
   (read as JSON). One rule for every other type: text/plain, forms, multipart, BentoML's pickle.

Then the access limits of serving/access.py, still before the body is parsed: the rate per key
(429 `too_many_requests` with Retry-After, when KAPOK_RATE_LIMIT is set) after the role, and the
body size (413 `too_large` above KAPOK_MAX_BODY_BYTES: a Content-Length at once, a chunked body
as it streams) after the content type.

A request let in carries its `Caller` (the key's name and role, never the key) in the ASGI
scope's state, where the endpoint reads it (`gated_caller`): the key is checked once, here.
Only then does BentoML parse the body (400 `invalid_json` when it is not JSON) and the endpoint
validate it (400 `invalid_request`). In demo mode every caller is let in (as admin), on loopback
only: a demo server that listens on, or is reached at, another address answers every request 403.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from kapok.settings import RateLimit, max_body_bytes, rate_limit
from serving.access import RateLimiter, Verdict, demo_refusal, too_large_message
from serving.api_errors import ApiError, Message, Receive, Scope, Send
from serving.auth import AuthConfigError, AuthError, Caller, KeyStore, server_keys

JSON = "application/json"
CALLER = "kapok_caller"  # the key of the Caller in the request's ASGI state


def gated_caller(scope: Scope) -> Caller | None:
    """The caller RequestGate let in (its key's name and role, never the key), from the ASGI
    scope's state (`request.state` in Starlette); None when the request did not pass the gate's
    checks."""
    state = scope.get("state")
    caller = state.get(CALLER) if isinstance(state, Mapping) else None
    return caller if isinstance(caller, Caller) else None


def media_type(content_type: str) -> str:
    """'application/json; charset=utf-8' → 'application/json'."""
    return content_type.split(";", 1)[0].strip().lower()


def _route(key: str) -> tuple[str, str]:
    """'/score' → ('POST', '/score'); 'GET /queue' → ('GET', '/queue')."""
    method, _, path = key.rpartition(" ")
    return (method.strip().upper() or "POST"), path.strip()


def _pattern(path: str) -> re.Pattern[str]:
    """A route path with `{name}` segments as a regular expression. A `{name}` matches the rest
    of the path, whatever it is (empty, or with slashes): every request under the route's
    prefix is gated, and the endpoint says what is wrong with a parameter it cannot use."""
    parts = re.split(r"(\{[^/{}]+\})", path)
    return re.compile(
        "".join(".*" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    )


class RequestGate:
    """ASGI: a request to a route of `permissions` (route → the permission it needs; a route is
    a path, meaning POST, or 'METHOD /path', whose `{name}` matches the rest of the path, e.g.
    'POST /queue/{request_id}') is answered 401, 403 or 415 before anything reads its body, or
    let in with its caller in the request's state (`gated_caller`); every other request passes
    untouched."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        permissions: Mapping[str, str],
        keys: Callable[[], KeyStore] = server_keys,
        max_body: int | None = None,
        rate: RateLimit | Callable[[], RateLimit | None] | None = rate_limit,
    ) -> None:
        self.app = app
        self.permissions: dict[tuple[str, str], str] = {}  # (method, path) → permission
        self.patterns: list[tuple[str, re.Pattern[str], str]] = []  # routes with {name} segments
        for key, permission in permissions.items():
            method, path = _route(key)
            if "{" in path:
                self.patterns.append((method, _pattern(path), permission))
            else:
                self.permissions[(method, path)] = permission
        self.keys = keys
        self.max_body = max_body if max_body is not None else max_body_bytes()
        limit = rate() if callable(rate) else rate
        self.limiter = RateLimiter(limit) if limit is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._demo():
            reason = demo_refusal(scope.get("server"))
            if reason is not None:
                await _answer(send, ApiError(HTTPStatus.FORBIDDEN, reason))
                return
        permission = None
        if scope["type"] == "http":
            permission = self.permission(scope.get("method", ""), scope.get("path", ""))
        if not permission:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        admitted = self.admit(scope, headers, permission)
        if isinstance(admitted, ApiError):
            await _answer(send, admitted)
            return
        # a copy: the caller is this request's, even under a server that shared one state dict
        scope["state"] = {**(scope.get("state") or {}), CALLER: admitted}
        if "content-length" not in headers:
            # no Content-Length (chunked): count the body as it streams
            bounded = await self._bounded(receive)
            if bounded is None:
                size_error = too_large_message(scope.get("path", ""), self.max_body)
                await _answer(send, ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, size_error))
                return
            receive = bounded
        await self.app(scope, receive, send)

    def permission(self, method: str, path: str) -> str | None:
        """The permission a request to `path` with `method` needs (None: not gated)."""
        found = self.permissions.get((method, path))
        if found is None:
            for routed, pattern, permission in self.patterns:
                if routed == method and pattern.fullmatch(path):
                    return permission
        return found

    def _demo(self) -> bool:
        try:
            return self.keys().demo
        except AuthConfigError:  # no key file: not demo (a gated request says why, as before)
            return False

    async def _bounded(self, receive: Receive) -> Receive | None:
        """The body read up to the limit and handed on as it came (None: it is larger; nothing
        beyond the limit was read)."""
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: the app learns it as it would have
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay

    def admit(self, scope: Scope, headers: Mapping[str, str], permission: str) -> Caller | ApiError:
        """The caller, when the request may reach the endpoint; else why it may not. `headers`:
        the request's, by lower-case name (`_headers`)."""
        store = self.keys()
        try:
            caller = store.authenticate(headers.get("authorization"))
            store.authorize(caller, permission)
        except AuthError as e:
            return ApiError(e.status, e.message)
        if self.limiter is not None:
            verdict = self.limiter.take(caller.name)
            if not verdict.allowed:
                return TooManyRequests(self.limiter.message(verdict.retry_after), verdict)
        if scope.get("method") in ("GET", "HEAD"):
            return caller  # no body to type or size (GET /queue reads its query only)
        content_type = headers.get("content-type", "").strip()
        if content_type and media_type(content_type) != JSON:
            said = media_type(content_type)
            said = said if len(said) <= 80 else said[:80] + "…"
            return ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {said!r} is not accepted: send the body as JSON, with "
                "Content-Type: application/json",
            )
        length = headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > self.max_body:
            return ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                too_large_message(scope.get("path", ""), self.max_body, int(length)),
            )
        return caller


class TooManyRequests(ApiError):
    """429 with the whole seconds until the caller's next token (its Retry-After header)."""

    def __init__(self, message: str, verdict: Verdict) -> None:
        super().__init__(HTTPStatus.TOO_MANY_REQUESTS, message)
        self.retry_after = verdict.retry_after


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones, as Starlette)."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def _answer(send: Send, error: ApiError) -> None:
    data = json.dumps(error.body(), ensure_ascii=False).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if error.status == HTTPStatus.UNAUTHORIZED:
        headers.append((b"www-authenticate", b"Bearer"))
    if isinstance(error, TooManyRequests):
        headers.append((b"retry-after", str(error.retry_after).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
