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

from cynchrod.core import codes
from cynchrod.core.errors import ApiError as ApiError
from cynchrod.core.errors import BodyTimeout, CynchrodError
from cynchrod.desired import yamlio
from cynchrod.shell import control

access_log = logging.getLogger("cynchrod.access")
sock = Sock()
#: Request bodies: at most 1 MiB, chunked or not.
MAX_BODY = 1024 * 1024
#: Nesting of JSON bodies (as for YAML: a manifest needs about 5 levels).
MAX_DEPTH = yamlio.MAX_DEPTH
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

#: HTTP status for each error code the API can answer (``cynchrod.core.codes``' table).
STATUS = codes.status_map()


#: What an open dashboard page asks for by itself, every 2 s: its statuses, and the rows when a new app
#: shows up. Answered, they are logged at debug level; every other request (and a failed poll) at info.
POLLED = ("/ui/apps.json",)


def _polled(response: Response) -> bool:
    return request.method == "GET" and response.status_code < 400 and (
        request.path in POLLED or (request.path == "/" and request.args.get("partial") == "rows"))


#: Seconds a client has to send a request's body.
BODY_TIMEOUT_S = 30.0


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
    with Timeout(seconds, BodyTimeout(f"the request body did not arrive within {seconds:.0f}s")):
        yield


def read_body() -> bytes:
    """The whole body, or ``413 body_too_large`` when it is over ``MAX_BODY`` — also when it is
    chunked (no Content-Length): werkzeug's stream is bounded at ``MAX_CONTENT_LENGTH`` and
    raises 413 past it, so such a body is never cut at the limit and then parsed.

    Read once per request (before the view, under the body deadline) and cached by werkzeug,
    so forms parse from the same bytes."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError("body_too_large", f"the body is over {MAX_BODY} bytes")
    body = request.get_data(cache=True)
    if len(body) > MAX_BODY:
        raise ApiError("body_too_large", f"the body is over {MAX_BODY} bytes")
    return body


def is_ascii_number(text: str) -> bool:
    """Only 0-9: ``str.isdigit`` also accepts "²" and other scripts' digits, which ``int`` then refuses."""
    return 0 < len(text) <= 6 and text.isascii() and text.isdigit()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not yamlio.is_finite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _depth(value: Any, depth: int = 0) -> int:
    if depth > MAX_DEPTH:
        return depth
    if isinstance(value, dict):
        return max((_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


def parse_body(raw: bytes, mimetype: str) -> Any:
    """A JSON or YAML body as plain data, or ``400 invalid_body``.

    JSON: strict (no ``NaN``/``Infinity``, no number that overflows to infinity),
    YAML: through ``yamlio`` (no aliases, bounded size and depth); both nested at
    most ``MAX_DEPTH`` levels.
    """
    if mimetype.lower() in YAML_TYPES:
        try:
            return yamlio.load(raw)
        except yamlio.YamlError as exc:
            raise ApiError("invalid_body", f"the body is not valid YAML: line {exc.line}: {exc.code}: "
                                           f"{exc.message}") from exc
    try:
        data = json.loads(raw or b"null", parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise ApiError("invalid_body", f"the body is not valid JSON: nested more than {MAX_DEPTH} levels") from exc
    except ValueError as exc:
        raise ApiError("invalid_body", f"the body is not valid JSON: {str(exc).splitlines()[0][:200]}") from exc
    if _depth(data) > MAX_DEPTH:
        raise ApiError("invalid_body", f"the body is not valid JSON: nested more than {MAX_DEPTH} levels")
    return data


def error_response(code: str, message: str, status: int | None = None, **extra: Any) -> tuple[Response, int]:
    return jsonify({"error": code, "message": message, **extra}), status or STATUS.get(code, 500)


def status_of(exc: CynchrodError) -> int:
    """A code the table does not name is still not a 500: temporary errors are 503, permanent ones 409."""
    return STATUS.get(exc.code) or (409 if exc.permanent else 503)


def create_app(daemon: Any, *, failures: Any = None) -> Flask:
    """The Flask app for ``daemon`` (a ``cynchrod.shell.front.Front``). ``failures``: the
    authentication back-off's table (``throttle.Table``) the API workers share; by default one
    of this process's own."""
    from cynchrod.api import apps, dashboard, logs, meta, notifications, passes, secrets, throttle, webhooks

    app = Flask("cynchrod")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY + 1  # read_body tells "over" from "exactly 1 MiB"
    app.extensions["cynchrod"] = daemon
    app.extensions["cynchrod.failures"] = failures if failures is not None \
        else throttle.Table(free=daemon.settings.auth_failures)
    app.register_blueprint(apps.bp)
    app.register_blueprint(logs.bp)
    app.register_blueprint(meta.bp)
    app.register_blueprint(notifications.bp)
    app.register_blueprint(passes.bp)
    app.register_blueprint(secrets.bp)
    app.register_blueprint(webhooks.bp)
    dashboard.init_app(app, daemon.settings.state)
    sock.init_app(app)

    @app.errorhandler(CynchrodError)
    def _cynchrod_error(exc: CynchrodError) -> tuple[Response, int]:
        extra = getattr(exc, "extra", {})
        if isinstance(exc, control.InvalidManifest):
            extra = {"errors": exc.errors}
        response, status = error_response(exc.code, exc.message, status_of(exc), **extra)
        if "retry_after" in extra:
            response.headers["Retry-After"] = str(extra["retry_after"])
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "invalid_body"}
        code = codes.get(exc.code or 500, "http_error")
        response, status = error_response(code, exc.description or code, exc.code)
        valid = getattr(exc, "valid_methods", None)
        if valid:  # RFC 9110: a 405 says what is allowed
            response.headers["Allow"] = ", ".join(sorted(valid))
        return response, status

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
                read_body()

    @app.after_request
    def _log(response: Response) -> Response:
        daemon.metrics.requests.labels(request.method, str(response.status_code)).inc()
        level = logging.DEBUG if _polled(response) else logging.INFO
        if not access_log.isEnabledFor(level):
            return response
        # The path only: query strings can carry ?token= or ?ticket=.
        access_log.log(level, json.dumps({
            "method": request.method, "path": request.path, "status": response.status_code,
            "ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
            "token": getattr(g, "token_name", None), "remote": request.remote_addr}))
        return response

    return app
