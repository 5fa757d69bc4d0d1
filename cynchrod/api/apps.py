"""``/apps``: list, details, create, and the imperative restart/stop/start/delete."""

from __future__ import annotations

import json
import threading
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError, is_ascii_number, parse_body, read_body
from cynchrod.api.auth import bearer, daemon, visible_app
from cynchrod.core import health
from cynchrod.shell import control, liveness

bp = Blueprint("apps", __name__)
DEPLOYMENTS_SHOWN = 20


def app_json(app: store.App, *, engine_up: bool | None = None,
             available: frozenset[str] | None = None) -> dict[str, Any]:
    """An app as the API shows it; ``engine_up`` (read once per answer when not given) makes a
    running app ``unknown`` while the reconciler cannot see the engine; ``available``: the ids of
    apps with an image update available (read when not given)."""
    up = liveness.engine_up(daemon().store) if engine_up is None else engine_up
    if available is None:
        available = updates_available(app.id)
    return {
        "id": app.id, "name": app.name, "org": app.org, "image": app.image, "domain": app.domain,
        "port": app.port, "host_port": app.host_port, "status": store.shown_status(app.status, engine_up=up),
        "container_id": app.container_id,
        "created_at": app.created_at, "updated_at": app.updated_at, "last_error": app.last_error,
        "commit": app.commit, "path": app.path,
        "services": json.loads(app.services_json) if app.services_json else [],
        "serving": serving(app),
        # Argo CD's words for the status (docs/health.md): progressing, healthy, degraded, unknown.
        "health": health.app_health(store.shown_status(app.status, engine_up=up)),
        "update_available": app.id in available,
    }


def updates_available(app_id: str | None = None) -> frozenset[str]:
    """Ids of apps with a service whose image update is available (``commit: false``): one query."""
    return frozenset(s.app_id for s in daemon().store.update_states(app_id) if s.reason == "available")


def serving(app: store.App) -> str | None:
    """``previous`` when the app is failed and an earlier version of it keeps serving, else None."""
    return app.serving if app.status == store.FAILED else None


def problem_json(p: store.Problem) -> dict[str, Any]:
    return {"path": p.path, "line": p.line, "code": p.code, "message": p.message, "org": p.org}


def deployment_json(d: store.Deployment) -> dict[str, Any]:
    return {"id": d.id, "app_id": d.app_id, "commit": d.commit, "trigger": d.trigger, "status": d.status,
            "error_code": d.error_code, "error": d.error, "started_at": d.started_at,
            "finished_at": d.finished_at, "attempts": d.attempts, "last_seen": d.last_seen}


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
#: SQLite's integers: a larger id cannot exist (and would overflow the query).
MAX_ID = 2**63 - 1
_list_cache: dict[tuple[int, str | None, bool], tuple[tuple[int, int], bytes]] = {}
_list_lock = threading.Lock()


@bp.get("/apps")
def list_apps() -> Response:
    """The token's apps, and beside them the ``problems``: errors of manifest files that declare
    no deployed app (shown to the file's org and to admin tokens: see ``store.Problem``)."""
    token = bearer()
    flag = request.args.get("include_removed", "false").lower()
    if flag not in _BOOLEANS:
        raise ApiError("invalid_query", "include_removed must be true or false (or 1 or 0)")
    include_removed = _BOOLEANS[flag]
    org = None if token.admin else token.org
    db = daemon().store
    # The body is rebuilt only when the store has changed since (a write by any process:
    # the reconciler, or an imperative call in any API worker).
    key = (id(db), org, include_removed)
    version = db.generation()
    cached = _list_cache.get(key)
    if cached is None or cached[0] != version:
        apps = db.apps(org=org, include_removed=include_removed)
        up = liveness.engine_up(db)
        available = updates_available()
        body = json.dumps({"apps": [app_json(a, engine_up=up, available=available) for a in apps],
                           "problems": [problem_json(p) for p in db.problems(org=org)]},
                          separators=(",", ":")).encode()
        with _list_lock:
            _list_cache[key] = cached = (version, body)
    return Response(cached[1], mimetype="application/json")


def webhook_json(app: store.App) -> dict[str, Any] | None:
    """For repo apps: the webhook URL (never its secret) and whether a secret is set."""
    spec = app.spec
    if spec is None or not any(s.build for s in spec.services):
        return None
    return {"url": f"{request.host_url.rstrip('/')}/webhooks/apps/{app.id}",
            "configured": daemon().store.app_webhook(app.id) is not None}


@bp.get("/apps/<app_id>")
def get_app(app_id: str) -> Response:
    return _details(visible_app(bearer(), app_id))


@bp.get("/apps/by-name/<org>/<name>")
def get_app_by_name(org: str, name: str) -> Response:
    """The same answer as ``GET /apps/<appId>`` for ``org/name``: the live app, else the newest removed one."""
    token = bearer()
    db = daemon().store
    app = db.live_app(org, name) if token.sees(org) else None
    if app is None and token.sees(org):
        app = next((a for a in reversed(db.apps(org=org)) if a.name == name), None)
    if app is None:
        raise ApiError("not_found", f"no app {org}/{name}")
    return _details(app)


