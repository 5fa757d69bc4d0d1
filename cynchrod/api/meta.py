"""``/healthz`` (no auth), ``/metrics`` (Prometheus text) and ``/openapi.json``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify

from cynchrod.api.auth import daemon
from cynchrod.shell import metrics

bp = Blueprint("meta", __name__)


@cache
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(resources.files("cynchrod.api").joinpath("openapi.json").read_text())
    return document


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """The daemon's own problems decide the status (503); after them, each broken manifest file that
    declares no deployed app is listed with its path and line (the desired state's problem: the
    daemon is healthy, so the status stays 200). Without a token, the error's text is not shown:
    ``GET /apps`` gives it to the file's org."""
    d = daemon()
    last = d.store.meta("last_pass") or {}
    problems: list[dict[str, Any]] = list(d.health())
    unhealthy = bool(problems)
    problems += [{"code": p.code, "path": p.path, "line": p.line,
                  "message": f"{p.path}:{p.line}: {p.code} (a manifest that declares no deployed app: "
                             "`cynchrod apps` or GET /apps says why)"} for p in d.store.problems()]
    body = {"status": "unhealthy" if unhealthy else "ok", "problems": problems,
            "last_pass": {k: last.get(k) for k in ("at", "commit", "source_error")}}
    return jsonify(body), 503 if unhealthy else 200


@bp.get("/metrics")
def metrics_text() -> Response:
    return Response(daemon().metrics.render(), content_type=metrics.CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(openapi())
