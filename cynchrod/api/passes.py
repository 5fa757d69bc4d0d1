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

bp = Blueprint("passes", __name__)
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,64}$")
MAX_ID = 2**63 - 1


def pass_json(p: store.PassRecord, token: store.Token) -> dict[str, Any]:
    apps = [a for a in p.apps if token.sees(str(a.get("org")))]
    return {"id": p.id, "trigger": p.trigger, "requested_commit": p.requested_commit, "status": p.status,
            "commit": p.commit, "requested_at": p.requested_at, "started_at": p.started_at,
            "finished_at": p.finished_at, "source_error": p.source_error, "apps": apps,
            "failed": any(a.get("status") in notices.FAILING | notices.ROLLED_BACK_STATUSES for a in apps)}


@bp.get("/passes/<pass_id>")
def get_pass(pass_id: str) -> Response:
    token = bearer()
    found = daemon().store.pass_record(int(pass_id)) if pass_id.isascii() and pass_id.isdigit() \
        and 0 < len(pass_id) <= 19 and int(pass_id) <= MAX_ID else None
    if found is None:
        raise ApiError("not_found", f"no pass {pass_id}")
    return jsonify(pass_json(found, token))


@bp.get("/passes")
def list_passes() -> Response:
    token = bearer()
    commit = request.args.get("commit", "")
    if not _SHA_RE.match(commit):
        raise ApiError("invalid_query", "commit must be 7 to 64 hex digits")
    return jsonify({"passes": [pass_json(p, token) for p in daemon().store.passes_of_commit(commit)]})
