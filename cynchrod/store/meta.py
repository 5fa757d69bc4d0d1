"""Small named values: the state dir's instance id, the desired state's problems, and
what other modules keep across restarts (``set_meta``/``meta``, JSON)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from cynchrod.store.db import Database
from cynchrod.store.records import Problem


class Meta(Database):
    """Named JSON values: the instance id, the problems, and the like."""

    def instance_id(self) -> str:
        """This state directory's identity, made once: recorded on every unit it creates."""
        found = self.meta("instance")
        if isinstance(found, str) and found:
            return found
        with self.transaction(apps_changed=False) as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance', ?)",
                       (json.dumps(secrets.token_hex(8)),))
        value = self.meta("instance")
        assert isinstance(value, str)
        return value

    def set_problems(self, problems: list[Problem]) -> None:
        """Replace the desired state's problems (a write like an app row's: listings are rebuilt)."""
        value = json.dumps([dataclasses.asdict(p) for p in problems])
        with self.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('problems', ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                       (value, value))

    def problems(self, *, org: str | None = None) -> list[Problem]:
        """The desired state's problems shown to ``org`` (None: all of them), by path and line."""
        found = [Problem(**p) for p in self.meta("problems", [])]
        return sorted((p for p in found if p.visible_to(org)), key=lambda p: (p.path, p.line))

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction(apps_changed=False) as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                       (key, json.dumps(value), json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default
