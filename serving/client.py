"""A small Python client for the Kapok lending API (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class KapokAPIError(RuntimeError):
    """An error answer: its status, and the error's code, message and field (every error of
    the API answers {"error": {"code", "message", "field"}})."""

    def __init__(self, status: int, body: Any):
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        self.status, self.body = status, body
        self.code: str | None = error.get("code")
        self.message: str = error.get("message") or str(body)
        self.field: str | None = error.get("field")
        super().__init__(f"HTTP {status} {self.code or ''}: {self.message}".replace(" :", ":"))


class KapokClient:
    """client = KapokClient("http://127.0.0.1:3000", api_key="kpk_..."); client.score(...)"""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", api_key: str | None = None,
                 timeout: float = 30.0):  # fmt: skip
        self.base_url, self.api_key, self.timeout = base_url.rstrip("/"), api_key, timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.base_url + path, json.dumps(body).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                raise KapokAPIError(e.code, json.loads(text)) from None
            except json.JSONDecodeError:
                raise KapokAPIError(e.code, text) from None

    def score(
        self, enterprise_id: str, product: str, requested_amount: float, term_months: int
    ) -> dict[str, Any]:
        return self._post("/score", {"enterprise_id": enterprise_id, "product": product,
                                     "requested_amount": requested_amount, "term_months": term_months})  # fmt: skip  # noqa: E501

    def limit(
        self, enterprise_id: str, product: str, requested_amount: float, term_months: int
    ) -> dict[str, Any]:
        return self._post("/limit", {"enterprise_id": enterprise_id, "product": product,
                                     "requested_amount": requested_amount, "term_months": term_months})  # fmt: skip  # noqa: E501

    def price(
        self, enterprise_id: str, product: str, amount: float, term_months: int
    ) -> dict[str, Any]:
        return self._post("/price", {"enterprise_id": enterprise_id, "product": product,
                                     "amount": amount, "term_months": term_months})  # fmt: skip

    def explain(
        self,
        enterprise_id: str,
        product: str,
        requested_amount: float = 100_000.0,
        term_months: int = 12,
    ) -> dict[str, Any]:
        return self._post("/explain", {"enterprise_id": enterprise_id, "product": product,
                                       "requested_amount": requested_amount, "term_months": term_months})  # fmt: skip  # noqa: E501

    def screen(self, product: str, applicants: list[dict[str, Any]]) -> dict[str, Any]:
        return self._post("/screen", {"product": product, "applicants": applicants})

    def decision(self, request_id: str) -> dict[str, Any]:
        return self._post("/decision", {"request_id": request_id})
