"""The ``cynchrod`` command: serve, sync, plan, validate.

Every flag also reads a ``CYNCHROD_<FLAG>`` environment variable (``--state``
is ``CYNCHROD_STATE``); precedence is flag, then environment, then the
``--config`` file, then the default.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from cynchrod import __version__, config, manifests, reconciler, runtime, source, store
from cynchrod.errors import CynchrodError, StateLocked

log = logging.getLogger("cynchrod")


def _env(name: str) -> str | None:
    return os.environ.get("CYNCHROD_" + name.upper().replace("-", "_"))


def _add_source_flags(p: argparse.ArgumentParser, *, daemon: bool) -> None:
    p.add_argument("--repo", help="manifests repository: local path, file://, https:// or ssh URL")
    p.add_argument("--branch", help="branch to follow (default main)")
    p.add_argument("--path", help="directory inside the repository that holds apps/ (default: the root)")
    p.add_argument("--state", help="state directory (default ./state)")
    p.add_argument("--config", help="operator config file (YAML)")
    p.add_argument("--owner", help="label namespace of the containers this daemon owns (default cynchrod)")
    p.add_argument("--publish-address", help="host address ports are published on (default 127.0.0.1)")
    p.add_argument("--concurrency", type=int, help="apps applied at once (default 4)")
    p.add_argument("--stop-timeout", type=int, help="seconds a container gets to stop (default 10)")
    if daemon:
        p.add_argument("--interval", type=float, help="seconds between passes (default 30)")
        p.add_argument("--listen", help="API address (default 127.0.0.1:8080)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cynchrod", description="GitOps reconciler for Docker hosts.")
    p.add_argument("--version", action="version", version=f"cynchrod {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_source_flags(sub.add_parser("serve", help="run the daemon"), daemon=True)
    _add_source_flags(sub.add_parser("sync", help="run one pass and print a summary"), daemon=False)
    _add_source_flags(sub.add_parser("plan", help="print what a pass would do; change nothing"), daemon=False)
    v = sub.add_parser("validate", help="validate manifest files or a checkout, offline")
    v.add_argument("paths", nargs="+", metavar="PATH")
    return p


def settings(args: argparse.Namespace) -> config.Settings:
    """Merge flags, CYNCHROD_* variables, the config file and defaults."""
    file_path = args.config or _env("config")
    values: dict[str, Any] = config.load_file(pathlib.Path(file_path)) if file_path else {}
    for field in config.Settings.flag_fields():
        flag = getattr(args, field, None)
        if flag is not None:
            values[field] = flag
        elif (env := _env(field)) is not None:
            values[field] = env
    return config.Settings.build(values)


class StateLock:
    """An exclusive lock on the state directory: a second daemon refuses to start."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "cynchrod.lock"
        self._file: IO[str] | None = None

    def __enter__(self) -> StateLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise StateLocked(
                f"state directory {self.path.parent} is in use by another cynchrod (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def build(cfg: config.Settings) -> reconciler.Reconciler:
    if not cfg.repo:
        raise CynchrodError("--repo (or CYNCHROD_REPO) is required", code="usage")
    src = source.Source(cfg.repo, branch=cfg.branch, path=cfg.path, state_dir=cfg.state)
    rt = runtime.DockerRuntime(owner=cfg.owner, publish_address=cfg.publish_address,
                               stop_timeout=cfg.stop_timeout)
    db = store.Store(cfg.state / "cynchrod.db")
    return reconciler.Reconciler(src=src, rt=rt, db=db, concurrency=cfg.concurrency)


def print_result(result: reconciler.PassResult, out: IO[str]) -> None:
    print(f"commit {result.commit or '-'} ({result.duration_s:.2f}s)", file=out)
    if result.source_error:
        print(f"source error: {result.source_error}", file=out)
    for err in result.manifest_errors:
        print(err, file=out)
    for app in result.apps:
        detail = "; ".join(app.actions) or "in sync"
        if app.error:
            detail += f" -- {app.error}"
        print(f"{app.org}/{app.name}\t{app.status}\t{detail}", file=out)


def cmd_validate(paths: Sequence[str], out: IO[str]) -> int:
    files: list[tuple[str, str]] = []
    for raw in paths:
        p = pathlib.Path(raw)
        if p.is_dir():
            root = p / source.APPS_DIR if (p / source.APPS_DIR).is_dir() else p
            files.extend((str(f), str(f)) for f in sorted(root.rglob("*")) if manifests.is_manifest_path(f.name))
        else:
            files.append((str(p), str(p)))
    try:
        desired = manifests.Cache().load(files, lambda f: pathlib.Path(f).read_bytes())
    except OSError as exc:
        print(f"{exc.filename}:0: not_found: {exc.strerror}", file=out)
        return 1
    for err in desired.errors:
        print(err, file=out)
    print(f"{len(files)} file(s), {len(desired.apps)} valid app(s), {len(desired.errors)} error(s)",
          file=sys.stderr)
    return 1 if desired.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CYNCHROD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = sys.stdout
    try:
        if args.command == "validate":
            return cmd_validate(args.paths, out)
        cfg = settings(args)
        if args.command == "plan":
            rec = build(cfg)
            result, actions = rec.preview()
            if result.source_error:
                print(f"source error: {result.source_error}", file=out)
            for err in result.manifest_errors:
                print(err, file=out)
            for action in actions:
                print(action.describe(), file=out)
            if not actions:
                print("nothing to do", file=out)
            return 0
        with StateLock(cfg.state):
            rec = build(cfg)
            rec.store.interrupt_unfinished()
            if args.command == "sync":
                result = rec.run_pass("poll")
                print_result(result, out)
                return 0 if result.ok else 1
            return serve(rec, cfg)
    except CynchrodError as exc:
        print(f"cynchrod: {exc}", file=sys.stderr)
        return 2


def serve(rec: reconciler.Reconciler, cfg: config.Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("cynchrod %s serving %s (branch %s) every %ss, state %s", __version__, rec.source.url,
             cfg.branch, cfg.interval, cfg.state)
    rec.serve(interval=cfg.interval, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
