"""Kapok's own API documentation: an OpenAPI 3.1 document and a docs page rendered from it.

Both are built from the pydantic models that validate every request (serving/api_models.py), so
the page documents what the server checks. The page is one self-contained HTML document: no
script, no external stylesheet, font, image or tracker, and a Content-Security-Policy that
forbids loading any — it works offline and tells no one it was opened. `DocsMiddleware` serves
it at `/` (in place of BentoML's generic page) and the document at `/openapi.json` (and at
BentoML's `/docs.json`).
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel

import kapok
from serving import api_models as m
from serving.api_errors import CODES, Receive, Scope, Send

TITLE = "Kapok lending API"


@dataclass(frozen=True)
class Endpoint:
    path: str  # `{name}` segments are path parameters (`params`)
    summary: str
    permission: str  # what a key's role must allow (serving/auth.py)
    request: type[BaseModel] | None  # the JSON body (None: no body)
    answer: type[BaseModel]
    errors: tuple[int, ...]
    logged: bool  # a decision written to the decision log before the answer leaves
    method: str = "POST"
    params: type[BaseModel] | None = None  # query parameters (GET) or the path's parameters
    meanings: tuple[tuple[int, str], ...] = ()  # what an error status means here, if not the usual

    @property
    def route(self) -> str:
        """'POST /score', 'GET /queue': the request gate's key (serving/gate.py)."""
        return f"{self.method} {self.path}"

    @property
    def operation_id(self) -> str:
        name = self.path.strip("/").replace("{", "").replace("}", "").replace("/", "_")
        return name if self.method == "POST" or name == "queue" else f"{name}_{self.method}"

    @property
    def anchor(self) -> str:
        return self.operation_id

    def meaning(self, status: int) -> str:
        return dict(self.meanings).get(status, _ERROR_MEANING[status])


_DECISION_ERRORS = (400, 401, 403, 404, 413, 415, 422, 429, 503)
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "/score",
        "PD (calibrated), score, grade, approve / refer / decline and up to four reasons.",
        "score", m.LoanRequest, m.ScoreAnswer, _DECISION_ERRORS, True,
    ),
    Endpoint(
        "/limit",
        "The largest amount the policy approves, the constraint that binds it, and the rate.",
        "limit", m.LoanRequest, m.LimitAnswer, _DECISION_ERRORS, True,
    ),
    Endpoint(
        "/price",
        "Expected loss and the risk-based rate / fee / premium, part by part, under the caps.",
        "price", m.PriceRequest, m.PriceAnswer, _DECISION_ERRORS, True,
    ),
    Endpoint(
        "/screen",
        "Rank up to 1,000 applicants by risk with PD, grade, decision, limit and price.",
        "screen", m.ScreenRequest, m.ScreenAnswer, (400, 401, 403, 413, 415, 429, 503), True,
    ),
    Endpoint(
        "/explain",
        "Every feature's value and its SHAP contribution in log-odds, with the additivity check.",
        "explain", m.ExplainRequest, m.ExplainAnswer, (400, 401, 403, 404, 413, 415, 429, 503),
        False,
    ),
    Endpoint(
        "/decision",
        "A logged decision as the log keeps it (for model-risk reviewers).",
        "log", m.DecisionRequest, m.DecisionLogEntry, (400, 401, 403, 404, 413, 415, 429, 503),
        False,
    ),
    Endpoint(
        "/whatif",
        "What would get this approved: the decision at other amounts and terms, and the smallest "
        "change the enterprise can make. An estimate: nothing is decided or logged.",
        "whatif", m.WhatIfRequest, m.WhatIfAnswer, (400, 401, 403, 404, 413, 415, 422, 429, 503),
        False,
    ),
    Endpoint(
        "/queue",
        "The referral queue: referred applications no officer has decided yet, the longest "
        "waiting first.",
        "queue", None, m.QueueAnswer, (400, 401, 403, 429, 503), False, method="GET",
        params=m.QueueQuery,
        meanings=((400, "A query parameter is unknown or invalid (`invalid_request`; `field` "
                         "names it)."),),
    ),
    Endpoint(
        "/queue/{request_id}",
        "A credit officer approves or declines a referred application, with a reason: a new "
        "override record in the decision log, linked to the referral (never an update of it).",
        "queue", m.OverrideRequest, m.OverrideAnswer,
        (400, 401, 403, 404, 409, 413, 415, 422, 429, 503), True, params=m.QueuePath,
        meanings=(
            (404, "No application decision with this request_id in the log "
                  "(`decision_not_found`)."),
            (409, "The decision is not a refer (`not_referred`: the message says what it was), "
                  "or an officer already decided it (`already_overridden`: the message names "
                  "that override's request_id and officer). Only one override per referral is "
                  "ever logged."),
            (422, "The limit is above the product's maximum, its house limit per borrower or "
                  "the amount asked for, or below the product's minimum; or the price is above "
                  "a legal cap (`override_refused`)."),
            (503, "Starting, or the decision log is unavailable: nothing was recorded."),
        ),
    ),
)  # fmt: skip

