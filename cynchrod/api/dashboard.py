"""The dashboard: server-rendered pages over the store, a stylesheet and one small script.

Pages: sign-in (an API token becomes a signed session cookie), the apps list
(the landing page, at ``/``), one app, its build logs and its live logs. The
pages read the store and the ``Daemon``'s read-only views (``app_units``,
``preview``, ``manifest``, ``log_tail``); the buttons call the same
``control`` functions as the REST API, so every action is a commit. Nothing
here runs inside a reconciler pass: the list polls ``/ui/apps.json``, which
is the store (cached per store version), every 2 s.

Security decisions:

* The session cookie (Flask's signed session; key ``state/dashboard.key``,
  0600, made once) holds the token's id, never the token. It is HttpOnly,
  SameSite=Strict, Secure when the request came over TLS, and expires 12 h
  after sign-in. The token is looked up on every request, so a revoked
  token's session ends at its next request (and its log streams within a
  second, as for the API).
* Every state-changing dashboard request carries the session's CSRF token
  (form field ``csrf_token`` or header ``X-CSRF-Token``, compared in constant
  time) and, when the browser sends one, an ``Origin`` of this host; else
  ``403 csrf_failed``. The bearer-token API does not read the cookie, so it
  needs neither.
* The log stream is opened with a single-use ticket issued to the session
  (the WebSocket itself never sees the cookie).
* Jinja escapes every value; the script sets ``textContent`` only; a
  Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import hmac
import json
import os
import pathlib
import secrets
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from flask import (
    Blueprint,
    Flask,
    Request,
    Response,
    flash,
    g,
    get_flashed_messages,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.wrappers import Response as BaseResponse

from cynchrod import edge, store
from cynchrod.api import error_response
from cynchrod.api.apps import DEPLOYMENTS_SHOWN, build_log, serving, webhook_json
from cynchrod.api.auth import daemon, failed, refused_for
from cynchrod.core import health
from cynchrod.core.errors import CynchrodError
from cynchrod.shell import control, liveness
from cynchrod.shell.front import TICKET_TTL_S

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/ui/static")

KEY_FILE = "dashboard.key"
SESSION_HOURS = 12
POLL_MS = 2000
LOG_TAIL = 200
ACTIONS = ("restart", "stop", "start", "delete")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

F = TypeVar("F", bound=Callable[..., Any])


# -- set-up -----------------------------------------------------------------------


class _Sessions(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure when the request itself came over TLS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        # No cookie (every API call): an empty session, without building a signing serializer.
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


def secret_key(state_dir: pathlib.Path) -> bytes:
    """The key that signs session cookies: made once under the state dir, mode 0600."""
    path = state_dir / KEY_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole under another name, then linked into place: every API worker
        # process starting at once reads the same complete key.
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".dashboard-key-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32).hex().encode())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise CynchrodError(f"{path} is too short to sign sessions; remove it to make a new one", code="usage")
    return key


def when(stamp: str | None) -> str:
    """``2026-11-29T16:50:17Z`` as ``2026-11-29 16:50:17`` (the store's times are UTC)."""
    return (stamp or "").replace("T", " ").removesuffix("Z")


def domain_url(domain: str) -> str:
    """A domain's link: through the edge, on its public port (``edge.link``); with no edge the
    domain is informational and the link is the bare name."""
    cfg = daemon().settings
    if not cfg.edge:
        return f"http://{domain}/"
    return edge.link(domain, listen=cfg.edge_listen, tls_listen=cfg.edge_tls_listen)


def init_app(app: Flask, state_dir: pathlib.Path) -> None:
    app.jinja_env.filters["when"] = when
    app.jinja_env.filters["domain_url"] = domain_url
    app.secret_key = secret_key(state_dir)
    app.session_interface = _Sessions()
    app.config.update(SESSION_COOKIE_NAME="cynchrod_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_REFRESH_EACH_REQUEST=False,
                      PERMANENT_SESSION_LIFETIME=datetime.timedelta(hours=SESSION_HOURS))
    app.register_blueprint(bp)


# -- sessions, CSRF ------------------------------------------------------------------


def _csrf() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        session["csrf"] = token = secrets.token_urlsafe(32)
    return token


def _same_origin() -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent by every browser on a same-origin form post; the CSRF token still is
    return origin.rstrip("/") == request.host_url.rstrip("/")


@bp.before_request
def _guard() -> BaseResponse | tuple[Response, int] | None:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()) \
            or not _same_origin():
        if _wants_json():
            return error_response("csrf_failed", "missing or wrong CSRF token; reload the page", 403)
        return Response(render_template("message.html", title="Form expired",
                                        message="This form is missing its security token or has expired. "
                                                "Go back, reload the page and try again."), 403)
    return None


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")  # frame-ancestors for browsers without CSP 2
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    if (started := g.get("render_started")) is not None:
        response.headers["Server-Timing"] = f"render;dur={(time.perf_counter() - started) * 1000:.2f}"
    return response


