"""``GET /notifications``: the outbox of notifications and commit statuses, the dead ones included.

An org's token sees its own org's messages only; an admin token sees all. Target URLs and
secrets are never shown: a target is named by its kind and host (``webhook https://host``),
its scheme (``apprise slack://``) or its forge and repository.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError, is_ascii_number
from cynchrod.api.auth import bearer, daemon

bp = Blueprint("notifications", __name__)
STATES = ("queued", "sent", "dead")
MAX_LIMIT = 500


def notification_json(n: store.Notification) -> dict[str, Any]:
    return {"id": n.id, "event": n.event, "org": n.org, "app": n.app, "target": n.target_name, "kind": n.kind,
            "status": n.status, "attempts": n.attempts, "last_error": n.last_error, "created_at": n.created_at,
            "sent_at": n.sent_at, "next_attempt_at": n.next_at if n.status == "queued" else None,
            "body": json.loads(n.body)}


@bp.get("/notifications")
def list_notifications() -> Response:
    token = bearer()
    status = request.args.get("status")
    if status is not None and status not in STATES:
        raise ApiError("invalid_query", f"status must be one of {', '.join(STATES)}")
    raw = request.args.get("limit", "100")
    if not is_ascii_number(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError("invalid_query", f"limit must be a number from 1 to {MAX_LIMIT}")
    db = daemon().store
    found = db.notifications(org=None if token.admin else token.org, status=status, limit=int(raw))
    counts = db.notification_counts() if token.admin else None
    body: dict[str, Any] = {"notifications": [notification_json(n) for n in found]}
    if counts is not None:
        body["counts"] = counts
    return jsonify(body)
