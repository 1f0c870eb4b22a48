"""The BentoML lending API: /score /limit /price /explain /screen (+ /decision for reviewers).

A thin layer: authenticate, validate, call the lending engine (serving/engine.py) and the policy
(serving/policy.py), write the decision log before answering. Run it with `kapok serve`.

BentoML imports this module twice (the serving process and the worker): only the worker needs
the engine, so the heavy libraries (mlflow, feast, lightgbm) load in `Kapok.__init__`, not here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NoReturn

import bentoml
from pydantic import BaseModel, ConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import kapok  # noqa: F401  (telemetry off)
from kapok.settings import max_body_bytes, paths, rate_limit
from serving import api_models as m
from serving import policy as pol
from serving.access import demo_refusal
from serving.api_docs import ENDPOINTS, DocsMiddleware
from serving.api_errors import ApiError, ErrorShapeMiddleware, quiet_client_error_tracebacks
from serving.api_errors import validate as check
from serving.auth import AuthError, demo_mode, server_keys
from serving.gate import RequestGate, gated_caller
from serving.readiness import WorkerReadiness

if TYPE_CHECKING:
    from serving.decision_log import DecisionRecord
    from serving.engine import LendingEngine


class Answer(BaseModel):
    """A JSON answer. Declared as a model rather than dict[str, Any]: BentoML then sends it as
    application/json without rebuilding a JSON schema for every response (a quarter of the CPU
    of a /score under load)."""

    model_config = ConfigDict(extra="allow")


def check_term(product: str, term: int, engine: LendingEngine, field: str = "term_months") -> None:
    """The term within the product's range in the lending policy (a check the request models
    cannot make: the range is policy, loaded at start)."""
    problem = pol.term_outside(engine.policy.product(product), term)
    if problem:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{field} {problem}", field=field)


def check_amount(product: str, amount: float, engine: LendingEngine, field: str) -> None:
    """The amount within the product's range: a decision at an amount the product does not
    offer at all is refused, as for the term."""
    problem = pol.amount_outside(engine.policy.product(product), amount)
    if problem:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{field} {problem}", field=field)


def answers_errors(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """An endpoint whose ApiErrors answer Kapok's error shape with their status (BentoML would
    hide the message of a 401, 403 or 5xx, and log a traceback for each)."""

    @functools.wraps(endpoint)
    def answer(self: Kapok, body: Any, /, ctx: bentoml.Context) -> Any:
        try:
            return endpoint(self, body, ctx)
        except ApiError as e:
            ctx.response.status_code = e.status  # BentoML sets the answer's status from ctx
            return JSONResponse(e.body(), status_code=e.status)

    return answer


# One worker process per core: a worker is one Python interpreter, so its requests share one
# core; the workers share the decision log (group commit within each, WAL between them) and each
# keeps its own feature cache. The access log is off (the decision log is the record of every
# decision; BentoML's per-request log line cost ~5% of a /score).
def _workers() -> int | str:
    """KAPOK_WORKERS: API worker processes; unset or empty: one per core."""
    value = os.environ.get("KAPOK_WORKERS", "").strip()
    if not value:
        return "cpu_count"
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"KAPOK_WORKERS must be a whole number ≥ 1 (or unset), got {value!r}")
    return int(value)


def _worker_count() -> int:
    """How many workers BentoML starts for `_workers()` (its own reading of the cores)."""
    workers = _workers()
    if isinstance(workers, int):
        return workers
    from bentoml._internal.resource import system_resources

    return int(system_resources()["cpu"]) or 1


def _check_access_settings() -> None:
    """KAPOK_MAX_BODY_BYTES and KAPOK_RATE_LIMIT (read by RequestGate in each worker) checked
    once, where `bentoml serve` imports this module: a malformed one is one line at start."""
    try:
        max_body_bytes()
        rate_limit()
    except ValueError as e:
        raise SystemExit(str(e)) from None


_check_access_settings()


def freeze_loaded_heap() -> None:
    """Move everything the worker has loaded (the frameworks, the models, the feature store's
    registry: ~400,000 objects) out of reach of the cyclic garbage collector. A full collection
    walks every tracked object: ~240 ms with the engine loaded, during which the worker answers
    nothing, and under load one came every minute or so (the soak's per-minute p99 jumped from
    ~40 ms to 400-550 ms in the minutes it hit). Those objects live as long as the worker, so
    the collector has nothing to find among them; objects created later are collected as before.
    """
    gc.collect()
    gc.freeze()


def caller_name(service: Any, scope: Any, path: str, permission: str) -> str:
    """The caller's name (the decision log's `caller`). RequestGate checked the key and the
    role before BentoML read the body and handed on the caller it let in: the key is not
    checked again. A request that reached the endpoint without it (a route the gate does
    not know) is refused, never answered unchecked; the role is checked again against the
    endpoint's own permission (a set lookup), should the gate's map and the endpoint differ.
    """
    if not service.ready:
        raise ApiError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "starting: the models are not loaded yet (GET /readyz answers 200 once they are)",
            code="starting",
        )
    caller = gated_caller(scope)
    if caller is None:
        raise ApiError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"{path} was reached without the request gate's key check (serving/gate.py): refused",
        )
    try:
        service.keys.authorize(caller, permission)
    except AuthError as e:
        raise ApiError(e.status, str(e)) from None
    return caller.name


# -- the referral queue: GET /queue and POST /queue/{request_id} ----------------------------------
# BentoML 1.4's @bentoml.api routes answer POST only (its app adds each as a Starlette Route with
# methods=["POST"]) and hand the endpoint the body, not the path's parameters: the queue's two
# routes are a small Starlette app mounted into the service (bentoml.asgi_app), behind the
# same middlewares as every endpoint (error shape, request gate: key, role, rate, content type,
# body size), documented in serving/api_docs.py with the others. Its handlers reach the worker's
# Kapok instance (its decision log, its policy, its readiness) through
# bentoml.get_current_service().
async def _queue_answer(work: Callable[[], dict[str, Any]]) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    try:
        return JSONResponse(await run_in_threadpool(work))
    except ApiError as e:
        return JSONResponse(e.body(), status_code=e.status)


async def queue_list(request: Request) -> JSONResponse:
    """GET /queue: the open referrals, the longest waiting first."""

    def work() -> dict[str, Any]:
        from serving.queue import open_queue

        service: Kapok = bentoml.get_current_service()
        caller_name(service, request.scope, request.url.path, "queue")
        query = check(m.QueueQuery, dict(request.query_params))
        with log_faults("cannot read the queue"):
            return open_queue(service.log, query.product, query.since, query.until, query.limit)

    return await _queue_answer(work)


async def queue_decide(request: Request) -> JSONResponse:
    """POST /queue/{request_id}: an officer's approve / decline, logged as an override record."""
    raw = await request.body()

    def work() -> dict[str, Any]:
        from serving.queue import Override, QueueError, override

        service: Kapok = bentoml.get_current_service()
        caller = caller_name(service, request.scope, request.url.path, "queue")
        request_id = check(m.QueuePath, dict(request.path_params)).request_id
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {e}",
                           code="invalid_json") from None  # fmt: skip
        given = check(m.OverrideRequest, body)
        try:
            decided = Override(given.decision, given.reason, caller, given.limit, given.price)
            with log_faults("nothing recorded"):
                record = override(service.log, service.engine.policy, request_id, decided, caller)
        except QueueError as e:  # 400, 404, 409, 422 with the queue's own code
            raise ApiError(e.status, e.message, code=e.code, field=e.field) from None
        return record.response

    return await _queue_answer(work)


