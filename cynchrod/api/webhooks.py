"""``POST /webhooks/git``: push events that wake the reconciler at once.

Accepted shapes: GitHub (``X-Hub-Signature-256: sha256=<hmac>``), Gitea and
Forgejo (``X-Gitea-Signature`` / ``X-Forgejo-Signature``: hex HMAC-SHA256),
GitLab (``X-Gitlab-Token``: the secret itself) and a generic
``X-Cynchrod-Signature: sha256=<hmac>``. Every comparison is constant-time
(``hmac.compare_digest``). Without a configured secret the endpoint does not
exist (404). The payload only says "something was pushed": which repositories
to fetch comes from the config, never from the body. The reply comes before
any fetch; bursts coalesce in the reconciler's wake-up queue. An accepted delivery's
reply names the pass it queued (``pass``): ``GET /passes/<id>`` gives that pass's
outcome per app once it ran, so a CI job can wait for it (``cynchrod wait``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cynchrod.api import ApiError, read_body
from cynchrod.api.auth import daemon
from cynchrod.core.errors import CynchrodError

bp = Blueprint("webhooks", __name__)
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,64}$")


def _hmac_ok(secret: str, body: bytes, given: str, *, prefix: str = "") -> bool:
    expected = prefix + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.strip().encode())


def verify(secret: str, body: bytes) -> str | None:
    """The provider whose signature header matches, or None."""
    headers = request.headers
    if (sig := headers.get("X-Hub-Signature-256")) is not None:
        return "github" if _hmac_ok(secret, body, sig, prefix="sha256=") else None
    if (sig := headers.get("X-Gitea-Signature") or headers.get("X-Forgejo-Signature")) is not None:
        return "gitea" if _hmac_ok(secret, body, sig) else None
    if (token := headers.get("X-Gitlab-Token")) is not None:
        return "gitlab" if hmac.compare_digest(secret.encode(), token.encode()) else None
    if (sig := headers.get("X-Cynchrod-Signature")) is not None:
        return "generic" if _hmac_ok(secret, body, sig, prefix="sha256=") else None
    return None


def event_kind() -> str:
    for header in ("X-GitHub-Event", "X-Gitea-Event", "X-Forgejo-Event", "X-Gitlab-Event", "X-Cynchrod-Event"):
        if (value := request.headers.get(header)) is not None:
            return value.lower().replace(" hook", "")
    return "push"


def pushed_commit(payload: Any) -> str | None:
    """The commit a push delivery names (GitHub, Gitea, GitLab and the generic shape: ``after``)."""
    after = payload.get("after") if isinstance(payload, dict) else None
    if isinstance(after, str) and _SHA_RE.match(after) and after.strip("0"):
        return after.lower()
    return None


def pushed_ref(payload: Any) -> str | None:
    return payload.get("ref") if isinstance(payload, dict) and isinstance(payload.get("ref"), str) else None


def _deliver(secret: str, branches: set[str], trigger: str, what: str) -> tuple[Response, int]:
    """The part both endpoints share: verify, answer pings, ignore other branches, wake."""
    d = daemon()
    body = read_body()  # over 1 MiB (chunked too): 413 before more is read
    provider = verify(secret, body)
    if provider is None:
        d.metrics.webhooks.labels("unknown", "unauthorized").inc()
        raise ApiError("unauthorized", "missing or wrong webhook signature")
    kind = event_kind()
    if kind == "ping":
        d.metrics.webhooks.labels(provider, "ping").inc()
        return jsonify({"ok": True, "event": "ping"}), 200
    try:
        payload = json.loads(body or b"{}")
    except ValueError as exc:
        d.metrics.webhooks.labels(provider, "bad_payload").inc()
        raise ApiError("invalid_body", "the payload is not JSON") from exc
    ref = pushed_ref(payload)
    if ref is not None and ref not in branches:
        d.metrics.webhooks.labels(provider, "ignored").inc()
        return jsonify({"ok": True, "ignored": f"{ref} is not {what}"}), 202
    # The pass this delivery queues: the reconciler's next pass that fetches answers it (GET /passes/<id>).
    # A state dir that cannot be written still wakes the pass; the reply then names none.
    try:
        pass_id: int | None = d.store.request_pass(trigger=trigger, commit=pushed_commit(payload))
    except CynchrodError:
        pass_id = None
    d.wake(trigger, debounced=True)
    d.metrics.webhooks.labels(provider, "accepted").inc()
    reply: dict[str, Any] = {"ok": True, "event": kind, "queued": True}
    if pass_id is not None:
        reply.update({"pass": pass_id, "pass_url": f"/passes/{pass_id}"})
    return jsonify(reply), 202


@bp.post("/webhooks/apps/<app_id>")
def app_push(app_id: str) -> tuple[Response, int]:
    """A push to a repo app's source repository: rebuild and redeploy that app."""
    d = daemon()
    app = d.store.app(app_id)
    spec = app.spec if app is not None else None
    builds = [s.build for s in spec.services if s.build] if spec is not None else []
    secret = d.secrets.app_webhook(app_id) if builds else None
    if app is None or app.status == "removed" or secret is None:
        raise ApiError("not_found", f"no webhook for app {app_id}")
    # A "webhook" pass, which fetches the build repositories (a "build" pass, woken when a build ends,
    # reads the commit it built and fetches nothing); the deployment that follows the build is "build".
    return _deliver(secret, {f"refs/heads/{b.ref}" for b in builds}, "webhook", "the branch this app builds")


@bp.post("/webhooks/git")
def git_push() -> tuple[Response, int]:
    d = daemon()
    secret = d.settings.webhook_secret
    if not secret:
        raise ApiError("not_found", "webhooks are off: no webhook secret is configured")
    return _deliver(secret, {f"refs/heads/{s.branch}" for s in d.sources}, "webhook",
                    "a followed branch")
