"""``/healthz`` (no auth), ``/metrics`` (Prometheus text) and ``/openapi.json``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from flask import Blueprint, Response, jsonify

from cynchrod import metrics
from cynchrod.api.auth import daemon

bp = Blueprint("meta", __name__)


@cache
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(resources.files("cynchrod").joinpath("openapi.json").read_text())
    return document


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    d = daemon()
    last = d.store.meta("last_pass") or {}
    problems = d.health()
    body = {"status": "unhealthy" if problems else "ok", "problems": problems,
            "last_pass": {k: last.get(k) for k in ("at", "commit", "source_error")}}
    return jsonify(body), 503 if problems else 200


@bp.get("/metrics")
def metrics_text() -> Response:
    return Response(daemon().metrics.render(), content_type=metrics.CONTENT_TYPE)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(openapi())
