"""Upgrade safety of health-gated deploys: a state dir from before them (no ``deployments.log``, no
``apps.healthy_spec``) opens, keeps its rows and reads them back."""

from __future__ import annotations

import pathlib
import sqlite3

from cynchrod import store
from cynchrod.core import specs


def test_a_state_dir_from_before_health_gates_opens_and_keeps_its_rows(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cynchrod.db"
    db = store.Store(path)
    spec = specs.AppSpec(org="default", name="old", services=(specs.ServiceSpec(name="main", image="img"),))
    app = db.ensure_app(spec, commit="c" * 40)
    deployment = db.start_deployment(app.id, commit="c" * 40, trigger="poll", spec_hash=spec.hash)
    db.finish_deployment(deployment, status="running")
    db.close()
    with sqlite3.connect(path) as raw:  # as an older version left it
        raw.execute("ALTER TABLE deployments DROP COLUMN log")
        raw.execute("ALTER TABLE apps DROP COLUMN healthy_spec")
    db = store.Store(path)
    try:
        [old] = db.deployments(app.id)
        assert (old.status, old.log) == ("running", None)
        row = db.live_apps()[("default", "old")]
        assert row.healthy_spec is None and row.spec is not None and row.spec.hash == spec.hash
        failed = db.start_deployment(app.id, commit="d" * 40, trigger="poll", spec_hash="x")
        db.finish_deployment(failed, status="crashed", error_code="crashed", error="service main exited with code 3",
                             log=[f"line {i}" for i in range(500)])
        kept = db.deployment(failed)
        assert kept is not None and kept.log is not None
        assert kept.log.splitlines() == [f"line {i}" for i in range(400, 500)]  # the last 100 lines
    finally:
        db.close()


def test_a_kept_log_is_bounded_in_bytes() -> None:
    text = store.bounded_log(["x" * 10_000] * 50)
    assert text is not None and len(text.encode()) <= store.LOG_BYTES
    assert store.bounded_log([]) is None


def test_a_state_dir_from_before_gates_were_kept_gains_the_column_and_interrupts_as_before(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cynchrod.db"
    db = store.Store(path)
    spec = specs.AppSpec(org="default", name="old", services=(specs.ServiceSpec(name="main", image="img"),))
    app = db.ensure_app(spec, commit="c" * 40)
    left = db.start_deployment(app.id, commit="c" * 40, trigger="poll", spec_hash=spec.hash)
    db.close()
    with sqlite3.connect(path) as raw:  # as an older version left it
        raw.execute("ALTER TABLE apps DROP COLUMN gate")
    db = store.Store(path)
    try:
        assert db.live_apps()[("default", "old")].gate is None
        assert db.interrupt_unfinished() == 1  # no gate names it: interrupted, as before
        interrupted = db.deployment(left)
        assert interrupted is not None and interrupted.status == "failed"
        # A deployment its app's gate names is left to the next pass, which judges it again.
        judged = db.start_deployment(app.id, commit="d" * 40, trigger="poll", spec_hash=spec.hash)
        db.set_gate("default", "old", f'{{"hash": "{spec.hash}", "status": "deploying", "deployment": {judged}}}')
        assert db.interrupt_unfinished() == 0
        kept = db.deployment(judged)
        assert kept is not None and kept.status == "deploying"
    finally:
        db.close()
