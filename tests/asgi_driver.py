"""One request through an ASGI middleware, without a server: what tests/test_access.py,
tests/test_auth.py and tests/test_error_shape.py ask of the request gate (serving/gate.py) and
the error shape (serving/api_errors.py). Behind the middleware sits an app that reads the whole
body and answers 200 `{}` (or a stand-in given by the test); the answer says what the client
got, how much of its body was read and what reached the app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

from serving.api_errors import ErrorShapeMiddleware
from serving.auth import Caller, KeyStore
from serving.gate import RequestGate, gated_caller

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
App = Callable[[dict, Receive, Send], Awaitable[None]]
Middleware = RequestGate | ErrorShapeMiddleware


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # the answer's, by lower-case name
    error: dict | None  # the error body (None when the app answered 200)
    read: int  # how many body chunks were read from the client
    got: bytes | None  # the body the app got (None: the request never reached the app)
    caller: Caller | None  # the caller the gate handed the app (None: none, or not reached)
    scope: dict | None  # the scope the app got (None: the request never reached the app)


def gate_for(store: KeyStore, permissions: Mapping[str, str], **kwargs: Any) -> RequestGate:
    """A RequestGate checking `store`'s keys (rate limit off unless `rate` is given)."""
    kwargs.setdefault("rate", None)
    return RequestGate(None, permissions=permissions, keys=lambda: store, **kwargs)  # type: ignore[arg-type]


def through(
    middleware: Middleware,
    headers: Mapping[str, str],
    chunks: Sequence[bytes] = (b"{}",),
    path: str = "/score",
    method: str = "POST",
    server: tuple[str, int] | None = ("127.0.0.1", 3000),
    app: App | None = None,
) -> Answer:
    """A request of `chunks` (one http.request message each) through `middleware`, whose `app`
    is replaced by one that reads the whole body and answers 200, or by `app` (then `got`,
    `caller` and `scope` are None)."""
    read = 0
    reached: dict[str, Any] = {}

    async def reader(scope: dict, receive: Receive, send: Send) -> None:
        got = b""
        while True:
            message = await receive()
            got += message.get("body", b"")
            if not message.get("more_body"):
                break
        reached.update(got=got, caller=gated_caller(scope), scope=scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict:
        nonlocal read
        read += 1
        assert read <= len(chunks), "read past the end of the body"
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "server": server,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    middleware.app = app if app is not None else reader
    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    answer_headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    error = json.loads(sent[1]["body"]) if status != 200 else None
    return Answer(
        status, answer_headers, error, read,
        reached.get("got"), reached.get("caller"), reached.get("scope"),
    )  # fmt: skip
