"""``GET /passes/<id>`` and ``GET /passes?commit=SHA``: the passes webhooks queued, and their outcome.

A pass is the daemon's, not an org's: a token sees the pass's commit and state, and among its
apps only those of its org (an admin token, all of them).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cynchrod import store
from cynchrod.api import ApiError
from cynchrod.api.auth import bearer, daemon
from cynchrod.core import notices
from cynchrod.store.passes import DONE

bp = Blueprint("passes", __name__)
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,64}$")
MAX_ID = 2**63 - 1


#: App statuses that are a pass's final word for the app; any other (``deploying``, ``queued``) is
#: read again from the app's row while the row is still at the pass's commit.
SETTLED = frozenset({"running", "stopped", "failed", "removed", "completed"}) | notices.FAILING \
    | notices.ROLLED_BACK_STATUSES


def pass_json(p: store.PassRecord, token: store.Token, db: store.Store) -> dict[str, Any]:
    apps = [_now(a, p.commit, db) for a in p.apps if token.sees(str(a.get("org")))]
    return {"id": p.id, "trigger": p.trigger, "requested_commit": p.requested_commit, "status": p.status,
            "commit": p.commit, "requested_at": p.requested_at, "started_at": p.started_at,
            "finished_at": p.finished_at, "source_error": p.source_error, "apps": apps,
            "settled": p.status == DONE and all(a.get("status") in SETTLED for a in apps),
            "failed": any(a.get("status") in notices.FAILING | notices.ROLLED_BACK_STATUSES for a in apps)}


def _now(entry: dict[str, Any], commit: str | None, db: store.Store) -> dict[str, Any]:
    """A pass's record of one app, or, while that said ``deploying`` (the readiness gate had not judged
    yet when the pass ended), the app's row now if it is still at the pass's commit."""
    if entry.get("status") in SETTLED:
        return entry
    row = db.live_app(str(entry.get("org")), str(entry.get("app")))
    if row is None or row.commit != commit:
        return entry
    return {**entry, "status": row.status, "error": row.last_error}


@bp.get("/passes/<pass_id>")
def get_pass(pass_id: str) -> Response:
    token = bearer()
    found = daemon().store.pass_record(int(pass_id)) if pass_id.isascii() and pass_id.isdigit() \
        and 0 < len(pass_id) <= 19 and int(pass_id) <= MAX_ID else None
    if found is None:
        raise ApiError("not_found", f"no pass {pass_id}")
    return jsonify(pass_json(found, token, daemon().store))


@bp.get("/passes")
def list_passes() -> Response:
    token = bearer()
    commit = request.args.get("commit", "")
    if not _SHA_RE.match(commit):
        raise ApiError("invalid_query", "commit must be 7 to 64 hex digits")
    db = daemon().store
    return jsonify({"passes": [pass_json(p, token, db) for p in db.passes_of_commit(commit)]})
