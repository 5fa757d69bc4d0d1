"""An ``oom_killed`` note (a running app healed after its container was OOM-killed) is the row's
``note`` column, typed: the decisions keep it while the app runs and read it back from the
column, never from a prefix of ``last_error``; the store keeps it with the error that states it,
and an older state dir is migrated from its error texts once (issue 20, item 4)."""

from __future__ import annotations

import pathlib
import sqlite3

from cynchrod import store
from cynchrod.core import decisions, planning, specs
from cynchrod.core.codes import Code
from tests.unit.test_decisions import Row

SPEC = specs.AppSpec(org="o", name="a", source="repo",
                     services=(specs.ServiceSpec(name="main", image="img:1", memory=64),))
NOTE = "oom_killed: service main of o/a was killed for exceeding its memory limit of 64 MB; restarted"


def running_unit() -> planning.Unit:
    return planning.Unit(org="o", app="a", service="main", replica=0, instance="u1", state=planning.RUNNING,
                         spec_hash=SPEC.service_hash(SPEC.services[0]))


def decide(row: Row) -> decisions.Decision:
    [d] = decisions.decide(decisions.Inputs(desired={SPEC.key: SPEC}, rows={SPEC.key: row}, units=[running_unit()],
                                            now=100.0, read=frozenset({"repo"})))
    return d


def test_a_running_app_keeps_its_note_by_the_column() -> None:
    d = decide(Row(last_error=NOTE, note=Code.OOM_KILLED, deployed_hash=SPEC.hash))
    assert (d.status, d.error, d.note) == (decisions.RUNNING, NOTE, Code.OOM_KILLED)
    assert d.note is Code.OOM_KILLED


def test_an_error_text_that_reads_like_a_note_is_not_one() -> None:
    d = decide(Row(last_error=NOTE, note=None, deployed_hash=SPEC.hash))
    assert (d.error, d.note) == (None, None)


def test_the_note_goes_with_a_new_deployment() -> None:
    [d] = decisions.decide(decisions.Inputs(desired={SPEC.key: SPEC}, units=[], now=100.0, read=frozenset({"repo"}),
                                            rows={SPEC.key: Row(last_error=NOTE, note=Code.OOM_KILLED)}))
    assert d.acts and (d.error, d.note) == (None, None)


def test_the_store_keeps_a_note_with_the_error_that_states_it(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    row = db.ensure_app(SPEC, commit="c1")
    assert row.note is None
    db.update_app(row.id, status=decisions.RUNNING, last_error=NOTE, note=Code.OOM_KILLED)
    assert db.app(row.id).note == "oom_killed"  # type: ignore[union-attr]
    db.update_app(row.id, status=decisions.RUNNING)  # no error written: the note stands
    assert db.app(row.id).note == "oom_killed"  # type: ignore[union-attr]
    db.update_app(row.id, status=decisions.FAILED, last_error="image_not_found: img:1")
    assert db.app(row.id).note is None  # type: ignore[union-attr]


def test_an_older_state_dir_gets_the_column_from_its_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.db"
    db = store.Store(path)
    for name in ("oom", "failed", "other"):
        db.ensure_app(specs.AppSpec(org="o", name=name, source="repo", services=SPEC.services), commit="c1")
    db.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER apps_status_changed")  # from before notifications, too
    raw.execute("ALTER TABLE apps DROP COLUMN note")  # as a state dir written before the column
    for name, status, error in (("oom", "running", NOTE), ("failed", "failed", "oom_killed: an old failure"),
                                ("other", "running", None)):
        raw.execute("UPDATE apps SET status = ?, last_error = ? WHERE name = ?", (status, error, name))
    raw.commit()
    raw.close()
    migrated = {a.name: a.note for a in store.Store(path).apps()}
    assert migrated == {"oom": "oom_killed", "failed": None, "other": None}
    assert {a.name: a.note for a in store.Store(path).apps()} == migrated  # once only
