"""Store.batch: many writes in one transaction, each inner write a savepoint of its own."""

from __future__ import annotations

import pathlib

import pytest

from cynchrod import store
from cynchrod.core import specs


def app(db: store.Store, name: str) -> store.App:
    spec = specs.AppSpec(org="o", name=name, services=(specs.ServiceSpec(name="main", image="img:1", memory=64),))
    return db.ensure_app(spec, commit="c1")


def test_a_batch_is_one_transaction_and_a_failed_write_in_it_is_undone_alone(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    other = store.Store(tmp_path / "s.db")  # another process's view of the same file
    a, b = app(db, "a"), app(db, "b")
    with db.batch():
        db.update_app(a.id, last_error="one")
        with pytest.raises(RuntimeError), db.transaction() as conn:
            conn.execute("UPDATE apps SET last_error = 'lost' WHERE id = ?", (b.id,))
            raise RuntimeError("this write fails")
        db.update_app(a.id, status="running")
        # Not committed yet: the other connection still sees the rows as they were.
        assert [x.last_error for x in other.apps()] == [None, None]
    assert [(x.name, x.status, x.last_error) for x in other.apps()] == [("a", "running", "one"),
                                                                         ("b", b.status, None)]


def test_an_error_out_of_a_batch_undoes_all_of_it(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    a = app(db, "a")
    with pytest.raises(RuntimeError), db.batch():
        db.update_app(a.id, last_error="one")
        raise RuntimeError("the batch fails")
    assert db.app(a.id).last_error is None  # type: ignore[union-attr]
    db.update_app(a.id, last_error="after")  # the store is usable again
    assert db.app(a.id).last_error == "after"  # type: ignore[union-attr]
