"""A small HTTP client for the REST API (what the CLI uses)."""

import os
from typing import Any

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body
        detail = body.get("detail", body) if isinstance(body, dict) else body
        if isinstance(detail, list):
            detail = "; ".join(f"{d.get('field')}: {d.get('message')}" for d in detail if isinstance(d, dict))
        super().__init__(f"HTTP {status}: {detail}")


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("ORCHESTRA_API_URL") or "http://127.0.0.1:8000").rstrip("/")
        token = token or os.environ.get("ORCHESTRA_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _json(self, response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def submit(self, text: str, *, yaml: bool, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/yaml" if yaml else "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json(self.http.post("/v1/experiments", content=text.encode(), headers=headers))  # type: ignore[no-any-return]

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/experiments/{experiment_id}"))  # type: ignore[no-any-return]

    def experiments(self, limit: int = 50, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"cursor": after} if after else {})}
        return self._json(self.http.get("/v1/experiments", params=params))  # type: ignore[no-any-return]

    def run(self, run_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/runs/{run_id}"))  # type: ignore[no-any-return]

    def logs(self, run_id: str, tail: int = 200) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/runs/{run_id}/logs", params={"tail": tail}))  # type: ignore[no-any-return]

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/experiments/{experiment_id}/cancel"))  # type: ignore[no-any-return]

    def info(self) -> dict[str, Any]:
        return self._json(self.http.get("/v1/info"))  # type: ignore[no-any-return]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
