"""``/orgs/<org>/secrets``: set, delete and list secret names. Values are never returned."""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, request

from cynchrod.api import ApiError, read_body
from cynchrod.api.auth import bearer, daemon

bp = Blueprint("secrets", __name__)


def _org(org: str) -> None:
    if not bearer().sees(org):
        raise ApiError("not_found", f"no org {org}")


@bp.get("/orgs/<org>/secrets")
def list_secrets(org: str) -> Response:
    _org(org)
    names = daemon().store.secret_names(org)
    return jsonify({"org": org, "secrets": [{"name": n, "updated_at": at} for n, at in names]})


@bp.put("/orgs/<org>/secrets/<name>")
def put_secret(org: str, name: str) -> tuple[Response, int]:
    _org(org)
    raw = read_body()
    if request.mimetype == "application/json":
        try:
            value = json.loads(raw)["value"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError("invalid_body", 'a JSON body must be {"value": "..."}') from exc
        if not isinstance(value, str):
            raise ApiError("invalid_body", "value must be a string")
        raw = value.encode()
    d = daemon()
    d.secrets.set(org, name, raw)
    d.wake("api")  # apps that use it are redeployed
    return jsonify({"org": org, "name": name, "set": True}), 200


@bp.delete("/orgs/<org>/secrets/<name>")
def delete_secret(org: str, name: str) -> tuple[Response, int]:
    _org(org)
    if not daemon().secrets.delete(org, name):
        raise ApiError("not_found", f"no secret {org}/{name}")
    return jsonify({"org": org, "name": name, "deleted": True}), 200
