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

Only then does BentoML parse the body (400 `invalid_json` when it is not JSON) and the endpoint
validate it (400 `invalid_request`). In demo mode every caller is let in (as admin).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

from serving.api_errors import ApiError, Receive, Scope, Send
from serving.auth import AuthError, KeyStore, server_keys

JSON = "application/json"


def media_type(content_type: str) -> str:
    """'application/json; charset=utf-8' → 'application/json'."""
    return content_type.split(";", 1)[0].strip().lower()


class RequestGate:
    """ASGI: a POST to a path of `permissions` (path → the permission it needs) is answered 401,
    403 or 415 before anything reads its body; every other request passes untouched."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        permissions: Mapping[str, str],
        keys: Callable[[], KeyStore] = server_keys,
    ) -> None:
        self.app = app
        self.permissions = dict(permissions)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            permission = self.permissions.get(scope.get("path", ""))
            refused = self.refusal(scope, permission) if permission else None
            if refused is not None:
                await _answer(send, refused)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, permission: str) -> ApiError | None:
        """Why the request may not reach the endpoint (None: it may)."""
        headers = _headers(scope)
        store = self.keys()
        try:
            store.authorize(store.authenticate(headers.get("authorization")), permission)
        except AuthError as e:
            return ApiError(e.status, e.message)
        content_type = headers.get("content-type", "").strip()
        if content_type and media_type(content_type) != JSON:
            said = media_type(content_type)
            said = said if len(said) <= 80 else said[:80] + "…"
            return ApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type {said!r} is not accepted: send the body as JSON, with "
                "Content-Type: application/json",
            )
        return None


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
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
