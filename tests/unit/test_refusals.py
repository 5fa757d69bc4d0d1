"""Refusals (quota, domain) are the row's ``refusal`` column: the decisions set it and read it
back, the store keeps it with the error that states it, and an older state dir is migrated."""

from __future__ import annotations

import pathlib
import sqlite3

from cynchrod import store
from cynchrod.core import decisions, specs
from cynchrod.core.codes import Code
from cynchrod.core.errors import PermanentError
from tests.unit.test_decisions import Row


def spec(name: str, *, domain: str | None = None) -> specs.AppSpec:
    return specs.AppSpec(org="o", name=name, domain=domain, source="repo",
                         services=(specs.ServiceSpec(name="main", image="img:1", memory=64, port=80),))


def decide(apps: list[specs.AppSpec], rows: dict[tuple[str, str], Row], **kw: object) -> dict[str, decisions.Decision]:
    inputs = decisions.Inputs(desired={a.key: a for a in apps}, rows=rows, units=(), now=100.0,
                              read=frozenset({"repo"}), **kw)  # type: ignore[arg-type]
    return {d.key[1]: d for d in decisions.decide(inputs)}


def test_a_refused_app_records_its_refusal_and_other_holds_none() -> None:
    a, b, c = spec("a"), spec("b"), spec("c")
    got = decide([a, b, c], {a.key: Row()}, max_apps={"o": 1},
                 holds={c.key: PermanentError("no secret", code=Code.SECRET_MISSING)})
    assert got["a"].refusal is None and got["a"].status == decisions.RUNNING
    assert got["b"].refusal is Code.QUOTA_EXCEEDED and got["b"].status == decisions.FAILED
    assert got["c"].refusal is None and got["c"].failure is not None and got["c"].failure.code == "secret_missing"
    taken = decide([spec("x", domain="d.example"), spec("y", domain="d.example")], {})
    assert (taken["x"].refusal, taken["y"].refusal) == (None, Code.DOMAIN_TAKEN)


def test_the_column_decides_not_the_error_text() -> None:
    a, b = spec("a"), spec("b")
    # b's error reads like a quota refusal, but its row was not refused: it keeps its place.
    rows = {a.key: Row(), b.key: Row(status=decisions.FAILED, last_error="quota_exceeded: an old text")}
    assert decisions.admitted(rows, "o") == 2
    assert not decisions.quota_refused(rows[b.key])
    rows[b.key] = Row(status=decisions.FAILED, last_error="anything", refusal=Code.QUOTA_EXCEEDED)
    assert decisions.admitted(rows, "o") == 1 and decisions.quota_refused(rows[b.key])
    # A refusal of a row that is no longer failed is over.
    assert not decisions.quota_refused(Row(status=decisions.RUNNING, refusal=Code.QUOTA_EXCEEDED))
    assert decisions.domain_refused(Row(status=decisions.FAILED, refusal=Code.DOMAIN_TAKEN))


def test_the_store_keeps_a_refusal_with_the_error_that_states_it(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    row = db.ensure_app(spec("a"), commit="c1")
    assert row.refusal is None
    db.update_app(row.id, status=decisions.FAILED, last_error="quota_exceeded: full", refusal=Code.QUOTA_EXCEEDED)
    assert db.app(row.id).refusal == "quota_exceeded"  # type: ignore[union-attr]
    db.update_app(row.id, status=decisions.FAILED)  # no error written: the refusal stands
    assert db.app(row.id).refusal == "quota_exceeded"  # type: ignore[union-attr]
    db.update_app(row.id, status=decisions.FAILED, last_error="image_not_found: img:1")
    assert db.app(row.id).refusal is None  # type: ignore[union-attr]


def test_an_older_state_dir_gets_the_column_from_its_errors(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.db"
    db = store.Store(path)
    for name in ("q", "d", "other", "healed"):
        db.ensure_app(spec(name), commit="c1")
    db.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER apps_status_changed")  # from before notifications, too
    raw.execute("ALTER TABLE apps DROP COLUMN refusal")  # as a state dir written before the column
    for name, status, error in (("q", "failed", "quota_exceeded: org o is at its max_apps of 1"),
                                ("d", "failed", "domain_taken: domain x belongs to app o/y"),
                                ("other", "failed", "image_not_found: img:1"),
                                ("healed", "running", "quota_exceeded: stale")):
        raw.execute("UPDATE apps SET status = ?, last_error = ? WHERE name = ?", (status, error, name))
    raw.commit()
    raw.close()
    migrated = {a.name: a.refusal for a in store.Store(path).apps()}
    assert migrated == {"q": "quota_exceeded", "d": "domain_taken", "other": None, "healed": None}
    assert {a.name: a.refusal for a in store.Store(path).apps()} == migrated  # once only
