"""An in-memory engine: the ``Runtime`` protocol with no I/O.

Used by the pure core's tests (property tests: decide, apply, decide again finds
nothing to do) and by the simulations in ``bench/`` that go past what one machine
can run. It keeps units in a dict, counts its calls (``calls``, its own: not the protocol's), and can be
told to fail an action (``fail``) to drive the error paths.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import threading
from collections.abc import Callable, Iterator

from cynchrod import runtime
from cynchrod.core import planning
from cynchrod.core.errors import CynchrodError


class _Stream:
    def __init__(self) -> None:
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[runtime.Event]:
        yield runtime.Event(runtime.RELIST)
        self._closed.wait()

    def close(self) -> None:
        self._closed.set()


class _NoLogs:
    def __iter__(self) -> Iterator[runtime.LogLine]:
        return iter(())

    def batches(self) -> Iterator[list[runtime.LogLine]]:
        return iter(())

    def close(self) -> None:
        pass


class MemoryRuntime:
    def __init__(self, *, owner: str = "mem", instance: str = "i0") -> None:
        self.owner = owner
        self.instance = instance
        self.calls = 0
        self.units: dict[str, runtime.Unit] = {}
        self.removed_apps: list[tuple[str, str]] = []
        #: (org, app) -> error raised by the next action on that app.
        self.fail: dict[tuple[str, str], CynchrodError] = {}
        #: Raised by ``ping`` while set (a frozen engine, for the liveness tests).
        self.ping_error: CynchrodError | None = None
        self._ids = itertools.count(1)

    def list_units(self) -> list[runtime.Unit]:
        self.calls += 1
        return list(self.units.values())

    def watch(self) -> _Stream:
        return _Stream()

    def apply(self, action: planning.Action) -> list[runtime.Unit]:
        self.calls += 1
        if action.key in self.fail:
            raise self.fail.pop(action.key)
        unit = action.unit
        if action.kind == planning.REMOVE:
            assert unit is not None
            self.units.pop(unit.instance, None)
            return []
        if action.kind == planning.STOP:
            assert unit is not None
            self.units[unit.instance] = dataclasses.replace(unit, state=planning.EXITED, exit_code=0)
            return []
        if action.kind == planning.START:
            assert unit is not None
            started = dataclasses.replace(unit, state=planning.RUNNING, exit_code=None)
            self.units[unit.instance] = started
            return [started]
        assert action.spec is not None and action.service_spec is not None
        if action.kind == planning.RECREATE and unit is not None:
            self.units.pop(unit.instance, None)
        spec, service = action.spec, action.service_spec
        made = runtime.Unit(org=spec.org, app=spec.name, service=service.name, replica=action.replica,
                            instance=f"m{next(self._ids)}", state=planning.RUNNING,
                            spec_hash=spec.service_hash(service),
                            spec_json=service.canonical(restarted_at=spec.restarted_at), endpoint=service.host_port)
        self.units[made.instance] = made
        return [made]

    def exit_details(self, unit: runtime.Unit) -> tuple[int | None, bool]:
        return unit.exit_code, unit.state == planning.OOM_KILLED

    def remove_app(self, org: str, app: str) -> None:
        self.removed_apps.append((org, app))

    def tail(self, org: str, app: str, n: int) -> list[runtime.LogLine]:
        return []

    def follow(self, org: str, app: str, *, since: float, ended: threading.Event | None = None) -> _NoLogs:
        return _NoLogs()

    def image_exists(self, image: str) -> bool:
        return True

    def build_image(self, context: pathlib.Path, *, dockerfile: str, tag: str, args: dict[str, str],
                    org: str, app: str, log: Callable[[str], None], target: str = "") -> None:
        pass

    def prune_images(self, org: str, app: str, *, keep: int) -> list[str]:
        return []

    def recover(self) -> int:
        return 0

    def ping(self) -> None:
        if self.ping_error is not None:
            raise self.ping_error

    def close(self) -> None:
        pass


def _conforms(rt: MemoryRuntime) -> runtime.Runtime:
    return rt  # mypy checks that the driver is a Runtime
