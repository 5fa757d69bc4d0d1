"""The HTTP API (the only package that imports flask and flask_sock).

``create_app(daemon)`` builds the Flask app over an API worker's ``Front``: the
``apps`` blueprint (REST and imperative calls), ``logs`` (tail, tickets and
the WebSocket stream), ``meta`` (health, metrics, OpenAPI) and ``dashboard``
(the pages at ``/`` and ``/ui/``, signed in with a session cookie). Views read the
store and commit through ``control``; they never wait on Docker for longer
than the client timeout of one bounded call.

Errors are JSON ``{"error": code, "message": text}`` with the codes in the
README; no token, ticket or secret ever appears in a response or a log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, jsonify, request
from flask_sock import Sock
from werkzeug.exceptions import HTTPException

from cynchrod import control
from cynchrod.errors import CynchrodError

access_log = logging.getLogger("cynchrod.access")
sock = Sock()

#: HTTP status for each error code the API can answer.
STATUS = {
    "unauthorized": 401, "not_found": 404, "forbidden": 403, "quota_exceeded": 403,
    "invalid_tail": 400, "invalid_body": 400, "invalid_manifest": 400, "invalid_secret": 400,
    "app_exists": 409, "app_removed": 409, "not_in_repo": 409, "conflict": 409, "no_previous_deployment": 409,
    "app_stopped": 409,
    "too_many_streams": 429, "body_too_large": 413, "body_timeout": 408, "reconciler_unavailable": 503,
    "push_conflict": 503, "push_failed": 502, "source_unavailable": 503, "branch_not_found": 503,
    "docker_unavailable": 503, "runtime_error": 502,
}


#: Seconds a client has to send a request's body.
BODY_TIMEOUT_S = 30.0


class _SlowBody(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Under the gevent workers: the block ends with ``body_timeout`` after ``seconds``."""
    try:
        from gevent import Timeout, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        yield
        return
    if not monkey.is_module_patched("socket"):
        yield
        return
    try:
        with Timeout(seconds, _SlowBody):
            yield
    except _SlowBody:
        raise ApiError("body_timeout", f"the request body did not arrive within {seconds:.0f}s") from None


class ApiError(CynchrodError):
    """An error answered as JSON with ``STATUS[code]``."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, code=code)
        self.extra = extra


def error_response(code: str, message: str, status: int | None = None, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status or STATUS.get(code, 500)


def create_app(daemon: Any) -> Flask:
    """The Flask app for ``daemon`` (a ``cynchrod.daemon.Front``)."""
    from cynchrod.api import apps, dashboard, logs, meta, secrets, webhooks

    app = Flask("cynchrod")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.extensions["cynchrod"] = daemon
    app.register_blueprint(apps.bp)
    app.register_blueprint(logs.bp)
    app.register_blueprint(meta.bp)
    app.register_blueprint(secrets.bp)
    app.register_blueprint(webhooks.bp)
    dashboard.init_app(app, daemon.settings.state)
    sock.init_app(app)

    @app.errorhandler(CynchrodError)
    def _cynchrod_error(exc: CynchrodError) -> tuple[Response, int]:
        extra = getattr(exc, "extra", {})
        if isinstance(exc, control.InvalidManifest):
            extra = {"errors": exc.errors}
        return error_response(exc.code, exc.message, **extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "invalid_body"}
        code = codes.get(exc.code or 500, "http_error")
        return error_response(code, exc.description or code, exc.code)

    @app.errorhandler(Exception)
    def _crash(exc: Exception) -> tuple[Response, int]:
        logging.getLogger("cynchrod.api").exception("unhandled error on %s %s", request.method, request.path)
        return error_response("internal", "internal error", 500)

    @app.before_request
    def _clock() -> None:
        g.started = time.perf_counter()
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and (
                request.content_length or request.headers.get("Transfer-Encoding")):
            # The whole body, read now under a deadline (a slow sender costs its own
            # connection only); views then read it from memory.
            with _deadline(BODY_TIMEOUT_S):
                request.get_data(cache=True)

    @app.after_request
    def _log(response: Response) -> Response:
        daemon.metrics.requests.labels(request.method, str(response.status_code)).inc()
        # The path only: query strings can carry ?token= or ?ticket=.
        access_log.info(json.dumps({
            "method": request.method, "path": request.path, "status": response.status_code,
            "ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            "token": getattr(g, "token_name", None), "remote": request.remote_addr}))
        return response

    return app