def _wants_json() -> bool:
    return request.path.endswith(".json") or request.headers.get("Accept", "").startswith("application/json") \
        or "X-CSRF-Token" in request.headers


def _session_token() -> store.Token | None:
    """The live token of this session. The cookie holds only the session's id: the session itself
    is a row of the store, so a sign-out, a revoked token or the expiry ends every copy of the cookie."""
    sid = session.get("sid")
    if not isinstance(sid, str):
        return None
    token = daemon().store.session_token(sid)
    if token is None or token.revoked_at is not None:
        session.pop("sid", None)
        flash("Your session ended: its token was revoked." if token else "Your session ended.", "error")
        return None
    g.token_name = token.name
    g.session_id = sid
    return token


def signed_in(view: F) -> F:
    """Pages need a live session; JSON endpoints answer 401 so the script can send the person to sign in."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        g.render_started = time.perf_counter()
        token = _session_token()
        if token is None:
            if _wants_json():
                return error_response("unauthorized", "signed out", 401)
            return redirect(url_for("dashboard.signin"))
        g.token = token
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _page(template: str, **context: Any) -> str:
    token: store.Token | None = g.get("token")
    return render_template(template, token=token, csrf_token=_csrf(), notices=get_flashed_messages(True),
                           **context)


def _visible(app_id: str) -> store.App | None:
    app = daemon().store.app(app_id)
    return app if app is not None and g.token.sees(app.org) else None


def _not_found(app_id: str) -> tuple[str, int]:
    return _page("message.html", title="Not found", message=f"There is no app {app_id} that you can see."), 404


# -- sign in, sign out ---------------------------------------------------------------


@bp.get("/signin")
def signin() -> str | BaseResponse:
    if _session_token() is not None:
        return redirect(url_for("dashboard.apps"))
    return _page("signin.html")


@bp.post("/signin")
def signin_post() -> str | BaseResponse | tuple[str, int]:
    """A token becomes a session; a wrong or revoked one counts against this client (``throttle``)."""
    secret = request.form.get("token", "").strip()
    if not secret:
        reason = "Paste an API token to sign in."
    elif (wait := refused_for()) is not None:
        page = _page("signin.html", error=f"Too many failed sign-ins from this address: try again in {wait} s.")
        return Response(page, 429, {"Retry-After": str(wait)})
    else:
        token = daemon().store.find_token(secret)
        if token is None:
            failed()
            reason = ("That token is not valid: check that you pasted all of it. "
                      "Tokens are made with `cynchrod token create`.")
        elif token.revoked_at is not None:
            failed()
            reason = f"That token was revoked on {token.revoked_at}. Ask for a new one."
        else:
            session.clear()
            session.permanent = True
            session["sid"] = daemon().store.open_session(token.id, ttl_s=SESSION_HOURS * 3600)
            session["csrf"] = secrets.token_urlsafe(32)
            return redirect(url_for("dashboard.apps"))
    return _page("signin.html", error=reason), 401


@bp.post("/signout")
def signout() -> BaseResponse:
    if isinstance(sid := session.get("sid"), str):
        daemon().store.end_session(sid)
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("dashboard.signin"))


# -- the apps list -------------------------------------------------------------------


def _status(app: store.App, last: store.Deployment | None, *, engine_up: bool | None = None) -> str:
    """The app's status word; an action accepted but not yet taken up by a pass shows ``queued``,
    and a running app ``unknown`` while the reconciler cannot see the engine."""
    if last is not None and last.status == store.QUEUED and app.status not in (store.REMOVED, store.DEPLOYING):
        return store.QUEUED
    up = liveness.engine_up(daemon().store) if engine_up is None else engine_up
    return store.shown_status(app.status, engine_up=up)


def _host() -> str:
    host = urllib.parse.urlsplit(request.host_url).hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _row(app: store.App, last: store.Deployment | None, host: str, *, engine_up: bool) -> dict[str, Any]:
    return {
        "id": app.id, "name": app.name, "org": app.org, "image": app.image,
        "status": _status(app, last, engine_up=engine_up),
        "domain": app.domain, "service_domains": app.service_domains, "host_port": app.host_port,
        "url": f"http://{host}:{app.host_port}/" if app.host_port else None,
        "last_error": app.last_error, "serving": serving(app),
        "health": health.app_health(_status(app, last, engine_up=engine_up)),
        "deployment": None if last is None else {
            "id": last.id, "at": last.started_at, "trigger": last.trigger, "status": last.status,
            "commit": (last.commit or "")[:12]},
    }


@dataclasses.dataclass(frozen=True)
class _Listing:
    rows: list[dict[str, Any]]
    removed: int
    orgs: list[str]
    #: Broken files that declare no deployed app, as (path, their errors' texts).
    problems: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    #: What the daemon cannot see now (``liveness.down``): the engine, the edge, with why and since when.
    down: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: Notifications and commit statuses given up on (``GET /notifications?status=dead``).
    dead: int = 0


_listings: dict[tuple[int, str | None, str], tuple[tuple[int, int], _Listing]] = {}
_listings_lock = threading.Lock()


def _listing(token: store.Token, org: str | None, host: str) -> _Listing:
    """Every row the token may see (of ``org`` for an admin that picked one), cached per store version."""
    db = daemon().store
    scope = org if token.admin else token.org
    key = (id(db), scope, host)
    version = db.generation()
    cached = _listings.get(key)
    if cached is None or cached[0] != version:
        apps = db.apps(org=scope, include_removed=True)
        last = db.last_deployments(org=scope)
        orgs = sorted({a.org for a in db.apps(include_removed=True)}) if token.admin else [token.org]
        problems: dict[str, list[str]] = {}
        for p in db.problems(org=scope):
            problems.setdefault(p.path, []).append(str(p))
        down = liveness.down(db)
        listing = _Listing(rows=[_row(a, last.get(a.id), host, engine_up=liveness.ENGINE_META not in down)
                                 for a in apps],
                           removed=sum(a.status == store.REMOVED for a in apps), orgs=orgs,
                           problems=list(problems.items()), down=down, dead=db.dead_notifications(org=scope))
        with _listings_lock:
            _listings[key] = cached = (version, listing)
    return cached[1]


def _filters() -> tuple[str | None, bool, str]:
    org = request.args.get("org") or None
    removed = request.args.get("removed", "") in ("1", "true", "yes")
    return org, removed, request.args.get("q", "").strip()


def _matches(row: dict[str, Any], q: str) -> bool:
    return not q or any(q.lower() in (row[k] or "").lower() for k in ("name", "org", "image"))


@bp.get("/")
@signed_in
def apps() -> str:
    org, removed, q = _filters()
    listing = _listing(g.token, org, _host())
    rows = [r for r in listing.rows if (removed or r["status"] != store.REMOVED) and _matches(r, q)]
    if request.args.get("partial") == "rows":
        return render_template("_rows.html", rows=rows, csrf_token=_csrf())
    return _page("apps.html", rows=rows, org=org, show_removed=removed, q=q, removed_count=listing.removed,
                 orgs=listing.orgs, poll_ms=POLL_MS, problems=listing.problems, down=listing.down,
                 dead=listing.dead)


@bp.get("/ui/apps.json")
@signed_in
def apps_json() -> Response:
    org, removed, _ = _filters()
    listing = _listing(g.token, org, _host())
    rows = [r for r in listing.rows if removed or r["status"] != store.REMOVED]
    return Response(json.dumps({"apps": rows}, separators=(",", ":")), mimetype="application/json")


# -- actions ---------------------------------------------------------------------------


@bp.post("/ui/apps/<app_id>/<action>")
@signed_in
def act(app_id: str, action: str) -> Any:
    app = _visible(app_id)
    if app is None or action not in ACTIONS:
        return error_response("not_found", f"no app {app_id}") if _wants_json() else _not_found(app_id)
    if action == "delete" and request.form.get("confirm") != app.name and request.headers.get(
            "X-Confirm") != app.name:
        return _page("confirm_delete.html", app=app)
    ctl: control.Control = daemon().control
    try:
        done = getattr(ctl, action)(app, actor=g.token.name)
    except CynchrodError as exc:
        if _wants_json():
            return error_response(exc.code, exc.message)
        flash(f"{action.capitalize()} {app.name} failed: {exc.code}: {exc.message}", "error")
        return redirect(request.referrer or url_for("dashboard.apps"))
    changed = done.commit is not None
    if _wants_json():
        return Response(json.dumps({"app_id": app.id, "action": action, "changed": changed,
                                    "commit": done.commit, "deployment_id": done.deployment_id,
                                    "status": store.QUEUED if changed else app.status}),
                        status=202 if changed else 200, mimetype="application/json")
    flash(f"{action.capitalize()} {app.name}: " + (f"committed {done.commit[:12]}, queued."
                                                   if done.commit else "nothing to change."), "info")
    return redirect(url_for("dashboard.apps"))


# -- one app ---------------------------------------------------------------------------


def _diff(changes: list[Any]) -> str:
    out: list[str] = []
    for change in changes:
        old = json.dumps(json.loads(change.running), indent=2, sort_keys=True).splitlines() if change.running else []
        new = json.dumps(json.loads(change.next), indent=2, sort_keys=True).splitlines() if change.next else []
        out.extend(difflib.unified_diff(old, new, f"running/{change.service}", f"next/{change.service}",
                                        lineterm="", n=1))
    return "\n".join(out)


@bp.get("/ui/apps/<app_id>")
@signed_in
def app_page(app_id: str) -> Any:
    app = _visible(app_id)
    if app is None:
        return _not_found(app_id)
    d = daemon()
    deployments = d.store.deployments(app.id, limit=DEPLOYMENTS_SHOWN)
    units = error = changes = None
    if app.status != store.REMOVED:
        try:
            units = d.app_units(app.org, app.name)
        except CynchrodError as exc:
            error = f"{exc.code}: {exc.message}"
        changes = d.preview(app.org, app.name)
    manifest = d.manifest(app)
    built = {dep.id for dep in deployments if build_log(dep.id, 1) is not None}
    status = _status(app, deployments[0] if deployments else None)
    return _page("app.html", app=app, poll_ms=POLL_MS, status=status, app_health=health.app_health(status),
                 serving=serving(app) if status == store.FAILED else None,
                 deployments=deployments, units=units, units_error=error, changes=changes,
                 diff=_diff(changes or []), webhook=webhook_json(app), built=built,
                 updates=[u.to_json() for u in d.store.update_states(app.id)],
                 manifest=manifest.decode("utf-8", "replace") if manifest is not None else None)


@bp.get("/ui/apps/<app_id>/deployments/<int:deployment_id>/log")
@signed_in
def build_log_page(app_id: str, deployment_id: int) -> Any:
    app = _visible(app_id)
    found = daemon().store.deployment(deployment_id)
    if app is None or found is None or found.app_id != app.id:
        return _not_found(app_id)
    return _page("build_log.html", app=app, deployment=found, lines=build_log(deployment_id, 2000))


# -- logs ------------------------------------------------------------------------------


@bp.get("/ui/apps/<app_id>/logs")
@signed_in
def logs_page(app_id: str) -> Any:
    app = _visible(app_id)
    if app is None:
        return _not_found(app_id)
    spec = app.spec
    return _page("logs.html", app=app, multi=spec is not None and spec.multi, tail=LOG_TAIL)


@bp.get("/ui/apps/<app_id>/logs.json")
@signed_in
def logs_json(app_id: str) -> Response | tuple[Response, int]:
    app = _visible(app_id)
    if app is None:
        return error_response("not_found", f"no app {app_id}")
    lines = [] if app.status == store.REMOVED else daemon().log_tail(app.org, app.name, LOG_TAIL)
    return Response(json.dumps({"lines": [{"service": s, "timestamp": t, "line": text} for s, t, text in lines]}),
                    mimetype="application/json")


@bp.post("/ui/apps/<app_id>/logs/ticket")
@signed_in
def logs_ticket(app_id: str) -> Response | tuple[Response, int]:
    """A single-use ticket for ``/apps/<id>/logs/stream?ticket=``, issued to this session's token."""
    app = _visible(app_id)
    if app is None:
        return error_response("not_found", f"no app {app_id}")
    ticket = daemon().tickets.issue(g.token, app.id, session=g.session_id)
    return Response(json.dumps({"ticket": ticket, "expires_in": int(TICKET_TTL_S)}), mimetype="application/json")
