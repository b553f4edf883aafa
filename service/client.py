"""The Python client of the REST API, for notebooks and scripts; the CLI uses it too.

    from service.client import Client
    client = Client("http://127.0.0.1:8000")            # or ORCHESTRA_API_URL / ORCHESTRA_API_TOKEN
    exp = client.submit("spec.yaml", code="mylab/")     # a dict, a YAML/JSON path or text, or an ExperimentSpec
    exp = client.wait(exp["id"], progress=print)        # until succeeded / failed / cancelled
    client.metric_history(exp["runs"][0]["id"], "train/loss")  # [(step, value), ...] from MLflow

``code`` packs the folder (its ``.gitignore`` applied), uploads it once (it is stored under its
hash) and names it in the spec's ``code.bundle``: the run's Ray job gets it as its working
directory.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


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

    # ---- submitting ------------------------------------------------------------------------

    def upload(self, folder: str | Path) -> str:
        """Pack ``folder`` and upload it; returns the bundle's hash (the same folder, the same hash)."""
        from service.bundles import pack

        data = pack(Path(folder))
        body = self._json(self.http.post("/v1/bundles", content=data, headers={"Content-Type": "application/zip"}))
        return str(body["hash"])

    def submit(self, spec: Any, *, code: str | Path | None = None, idempotency_key: str | None = None,
               yaml: bool | None = None) -> dict[str, Any]:
        """Submit a spec: a dict, an ``ExperimentSpec``, a path to a YAML/JSON file, or the text
        of one (``yaml`` says which; guessed from a path's suffix). With ``code``, the folder is
        uploaded first and named in the spec's ``code.bundle``."""
        text, is_yaml = _spec_text(spec, yaml)
        headers = {"Content-Type": "application/yaml" if is_yaml else "application/json"}
        if code is not None:
            doc = _load(text, is_yaml)
            doc["code"] = {**(doc.get("code") or {}), "bundle": self.upload(code)}
            text, headers["Content-Type"] = json.dumps(doc), "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json(self.http.post("/v1/experiments", content=text.encode(), headers=headers))  # type: ignore[no-any-return]

    # ---- reading ---------------------------------------------------------------------------

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/experiments/{experiment_id}"))  # type: ignore[no-any-return]

    get = experiment

    def experiments(self, limit: int = 50, after: str | None = None, **filters: Any) -> dict[str, Any]:
        """One page (``items``, ``next``), newest first; pass ``next`` as ``after`` for the next.
        ``filters``: ``project``, ``owner``, ``status``, ``tag`` (``"key:value"`` or a list of them),
        ``name`` (a prefix), ``created_after``, ``created_before`` (ISO 8601); None is no filter."""
        params: dict[str, Any] = {"limit": limit, **({"cursor": after} if after else {}),
                                  **{k: v for k, v in filters.items() if v is not None}}
        return self._json(self.http.get("/v1/experiments", params=params))  # type: ignore[no-any-return]

    def resume(self, run_id: str) -> dict[str, Any]:
        """Continue a failed or cancelled run from its last checkpoint (its next attempt)."""
        return self._json(self.http.post(f"/v1/runs/{run_id}/resume"))  # type: ignore[no-any-return]

    def delete(self, experiment_id: str) -> None:
        """Remove a finished experiment and mark its MLflow runs deleted."""
        self._json(self.http.delete(f"/v1/experiments/{experiment_id}"))

    def all_experiments(self, limit: int = 50) -> list[dict[str, Any]]:
        """Up to ``limit`` experiments, newest first, over as many pages as it takes."""
        out: list[dict[str, Any]] = []
        after = None
        while len(out) < limit:
            page = self.experiments(limit=min(500, limit - len(out)), after=after)
            out += page["items"]
            after = page["next"]
            if not after:
                break
        return out

    def run(self, run_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/runs/{run_id}"))  # type: ignore[no-any-return]

    def logs(self, run_id: str, tail: int = 200) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/runs/{run_id}/logs", params={"tail": tail}))  # type: ignore[no-any-return]

    def progress(self, experiment_id: str) -> dict[str, Any]:
        """Each run's status and progress (``step``, ``max_steps``, ``steps_per_s``, ``loss``,
        ``eval_metric``/``eval_value``, ``eta_s``; a sweep's ``trials``), read from MLflow by the
        API; a run's ``progress`` is None, with the ``reason``, while MLflow does not answer."""
        return self._json(self.http.get(f"/v1/experiments/{experiment_id}/progress"))  # type: ignore[no-any-return]

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/experiments/{experiment_id}/cancel"))  # type: ignore[no-any-return]

    def info(self) -> dict[str, Any]:
        return self._json(self.http.get("/v1/info"))  # type: ignore[no-any-return]

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait(self, experiment_id: str, *, timeout: float | None = None, poll_s: float = 1.0,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the experiment is terminal; ``progress`` sees each change of its statuses.
        Raises ``TimeoutError`` after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: tuple[str, ...] = ()
        while True:
            exp = self.experiment(experiment_id)
            now = (exp["status"], *(r["status"] for r in exp["runs"]))
            if progress is not None and now != seen:
                progress(exp)
            seen = now
            if exp["status"] in TERMINAL:
                return exp
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} is still {exp['status']} after {timeout} s")
            time.sleep(poll_s)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of one metric of a run, from the MLflow server the API names."""
        from mlflow.tracking import MlflowClient

        mlflow_run = self.run(run_id)["mlflow_run_id"]
        if not mlflow_run:
            return []
        history = MlflowClient(tracking_uri=self.info()["mlflow_tracking_uri"]).get_metric_history(mlflow_run, key)
        return sorted((int(m.step), float(m.value)) for m in history)

    def report(self, experiment_id: str, *, metrics: list[str] | tuple[str, ...] = (),
               group_by: list[str] | tuple[str, ...] = (), also: list[str] | tuple[str, ...] = (),
               band: str = "std", timeout: float = 600.0) -> str:
        """The comparison report of the experiment (with ``also``'s trials) as one HTML page;
        ``group_by`` names spec paths or blocks. A few hundred trials take seconds, hence the
        longer ``timeout``."""
        params: list[tuple[str, str | int | float | bool | None]] = [
            *(("metric", m) for m in metrics), *(("group_by", p) for p in group_by), *(("also", e) for e in also),
            ("band", band)]
        response = self.http.get(f"/v1/experiments/{experiment_id}/report", params=params, timeout=timeout)
        if response.status_code >= 400:
            self._json(response)  # raises ApiError with the API's message
        return response.text


def _spec_text(spec: Any, yaml: bool | None) -> tuple[str, bool]:
    if isinstance(spec, dict):
        return json.dumps(spec), False
    if hasattr(spec, "model_dump"):  # an ExperimentSpec
        return json.dumps(spec.model_dump(mode="json", exclude_unset=True)), False
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and Path(spec).is_file()):
        path = Path(spec)
        return path.read_text(), path.suffix in (".yaml", ".yml") if yaml is None else yaml
    if isinstance(spec, str):
        return spec, bool(yaml) if yaml is not None else not spec.lstrip().startswith("{")
    raise TypeError(f"spec: a dict, an ExperimentSpec, a path or text, not {type(spec).__name__}")


def _load(text: str, is_yaml: bool) -> dict[str, Any]:
    if is_yaml:
        import yaml

        doc = yaml.safe_load(text)
    else:
        doc = json.loads(text)
    if not isinstance(doc, dict):
        raise TypeError("spec: the document is not a mapping")
    return doc