_ERROR_MEANING = {
    400: "The body is not JSON (`invalid_json`), or a field is missing, unknown or invalid "
    "(`invalid_request`; `field` names it).",
    401: "No API key, a malformed Authorization header, or an unknown key (checked before "
    "anything about the body).",
    403: "The key is valid but its role may not call this endpoint (checked before anything "
    "about the body); or a demo server (no keys) reached on, or listening on, an address other "
    "than loopback.",
    404: "The enterprise is not in the feature store (or the decision is not in the log).",
    409: "The request conflicts with what the decision log holds.",
    413: "The body is larger than the server's limit (KAPOK_MAX_BODY_BYTES, default 1 MiB; "
    "checked after the key, before the body is read in full): split a /screen list into "
    "several requests.",
    415: "The body was sent with a Content-Type other than application/json (send JSON with "
    "Content-Type: application/json; none at all is read as JSON).",
    422: "The feature store holds a value no policy can decide on.",
    429: "More requests with this key than the server's rate limit allows (KAPOK_RATE_LIMIT, "
    "per key, shared by every worker); the Retry-After header says in how many seconds to "
    "try again.",
    503: "Starting (models not loaded yet), or the decision log or feature store is "
    "unavailable: nothing was decided.",
}


def _roles_for(permission: str) -> list[str]:
    from serving.auth import ROLE_PERMISSIONS

    return sorted(r for r, allowed in ROLE_PERMISSIONS.items() if permission in allowed)


@cache
def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the lending API."""
    models: list[type[BaseModel]] = [m.ErrorBody]
    for e in ENDPOINTS:
        models += [e.request, e.answer] if e.request is not None else [e.answer]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    ref = "#/components/schemas/{}".format
    paths: dict[str, Any] = {}
    for e in ENDPOINTS:
        roles = _roles_for(e.permission)
        description = f"Roles: {', '.join(roles)}." + (
            " The decision is written to the decision log before the answer leaves; "
            "when it cannot be, the answer is 503 and nothing is decided."
            if e.logged
            else ""
        )
        responses: dict[str, Any] = {
            "200": {
                "description": e.answer.__doc__.strip() if e.answer.__doc__ else "OK",
                "content": {"application/json": {"schema": {"$ref": ref(e.answer.__name__)}}},
            }
        }
        for status in e.errors:
            responses[str(status)] = {
                "description": f"`{CODES[status]}`: {e.meaning(status)}",
                "content": {"application/json": {"schema": {"$ref": ref("ErrorBody")}}},
            }
            if status == 429:
                responses[str(status)]["headers"] = {
                    "Retry-After": {
                        "description": "Seconds until this key may call again.",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                }
        operation: dict[str, Any] = {
            "operationId": e.operation_id,
            "summary": e.summary,
            "description": description,
            "security": [{"bearer": []}],
        }
        if e.params is not None:
            operation["parameters"] = _parameters(e)
        if e.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": ref(e.request.__name__)}}},
            }
        operation["responses"] = responses
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    for probe, meaning in (
        ("/livez", "200 while the process is alive (also while the models load)."),
        (
            "/readyz",
            "200 once every worker has loaded its models; 503 until then, and while "
            "the feature store or the decision log does not answer.",
        ),
    ):
        paths[probe] = {
            "get": {
                "operationId": probe.strip("/"),
                "summary": meaning,
                "security": [],
                "responses": {"200": {"description": "alive / ready"}},
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": kapok.__version__,
            "description": "Credit scoring, limits, pricing, screening and SHAP explanations "
            "for small-business lending (microloans, guarantees, credit insurance). Every "
            'error answers {"error": {"code", "message", "field"}}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `kapok keys add NAME --role ROLE` "
                    "(roles: lender, reviewer, officer, admin), sent as "
                    "`Authorization: Bearer kpk_…`.",
                }
            },
            "schemas": schemas,
        },
        "paths": paths,
    }


def _parameters(e: Endpoint) -> list[dict[str, Any]]:
    """An endpoint's query or path parameters as OpenAPI parameter objects."""
    assert e.params is not None
    schema = e.params.model_json_schema()
    where = "path" if "{" in e.path else "query"
    required = set(schema.get("required", []))
    parameters = []
    for name, field in schema.get("properties", {}).items():
        field = dict(field)
        field.pop("title", None)
        description = field.pop("description", "")
        # an optional query parameter is left out rather than sent as null (a query string
        # cannot say null): the schema of a given value is the non-null one
        options = [o for o in field.pop("anyOf", []) if o.get("type") != "null"]
        if options:
            field.pop("default", None)
            field = {**options[0], **field}
            description = description or field.pop("description", "")
        field.pop("description", None)
        parameters.append(
            {
                "name": name,
                "in": where,
                "required": where == "path" or name in required,
                "description": description,
                "schema": field,
            }
        )
    return parameters