QUEUE_APP = Starlette(
    routes=[
        Route("/queue", queue_list, methods=["GET"]),
        # any rest of the path, so that a request id it cannot be (empty, with a slash) is a
        # 400 naming request_id rather than BentoML's redirect or 404
        Route("/queue/{request_id:path}", queue_decide, methods=["POST"]),
    ]
)


@bentoml.service(
    name="kapok",
    traffic={"timeout": 60},
    workers=_workers(),
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(QUEUE_APP, path="/")
class Kapok:
    def __init__(self) -> None:
        self.ready = False
        quiet_client_error_tracebacks()
        self.demo = demo_mode()
        self.keys = server_keys()  # the store RequestGate checks keys with (roles checked here)
        if self.demo:
            print("!!! KAPOK DEMO MODE: no API keys are checked. Never expose this server. !!!")
            refused = demo_refusal(None)
            if refused:
                print(f"!!! {refused}: every request is answered 403 (serve with API keys) !!!")
        # The models and the feature store load in the background, so that the worker serves
        # at once: /readyz answers 503 (and every endpoint 503) until they are loaded, /livez
        # 200 all along. (BentoML serves a worker only once __init__ has returned: loading here
        # left every request unanswered, /readyz and /livez too, for the whole load.) A load
        # that fails ends the worker, as a failed start did.
        self.readiness = WorkerReadiness.for_this_server(
            _worker_count(), bentoml.server_context.worker_index
        )
        threading.Thread(target=self._load, name="kapok-load", daemon=True).start()

    def _load(self) -> None:
        try:
            from serving.decision_log import DecisionLog
            from serving.engine import LendingEngine

            self.engine = LendingEngine(paths())
            self.log = DecisionLog()
            freeze_loaded_heap()
            self.readiness.mark_ready()
        except BaseException as e:
            cannot_start(e)
        self.ready = True

    def __is_ready__(self) -> bool:
        """/readyz: this worker has loaded, so has every other worker of the server (the probe
        reaches one worker; the next request may reach another), and the online feature store
        and the decision log answer (a Redis or a PostgreSQL that stopped turns the server
        unready until it is back)."""
        if not (self.ready and self.readiness.all_ready()):
            return False
        from features.online import OnlineStoreUnavailable
        from serving.decision_log import DecisionLogError

        try:
            self.engine.online.ping()
            self.log.ping()
        except (OnlineStoreUnavailable, DecisionLogError) as e:
            print(f"not ready: {e}", file=sys.stderr, flush=True)
            return False
        return True

    # -- helpers ---------------------------------------------------------------------------------
    def _caller(self, ctx: bentoml.Context, permission: str) -> str:
        return caller_name(self, ctx.request.scope, ctx.request.url.path, permission)

    def _envelope(self, request_id: str, product: str, model: Any, feats: Any) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "product": product,
            "model_name": model.name,
            "model_version": model.version,
            "features_as_of": feats.as_of,
            "decided_at": datetime.now(UTC).isoformat(),
        }

    def _log(self, records: list[DecisionRecord]) -> None:
        with log_faults("nothing decided"):
            self.log.write_many(records) if len(records) > 1 else self.log.write(records[0])

    def _assess(
        self, eid: str, product: str, amount: float, term: int, limit: bool
    ) -> dict[str, Any]:
        from serving.core import DecisionInputError
        from serving.engine import EnterpriseNotFound

        try:
            with store_faults():
                return self.engine.assess(eid, product, amount, term, limit=limit)
        except EnterpriseNotFound as e:
            raise not_found(e) from None
        except DecisionInputError as e:  # the feature store holds a value no policy can use
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot decide: {e}") from None

    def _record(
        self,
        request_id: str,
        caller: str,
        endpoint: str,
        request: dict,
        a: dict,
        body: dict,
        limit: float | None = None,
    ) -> DecisionRecord:
        from serving.decision_log import DecisionRecord

        return DecisionRecord(
            request_id=request_id,
            decided_at=body["decided_at"],
            caller=caller,
            endpoint=endpoint,
            enterprise_id=request["enterprise_id"],
            product=request["product"],
            request=request,
            model_name=a["model"].name,
            model_version=a["model"].version,
            features=a["values"],
            feature_timestamps=a["features"].timestamps,
            pd=a["pd"],
            score=a["score"],
            grade=a["grade"],
            decision=a["decision"].decision,
            limit_amount=limit,
            price=a["price"].as_dict(),
            reasons=body.get("reasons", []),
            response=body,
        )

    def _score_body(self, request_id: str, product: str, a: dict) -> dict[str, Any]:
        from serving.engine import decision_answer
        from serving.reasons import reasons_json

        return decision_answer(
            request_id, product, a["model"], a["features"].as_of,
            datetime.now(UTC).isoformat(), a["pd"], a["score"], a["grade"], a["decision"],
            reasons_json(a["reasons"]),
        )  # fmt: skip

    def _decide(
        self,
        ctx: bentoml.Context,
        endpoint: str,
        model: type[m.LoanRequest | m.PriceRequest],
        body: Any,
        extend: Callable[[dict], tuple[dict, float | None]] | None = None,
        limit: bool = False,
    ) -> Answer:
        """The path every decision takes (/score, /limit, /price): authenticate, validate, assess
        (with the limit search when asked), answer (plus what `extend` adds, and the limit it
        sets), and log before answering."""
        caller = self._caller(ctx, endpoint)  # first: answers at once while still loading
        from serving.decision_log import new_request_id
        from serving.engine import loan_request

        request = check(model, body)
        eid, product, term = request.enterprise_id, request.product, request.term_months
        amount = request.amount if isinstance(request, m.PriceRequest) else request.requested_amount
        check_term(product, term, self.engine)
        if not limit:  # /limit searches up to the product's maximum whatever was asked
            field = "amount" if isinstance(request, m.PriceRequest) else "requested_amount"
            check_amount(product, amount, self.engine, field)
        a = self._assess(eid, product, amount, term, limit)
        request_id = new_request_id()
        answer = self._score_body(request_id, product, a)
        extra, limit_amount = extend(a) if extend else ({}, None)
        answer.update(extra)
        logged = loan_request(eid, product, amount, term)
        record = self._record(request_id, caller, endpoint, logged, a, answer, limit=limit_amount)
        self._log([record])
        return Answer(**answer)

    # -- endpoints: each takes the whole JSON body and validates it with its model in
    # serving/api_models.py (the schemas of the docs page at /) -------------------------------
    @bentoml.api(route="/score")
    @answers_errors
    def score(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """PD (calibrated), score, grade, approve / refer / decline and up to four reasons."""
        return self._decide(ctx, "score", m.LoanRequest, body)

    @bentoml.api(route="/limit")
    @answers_errors
    def limit(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """The largest amount the policy approves, the constraint that binds it, and the rate."""

        def add_limit(a: dict) -> tuple[dict, float]:
            lim = a["limit"]
            extra = {
                "limit": lim.limit,
                "binding_constraint": lim.binding,
                "constraints": {
                    k: (None if v == float("inf") else v) for k, v in lim.constraints.items()
                },
                "pd_at_limit": lim.pd_at_limit,
                "annual_rate": lim.annual_rate,
                "rate_parts": lim.parts,
            }
            return extra, lim.limit

        return self._decide(ctx, "limit", m.LoanRequest, body, add_limit, limit=True)

    @bentoml.api(route="/price")
    @answers_errors
    def price(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """Expected loss and the risk-based rate / fee / premium, part by part, under the caps."""

        def add_price(a: dict) -> tuple[dict, None]:
            return {"price": a["price"].as_dict()}, None

        return self._decide(ctx, "price", m.PriceRequest, body, add_price)

    @bentoml.api(route="/explain")
    @answers_errors
    def explain(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """Every feature's value and SHAP contribution in log-odds, with the additivity check."""
        self._caller(ctx, "explain")
        from serving.core import DecisionInputError
        from serving.decision_log import new_request_id
        from serving.engine import EnterpriseNotFound

        request = check(m.ExplainRequest, body)
        check_term(request.product, request.term_months, self.engine)
        try:
            with store_faults():
                e = self.engine.explain(
                    request.enterprise_id, request.product, request.requested_amount,
                    request.term_months,
                )  # fmt: skip
        except EnterpriseNotFound as err:
            raise not_found(err) from None
        except DecisionInputError as err:  # the feature store holds a value no model can use
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot explain: {err}") from None
        return Answer(
            **{
                **self._envelope(new_request_id(), request.product, e["model"], e["features"]),
                "base_value": e["base_value"],
                "margin": e["margin"],
                "pd": e["pd"],
                "additivity_error": e["additivity_error"],
                "contributions": e["contributions"],
            }
        )

    @bentoml.api(route="/screen")
    @answers_errors
    def screen(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """Rank up to 1,000 applicants by risk with PD, grade, decision, limit and fee."""
        caller = self._caller(ctx, "screen")
        from serving.decision_log import new_request_id
        from serving.engine import loan_request

        request = check(m.ScreenRequest, body)
        product = request.product
        results, errors, records = [], [], []
        valid: list[tuple[int, str, float, int]] = []
        for i, row in enumerate(request.applicants):
            where = f"applicants[{i}]"
            try:
                applicant = check(m.Applicant, row, prefix=where)
                check_term(product, applicant.term_months, self.engine, f"{where}.term_months")
                check_amount(product, applicant.requested_amount, self.engine,
                             f"{where}.requested_amount")  # fmt: skip
                valid.append((i, applicant.enterprise_id, applicant.requested_amount,
                              applicant.term_months))  # fmt: skip
            except ApiError as e:
                eid_given = row.get("enterprise_id") if isinstance(row, dict) else None
                errors.append({"index": i, "enterprise_id": eid_given, **e.body()})
        with store_faults():
            assessed = self.engine.assess_many(product, [v[1:] for v in valid], limit=True)
        for (i, eid, amount, term), a in zip(valid, assessed, strict=True):
            if isinstance(a, Exception):
                code = "enterprise_not_found" if "enterprise_not_found" in str(a) else None
                error = ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, str(a), code=code)
                errors.append({"index": i, "enterprise_id": eid, **error.body()})
                continue
            lim = a["limit"]
            request_id = new_request_id()
            answer = {
                **self._score_body(request_id, product, a),
                "enterprise_id": eid,
                "requested_amount": amount,
                "limit": lim.limit,
                "binding_constraint": lim.binding,
                "price": a["price"].as_dict(),
            }
            logged = loan_request(eid, product, amount, term)
            records.append(
                self._record(request_id, caller, "screen", logged, a, answer, limit=lim.limit)
            )
            results.append(answer)
        errors.sort(key=lambda e: e["index"])
        if records:
            self._log(records)
        results.sort(key=lambda r: (-r["pd"], r["enterprise_id"]))
        return Answer(product=product, ranked=results, errors=errors, count=len(results))

    @bentoml.api(route="/decision")
    @answers_errors
    def decision(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """A logged decision, for reviewers."""
        self._caller(ctx, "log")
        from serving.decision_log import json_safe

        request_id = check(m.DecisionRequest, body).request_id
        with log_faults("cannot read it"):
            record = self.log.get(request_id)
        if record is None:
            raise ApiError(
                HTTPStatus.NOT_FOUND,
                f"request_id: no decision {request_id!r} in the log",
                code="decision_not_found",
                field="request_id",
            )
        return Answer(**json_safe(dataclasses.asdict(record)))

    @bentoml.api(route="/whatif")
    @answers_errors
    def whatif(self, body: Any, /, ctx: bentoml.Context) -> Answer:
        """What would get this approved (serving/whatif.py): the decision at other amounts and
        terms, and the smallest change the enterprise can make. Read only: an estimate, nothing
        is decided and nothing is written to the decision log."""
        self._caller(ctx, "whatif")
        from serving.core import DecisionInputError
        from serving.engine import EnterpriseNotFound
        from serving.whatif import WhatIfInputError, what_if

        request = check(m.WhatIfRequest, body)
        grid = request.grid or m.WhatIfGrid()
        try:
            with store_faults():
                found = what_if(
                    self.engine, request.enterprise_id, request.product, request.amount,
                    request.term_months, grid.amounts, grid.terms,
                )  # fmt: skip
        except WhatIfInputError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(e), field=e.field) from None
        except EnterpriseNotFound as e:
            raise not_found(e) from None
        except DecisionInputError as e:  # the feature store holds a value no policy can use
            raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, f"cannot decide: {e}") from None
        return Answer(**found.as_dict())


@contextlib.contextmanager
def store_faults() -> Iterator[None]:
    """The online feature store failing (Redis down): a 503 that names the store, not a 500."""
    from features.online import OnlineStoreUnavailable

    try:
        yield
    except OnlineStoreUnavailable as e:
        raise ApiError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"{str(e).rstrip('.')}; nothing decided",
            code="feature_store_unavailable",
        ) from None


@contextlib.contextmanager
def log_faults(consequence: str) -> Iterator[None]:
    """The decision log failing (its database down, full, or refusing the record): a 503 that
    names the log's store, not a 500; a decision that is not logged is not answered."""
    from serving.decision_log import DecisionLogError

    try:
        yield
    except DecisionLogError as e:
        raise ApiError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"decision log unavailable, {consequence}: {e}",
            code="decision_log_unavailable",
        ) from None


# the known reasons a worker cannot load (no champion, a tracking store or decision log that
# cannot be read, a bad setting): one line each; anything else keeps its traceback
_START_ERRORS = {"ValueError", "FileNotFoundError", "DecisionLogError", "OnlineStoreUnavailable",
                 "OnlineStoreConfigError", "MlflowException"}  # fmt: skip
START_FAILURE = "KAPOK_START_FAILURE"  # set by `kapok serve`: the file it watches


def cannot_start(error: BaseException) -> NoReturn:
    """A worker that cannot load its models and stores ends (BentoML then starts it again), so
    no worker ever serves with a product missing. Under `kapok serve` the reason goes to the
    file it watches, and it stops the server with that one line."""
    known = any(c.__name__ in _START_ERRORS for c in type(error).__mro__)
    if not known:
        traceback.print_exc()
    reason = " ".join(str(error).split()) or type(error).__name__
    report = os.environ.get(START_FAILURE)
    if report:
        with contextlib.suppress(OSError):
            partial = f"{report}.{os.getpid()}.tmp"
            with open(partial, "w") as f:
                f.write(reason + "\n")
            os.replace(partial, report)
    else:
        print(f"kapok: the API cannot start: {reason}", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def not_found(e: Exception) -> ApiError:
    return ApiError(
        HTTPStatus.NOT_FOUND,
        "enterprise_id: " + str(e).removeprefix("enterprise_not_found: "),
        code="enterprise_not_found",
        field="enterprise_id",
    )


# One error shape (outermost: it also shapes and logs the gate's answers); the key, the role and
# the content type checked before BentoML reads a body; Kapok's docs page at / (BentoML's own
# page loads external scripts). The first added is the outermost.
Kapok.add_asgi_middleware(ErrorShapeMiddleware)
Kapok.add_asgi_middleware(RequestGate, permissions={e.route: e.permission for e in ENDPOINTS})
Kapok.add_asgi_middleware(DocsMiddleware)