def _details(app: store.App) -> Response:
    deployments = daemon().store.deployments(app.id, limit=DEPLOYMENTS_SHOWN)
    return jsonify({"app": app_json(app), "webhook": webhook_json(app),
                    "updates": [s.to_json() for s in daemon().store.update_states(app.id)],
                    "deployments": [deployment_json(d) for d in deployments]})


@bp.post("/apps/<app_id>/webhook")
def new_webhook(app_id: str) -> tuple[Response, int]:
    """Make (or replace) a repo app's webhook secret; it is shown in this answer only."""
    app = visible_app(bearer(), app_id)
    hook = webhook_json(app)
    if hook is None:
        raise ApiError("not_a_repo_app", f"app {app_id} is not built from a source repository, so it has no "
                                         "webhook: only apps with build.repo do")
    secret = daemon().secrets.new_app_webhook(app.id)
    return jsonify({"url": hook["url"], "secret": secret}), 201


@bp.get("/apps/<app_id>/deployments/<int:deployment_id>/log")
def deployment_log(app_id: str, deployment_id: int) -> Response:
    """The build output of a deployment and its failed unit's last lines (the last ``tail`` lines, bounded)."""
    app = visible_app(bearer(), app_id)
    found = daemon().store.deployment(deployment_id) if deployment_id <= MAX_ID else None
    if found is None or found.app_id != app.id:
        raise ApiError("not_found", f"no deployment {deployment_id} of app {app_id}")
    raw = request.args.get("tail", "500")
    if not is_ascii_number(raw) or not 1 <= int(raw) <= 5000:
        raise ApiError("invalid_tail", "tail must be an integer from 1 to 5000")
    # The unit lines kept when the deployment failed its readiness (``shell.gates``): the container may be gone.
    unit_lines = found.log.splitlines()[-int(raw):] if found.log else []
    return jsonify({"deployment_id": deployment_id, "lines": build_log(deployment_id, int(raw)) or [],
                    "unit_lines": unit_lines})


def build_log(deployment_id: int, tail: int) -> list[str] | None:
    """The last ``tail`` lines of a deployment's build output; None when it built nothing."""
    path = daemon().build_log_path(deployment_id)
    if not path.exists():
        return None
    with open(path, "rb") as log_file:
        log_file.seek(max(0, path.stat().st_size - 512 * 1024))  # never an unbounded read
        return log_file.read().decode("utf-8", "replace").splitlines()[-tail:]


def _accepted(result: control.Accepted, **extra: Any) -> tuple[Response, int]:
    db = daemon().store
    app = app_json(db.app(result.app.id) or result.app)
    if result.deployment_id is not None:
        # The state the call leads to, not the one from before it: the queued deployment's
        # (until the reconciler finishes it; then the row has the outcome).
        deployment = db.deployment(result.deployment_id)
        if deployment is not None and deployment.status in (store.QUEUED, store.DEPLOYING):
            app["status"] = deployment.status
    body = {"app": app, "action": result.action, "commit": result.commit, "deployment_id": result.deployment_id,
            "changed": result.commit is not None, **extra}
    return jsonify(body), 202 if result.commit is not None else 200


@bp.post("/apps/<app_id>/restart")
def restart(app_id: str) -> tuple[Response, int]:
    token = bearer()
    return _accepted(daemon().control.restart(visible_app(token, app_id), actor=token.name))


@bp.post("/apps/<app_id>/stop")
def stop(app_id: str) -> tuple[Response, int]:
    token = bearer()
    return _accepted(daemon().control.stop(visible_app(token, app_id), actor=token.name))


@bp.post("/apps/<app_id>/start")
def start(app_id: str) -> tuple[Response, int]:
    token = bearer()
    return _accepted(daemon().control.start(visible_app(token, app_id), actor=token.name))


@bp.delete("/apps/<app_id>")
def delete(app_id: str) -> tuple[Response, int]:
    token = bearer()
    return _accepted(daemon().control.delete(visible_app(token, app_id), actor=token.name))


@bp.post("/apps/<app_id>/rollback")
def rollback(app_id: str) -> tuple[Response, int]:
    token = bearer()
    # The body first: a request that is wrong in itself is a 400 whatever the app's state.
    raw = read_body()
    body = parse_body(raw, request.mimetype or "") if raw.strip() else {}
    if not isinstance(body, dict):
        raise ApiError("invalid_body", 'the body must be a JSON object: {"deployment_id": N}')
    target = body.get("deployment_id")
    if isinstance(target, float) and target.is_integer():
        target = int(target)  # JSON Schema's integer: 9089.0 is one, as the document admits it
    if "deployment_id" in body and (not isinstance(target, int) or isinstance(target, bool)
                                    or not 0 < target <= MAX_ID):
        raise ApiError("invalid_body", "deployment_id must be an integer")
    app = visible_app(token, app_id)
    return _accepted(daemon().control.rollback(app, actor=token.name, deployment_id=target))


@bp.post("/apps")
def create() -> tuple[Response, int]:
    token = bearer()
    raw = read_body()
    data = parse_body(raw, request.mimetype or "")
    accepted = daemon().control.create(data, token=token, body=raw)
    hook = webhook_json(accepted.app)
    if hook is not None:
        # A repo app's webhook secret is shown here, once, and never again.
        hook = {"url": hook["url"], "secret": daemon().secrets.new_app_webhook(accepted.app.id)}
        return _accepted(accepted, webhook=hook)
    return _accepted(accepted)
