"""Image updates' state per app service (table ``image_updates``): the last check, the newest
candidate and why it was or was not taken, the last bump the daemon committed, a pause after a
person rolled back, and the tags whose updated deployment failed. Written by the update checker
(``shell/updates.py``), read by the API, the dashboard, ``cynchrod status`` and ``/metrics``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cynchrod.store.db import Database

_COLUMNS = ("image", "checked_at", "candidate", "reason", "error_code", "error", "bumped_to", "bumped_commit",
            "bumped_at", "paused_spec", "failed", "seen_commit")


@dataclasses.dataclass(frozen=True)
class UpdateState:
    app_id: str
    service: str
    #: The image the manifest declared at the last check.
    image: str = ""
    checked_at: str | None = None
    candidate: str | None = None
    #: ``core.updates.Choice.reason``, ``committed`` or ``available`` (commit: false).
    reason: str | None = None
    error_code: str | None = None
    error: str | None = None
    bumped_to: str | None = None
    bumped_commit: str | None = None
    bumped_at: str | None = None
    #: The app's spec (JSON) when a rollback paused its updates; None when not paused.
    paused_spec: str | None = None
    failed: tuple[str, ...] = ()
    #: The app's recorded commit when the daemon last committed a bump: while the app still shows it,
    #: the bump is not applied yet (the declared image is the one it was bumped from).
    seen_commit: str | None = None

    @property
    def paused(self) -> bool:
        return self.paused_spec is not None

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "image": self.image, "checked_at": self.checked_at,
                "candidate": self.candidate, "reason": self.reason, "error_code": self.error_code,
                "error": self.error, "bumped_to": self.bumped_to, "bumped_commit": self.bumped_commit,
                "paused": self.paused, "failed": list(self.failed),
                "update_available": self.reason == "available"}


class Updates(Database):
    def update_states(self, app_id: str | None = None) -> list[UpdateState]:
        sql = "SELECT * FROM image_updates" + (" WHERE app_id = ?" if app_id is not None else "")
        rows = self._query(sql + " ORDER BY app_id, service", (app_id,) if app_id is not None else ())
        return [UpdateState(app_id=r["app_id"], service=r["service"],
                            **{c: r[c] for c in _COLUMNS if c != "failed"},
                            failed=tuple(json.loads(r["failed"] or "[]"))) for r in rows]

    def put_update_state(self, state: UpdateState) -> None:
        values = dataclasses.asdict(state)
        values["failed"] = json.dumps(list(state.failed))
        with self.transaction(apps_changed=False) as db:
            # An upsert, not INSERT OR REPLACE: a replace deletes and inserts, so the row's UPDATE
            # trigger (a bump told as ``update_committed``, store/db.py) would not see the old row.
            db.execute(f"INSERT INTO image_updates (app_id, service, {', '.join(_COLUMNS)})"
                       f" VALUES (?, ?, {', '.join('?' for _ in _COLUMNS)})"
                       f" ON CONFLICT (app_id, service) DO UPDATE SET"
                       f" {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS)}",
                       (state.app_id, state.service, *(values[c] for c in _COLUMNS)))

    def drop_update_states(self, app_id: str, keep: set[str]) -> None:
        with self.transaction(apps_changed=False) as db:
            for row in db.execute("SELECT service FROM image_updates WHERE app_id = ?", (app_id,)).fetchall():
                if row["service"] not in keep:
                    db.execute("DELETE FROM image_updates WHERE app_id = ? AND service = ?", (app_id, row["service"]))

    def updates_available(self) -> int:
        rows = self._query("SELECT count(*) AS n FROM image_updates WHERE reason = 'available'")
        return int(rows[0]["n"])
