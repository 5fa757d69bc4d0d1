"""The store: app rows and deployment history in SQLite (WAL) under the state dir.

Written by the reconciler, read by the CLI and the API. It is derived state:
labels in Docker and commits in Git are the truth, so a lost store is rebuilt
by the next pass (history aside). App rows are soft-deleted to ``removed`` and
never erased.

Its parts, one module each over one connection (``db.Database``: schema, migrations,
transactions): ``apps`` (apps, deployments, quota reservations), ``tokens`` (API tokens,
log tickets), ``secrets`` (sealed secrets, webhook secrets), ``meta``, ``outbox`` (status
changes and the notifications queued from them), ``passes`` (passes a webhook asked for,
and their outcome); ``records`` holds the
row values. ``Store`` joins the parts as mixins rather than delegating to them: callers keep
one flat API (``db.update_app``, ``db.create_token``), and a transaction or a ``batch`` spans
every part because they share the connection and its lock.
"""

from __future__ import annotations

from cynchrod.core.decisions import (
    APP_STATUSES,
    DEPLOYING,
    FAILED,
    PENDING,
    QUEUED,
    REMOVED,
    RUNNING,
    STOPPED,
    UNKNOWN,
    shown_status,
)
from cynchrod.core.errors import AppExists, QuotaFull
from cynchrod.store.apps import LOG_BYTES, LOG_LINES, Apps, bounded_log
from cynchrod.store.db import SCHEMA, Database, now
from cynchrod.store.meta import Meta
from cynchrod.store.outbox import Message, Notification, Outbox
from cynchrod.store.passes import Passes, PassRecord
from cynchrod.store.records import (
    TOKEN_PREFIX,
    App,
    Deployment,
    Problem,
    Token,
    main_service,
    services_json,
    token_hash,
)
from cynchrod.store.secrets import Secrets
from cynchrod.store.tokens import Tokens
from cynchrod.store.updates import Updates, UpdateState

__all__ = [
    "APP_STATUSES",
    "DEPLOYING",
    "FAILED",
    "LOG_BYTES",
    "LOG_LINES",
    "PENDING",
    "QUEUED",
    "REMOVED",
    "RUNNING",
    "SCHEMA",
    "STOPPED",
    "TOKEN_PREFIX",
    "UNKNOWN",
    "App",
    "AppExists",
    "Database",
    "Deployment",
    "Message",
    "Notification",
    "PassRecord",
    "Problem",
    "QuotaFull",
    "Store",
    "Token",
    "UpdateState",
    "Updates",
    "bounded_log",
    "main_service",
    "now",
    "services_json",
    "shown_status",
    "token_hash",
]


class Store(Apps, Tokens, Secrets, Meta, Outbox, Passes, Updates):
    """The whole store over one SQLite file (see ``db.Database`` for threads and processes)."""
