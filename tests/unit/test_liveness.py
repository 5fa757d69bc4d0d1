"""The liveness probes: a change of state is logged, handed on and stored once; the first probe
stores its finding whatever an earlier run left; the API's reading of it (``engine_up``, ``down``)."""

from __future__ import annotations

import pathlib

from cynchrod import store
from cynchrod.core.codes import Code
from cynchrod.core.errors import EngineUnavailable
from cynchrod.runtime.memory import MemoryRuntime
from cynchrod.shell import liveness


def test_a_probe_stores_each_change_once_and_hands_the_loss_on(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    db.set_meta(liveness.ENGINE_META, {"up": False, "error": "from an earlier run", "since": "x"})
    rt = MemoryRuntime()
    lost: list[str] = []
    probe = liveness.Probe(name="docker", meta=liveness.ENGINE_META, code=Code.DOCKER_UNAVAILABLE,
                           check=rt.ping, on_down=lost.append, db=db)
    live = liveness.Liveness([probe])

    live.probe()  # up: the stale "down" of an earlier run is overwritten at once
    assert liveness.engine_up(db) and liveness.down(db) == {} and live.problems() == []

    rt.ping_error = EngineUnavailable("frozen")
    live.probe()
    assert lost == [] and liveness.engine_up(db)  # one slow answer is not an outage
    live.probe()
    live.probe()
    assert lost == ["frozen"]  # handed on once, not at every probe
    assert not liveness.engine_up(db)
    assert liveness.down(db)[liveness.ENGINE_META]["error"] == "frozen"
    assert live.problems() == [{"code": "docker_unavailable", "message": "docker: frozen"}]

    rt.ping_error = None
    live.probe()
    assert liveness.engine_up(db) and live.problems() == []


def test_a_probe_that_crashes_does_not_stop_the_others(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")

    def boom() -> None:
        raise RuntimeError("a bug")

    seen: list[str] = []
    live = liveness.Liveness([
        liveness.Probe(name="bad", meta="bad", code=Code.EDGE_UNAVAILABLE, check=boom, db=db),
        liveness.Probe(name="good", meta="good", code=Code.EDGE_UNAVAILABLE,
                       check=lambda: seen.append("asked"), db=db)])
    live.probe()
    assert seen == ["asked"]


def test_shown_status_is_unknown_only_for_what_should_run() -> None:
    assert [store.shown_status(s, engine_up=False) for s in store.APP_STATUSES] == [
        "queued", "pending", "unknown", "unknown", "stopped", "failed", "removed", "completed"]
    assert [store.shown_status(s, engine_up=True) for s in store.APP_STATUSES] == list(store.APP_STATUSES)