# -- the page -----------------------------------------------------------------------------------
_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1b1f24}
h1{margin-bottom:.2em}h2{border-top:1px solid #d0d7de;padding-top:1em;margin-top:2em}
code,pre{font:13px ui-monospace,monospace;background:#f3f5f7;border-radius:4px}
pre{padding:.8em;overflow-x:auto}code{padding:0 .25em}
table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f6f8fa}.method{font-weight:bold;color:#0a6b3d}.muted{color:#57606a}
nav a{margin-right:1em}
"""


def _type(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s, schemas) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}), schemas)}"
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        if isinstance(extra, dict):
            return f"object of {_type(extra, schemas)}"
    return str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    said = []
    for key, text in (
        ("exclusiveMinimum", "> {}"),
        ("minimum", "≥ {}"),
        ("maximum", "≤ {}"),
        ("minLength", "length ≥ {}"),
        ("maxLength", "length ≤ {}"),
        ("maxItems", "at most {} items"),
    ):
        if key in schema:
            said.append(text.format(schema[key]))
    return ", ".join(said)


def _fields_table(model_schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    required = set(model_schema.get("required", []))
    rows = []
    for name, field in model_schema.get("properties", {}).items():
        example = field.get("examples", [field["default"]] if "default" in field else [])
        rows.append(
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
                html.escape(name),
                "" if name in required else ' <span class="muted">(optional)</span>',
                html.escape(_type(field, schemas)),
                html.escape(_constraints(field)),
                html.escape(field.get("description", "")),
                html.escape(json.dumps(example[0], ensure_ascii=False)) if example else "",
            )
        )
    head = "<tr><th>field</th><th>type</th><th>range</th><th>meaning</th><th>example</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _example(model: type[BaseModel]) -> dict[str, Any]:
    example: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.examples:
            example[name] = info.examples[0]
    return example


@cache
def docs_html() -> str:
    """The docs page: one self-contained HTML document."""
    spec = openapi()
    schemas = spec["components"]["schemas"]
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(TITLE)} {esc(spec['info']['version'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(TITLE)}</h1><p class='muted'>version {esc(spec['info']['version'])} · "
        "<a href='/openapi.json'>OpenAPI 3.1 document</a></p>",
        f"<p>{esc(spec['info']['description'])}</p>",
        "<nav>" + "".join(f"<a href='#{e.anchor}'>{e.route}</a>" for e in ENDPOINTS),
        "<a href='#errors'>errors</a></nav>",
        "<h2 id='auth'>Authentication</h2>",
        f"<p>{esc(spec['components']['securitySchemes']['bearer']['description'])} "
        "Each endpoint lists the roles that may call it. <code>/livez</code> and "
        "<code>/readyz</code> need no key.</p>",
    ]
    for e in ENDPOINTS:
        op = spec["paths"][e.path][e.method.lower()]
        parts += [
            f"<h2 id='{e.anchor}'><span class='method'>{e.method}</span> {esc(e.path)}</h2>",
            f"<p>{esc(e.summary)}</p><p>{esc(op['description'])}</p>",
            "<h3>Request</h3>",
        ]
        if e.params is not None:
            where = "path" if "{" in e.path else "query"
            parts += [
                f"<p>{where} parameters:</p>",
                _fields_table(e.params.model_json_schema(), schemas),
            ]
        url = f"http://127.0.0.1:3000{e.path}".replace("{request_id}", "req_…")
        if e.request is not None:
            body = json.dumps(_example(e.request), ensure_ascii=False)
            parts += [
                _fields_table(schemas[e.request.__name__], schemas),
                f"<pre>curl -s {esc(url)} \\\n"
                '  -H "Authorization: Bearer $KAPOK_KEY" \\\n'
                f"  -H 'Content-Type: application/json' \\\n  -d '{esc(body)}'</pre>",
            ]
        else:
            parts.append(
                f"<pre>curl -s '{esc(url)}?product=microloan&amp;limit=20' \\\n"
                '  -H "Authorization: Bearer $KAPOK_KEY"</pre>'
            )
        parts += [
            f"<h3>Answer (200): {esc(e.answer.__name__)}</h3>",
            _fields_table(schemas[e.answer.__name__], schemas),
            "<h3>Errors</h3><table><tr><th>status</th><th>code</th><th>when</th></tr>",
            "".join(
                f"<tr><td>{s}</td><td><code>{CODES[s]}</code></td><td>{esc(e.meaning(s))}</td></tr>"
                for s in e.errors
            ),
            "</table>",
        ]
    nested = sorted(
        name
        for name in schemas
        if name not in {e.request.__name__ for e in ENDPOINTS if e.request is not None}
        and name not in {e.answer.__name__ for e in ENDPOINTS}
    )
    parts.append("<h2 id='types'>Types</h2>")
    for name in nested:
        parts.append(f"<h3 id='type-{esc(name)}'>{esc(name)}</h3>")
        parts.append(_fields_table(schemas[name], schemas))
    parts += [
        "<h2 id='errors'>Errors</h2>",
        "<p>Every error, whatever its status, answers one shape:</p>",
        '<pre>{"error": {"code": "invalid_request", '
        '"message": "requested_amount: should be greater than 0, got -5", '
        '"field": "requested_amount"}}</pre>',
        "<table><tr><th>status</th><th>code</th></tr>",
        "".join(f"<tr><td>{s}</td><td><code>{c}</code></td></tr>" for s, c in CODES.items()),
        "</table><p>The key and its role are checked first (401, 403), whatever the body; "
        "then the rate of requests with that key (429 <code>too_many_requests</code> with a "
        "<code>Retry-After</code> header, when the server sets a limit); "
        "then the content type: a body sent with a Content-Type other than "
        "<code>application/json</code> answers 415 <code>unsupported_media_type</code> "
        "(none at all is read as JSON); then its size (413 <code>too_large</code> above the "
        "server's limit, 1 MiB by default); then the body: one that is not JSON answers 400 "
        "<code>invalid_json</code>.</p>",
        "</body></html>",
    ]
    return "".join(parts)


@cache
def _openapi_bytes() -> bytes:
    return json.dumps(openapi(), ensure_ascii=False).encode()


# no script, and nothing loaded from anywhere (not even this server): styles are inline
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none'"


class DocsMiddleware:
    """ASGI: GET / → the docs page; GET /openapi.json and /docs.json → the OpenAPI document."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if path == "/":
                await self._send(send, docs_html().encode(), b"text/html; charset=utf-8", scope)
                return
            if path in ("/openapi.json", "/docs.json"):
                await self._send(send, _openapi_bytes(), b"application/json", scope)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _send(send: Send, data: bytes, content_type: bytes, scope: Scope) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(data)).encode()),
                    (b"content-security-policy", CSP.encode()),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        body = b"" if scope["method"] == "HEAD" else data
        await send({"type": "http.response.body", "body": body})
