"""Prometheus metrics (prometheus-client), one registry per daemon.

The reconciler and the API report into a ``Metrics``; ``GET /metrics`` renders
it. App counts by status, and whether the engine and the edge answer (``liveness``), are read
from the store at scrape time.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cynchrod import store
from cynchrod.desired import secrets
from cynchrod.shell import liveness

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _AppsByStatus(Collector):
    def __init__(self, db: store.Store) -> None:
        self._db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        down = liveness.down(self._db)
        family = GaugeMetricFamily("cynchrod_apps", "Apps by status (unknown: the engine cannot be seen).",
                                   labels=["status"])
        counts = dict.fromkeys((*store.APP_STATUSES, store.UNKNOWN), 0)
        engine_up = liveness.ENGINE_META not in down
        for app in self._db.apps():
            status = store.shown_status(app.status, engine_up=engine_up)
            counts[status] = counts.get(status, 0) + 1
        for status, count in counts.items():
            family.add_metric([status], count)
        yield family
        yield GaugeMetricFamily("cynchrod_engine_up", "1 while the engine answers the reconciler's probe.",
                                value=float(engine_up))
        yield GaugeMetricFamily("cynchrod_updates_available", "App services with a newer image their update: "
                                "block allows but does not commit (commit: false).",
                                value=float(self._db.updates_available()))
        yield GaugeMetricFamily("cynchrod_edge_up", "1 while the edge (Caddy's admin API) answers, or none is set.",
                                value=float(liveness.EDGE_META not in down))


class _Notifications(Collector):
    """The outbox's messages by state, read from the store at scrape time (every process sees them)."""

    def __init__(self, db: store.Store) -> None:
        self._db = db

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._db.notification_counts()
        family = GaugeMetricFamily("cynchrod_notifications",
                                   "Notifications and commit statuses in the outbox, by state "
                                   "(sent: kept 7 days; dead: gave up).", labels=["state"])
        for state in ("queued", "sent", "dead"):
            family.add_metric([state], counts[state])
        yield family
        yield GaugeMetricFamily("cynchrod_notification_failed_attempts",
                                "Failed delivery attempts of the messages the outbox keeps.", value=counts["failed"])


def directory_for(state_dir: pathlib.Path) -> pathlib.Path:
    """Where a daemon's counters live: never on the state dir's disk.

    prometheus-client maps its files into memory and grows them sparsely, so when their
    disk is full, the first write to a new page kills the process with SIGBUS (a full
    state dir killed every API worker that way). A folder of our own in ``/dev/shm`` fills
    with nothing else; the system's temporary folder where there is none.
    """
    ident = secrets.state_id(state_dir)
    shm = pathlib.Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else pathlib.Path(tempfile.gettempdir())
    return base / f"cynchrod-metrics-{ident}"


def use_directory(path: pathlib.Path) -> None:
    """Count in files under ``path`` (made empty now), so every process of the daemon (the
    reconciler and each API worker, forked after this) adds to the same counters and any
    worker's ``/metrics`` shows them all (prometheus-client's multiprocess mode)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, db: store.Store | None = None) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter("cynchrod_passes", "Reconcile passes.", ["trigger", "result"],
                              registry=self.registry)
        self.pass_seconds = Histogram("cynchrod_pass_duration_seconds", "Duration of a reconcile pass.",
                                      registry=self.registry,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.actions = Counter("cynchrod_actions", "Actions applied, by kind and result.", ["kind", "result"],
                               registry=self.registry)
        self.webhooks = Counter("cynchrod_webhook_deliveries", "Webhook deliveries, by provider and result.",
                                ["provider", "result"], registry=self.registry)
        self.requests = Counter("cynchrod_api_requests", "API requests, by method and status code.",
                                ["method", "code"], registry=self.registry)
        self.update_checks = Counter("cynchrod_image_update_checks", "Image update checks (one per repository "
                                     "asked), by registry.", ["registry"], registry=self.registry)
        self.update_errors = Counter("cynchrod_image_update_errors", "Image update checks that failed, by registry "
                                     "and code.", ["registry", "code"], registry=self.registry)
        self.updates_committed = Counter("cynchrod_image_updates_committed", "Image updates committed to Git, by "
                                         "registry.", ["registry"], registry=self.registry)
        self._db = db
        if db is not None:
            self.registry.register(_AppsByStatus(db))
            self.registry.register(_Notifications(db))

    def render(self) -> bytes:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not path:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        if self._db is not None:
            merged.register(_AppsByStatus(self._db))
            merged.register(_Notifications(self._db))
        return generate_latest(merged)
