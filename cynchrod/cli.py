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
import sys
from collections.abc import Sequence
from typing import IO, Any

from cynchrod import __version__, config, daemon, manifests, reconciler, secrets, source, store
from cynchrod.errors import CynchrodError, StateLocked

log = logging.getLogger("cynchrod")


def _env(name: str) -> str | None:
    return os.environ.get("CYNCHROD_" + name.upper().replace("-", "_"))


def _add_source_flags(p: argparse.ArgumentParser, *, daemon: bool) -> None:
    p.add_argument("--repo", action="append",
                   help="manifests repository: local path, file://, https:// or ssh URL (repeatable)")
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
    rb = sub.add_parser("rollback", help="commit an app's manifest as of a previous successful deployment")
    rb.add_argument("app", metavar="APP", help="app id, or ORG/NAME")
    rb.add_argument("--to", type=int, metavar="DEPLOYMENT_ID", help="default: the previous different one")
    _add_source_flags(rb, daemon=False)
    t = sub.add_parser("token", help="API tokens: create, list, revoke")
    tsub = t.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="make a token and print it (only this once)")
    tc.add_argument("--org", required=True, help="the org the token acts for")
    tc.add_argument("--admin", action="store_true", help="see and act on every org")
    tc.add_argument("--name", help="a name for the token (in commit messages and logs)")
    tl = tsub.add_parser("list", help="list tokens (never their values)")
    tr = tsub.add_parser("revoke", help="revoke a token by id or name; its open log streams close")
    tr.add_argument("token", metavar="ID_OR_NAME")
    for tp in (tc, tl, tr):
        tp.add_argument("--state", help="state directory (default ./state)")
    sec = sub.add_parser("secret", help="secrets: set (value from stdin), delete, list names")
    ssub = sec.add_subparsers(dest="secret_command", required=True)
    ss = ssub.add_parser("set", help="set ORG/NAME to the bytes read from stdin")
    sd = ssub.add_parser("delete", help="delete ORG/NAME")
    for sp in (ss, sd):
        sp.add_argument("ref", metavar="ORG/NAME")
    sl = ssub.add_parser("list", help="list an org's secret names (never values)")
    sl.add_argument("org", metavar="ORG")
    for sp in (ss, sd, sl):
        sp.add_argument("--state", help="state directory (default ./state)")
    return p


def settings(args: argparse.Namespace) -> config.Settings:
    """Merge flags, CYNCHROD_* variables, the config file and defaults."""
    file_path = args.config or _env("config")
    values: dict[str, Any] = config.load_file(pathlib.Path(file_path)) if file_path else {}
    if file_path:
        values["config_path"] = str(file_path)
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
    return daemon.Daemon.build(cfg).reconciler


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
        elif not p.is_file():
            print(f"{p}:0: not_found: No such file or directory", file=out)
            return 1
        else:
            files.append((str(p), str(p)))
    # A file that cannot be read is that file's error (``unreadable``), like any other.
    desired = manifests.Cache().load(files, lambda f: pathlib.Path(f).read_bytes())
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
        if args.command == "token":
            return cmd_token(args, out)
        if args.command == "secret":
            return cmd_secret(args, out)
        cfg = settings(args)
        if args.command == "rollback":
            return cmd_rollback(args, cfg, out)
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
            if args.command == "sync":
                rec = build(cfg)
                rec.store.interrupt_unfinished()
                result = rec.run_pass("poll")
                print_result(result, out)
                return 0 if result.ok else 1
            if not cfg.sources:
                raise CynchrodError("--repo (or CYNCHROD_REPO) is required", code="usage")
            log.info("cynchrod %s following %s every %ss, state %s", __version__,
                     ", ".join(f"{c.repo} ({c.branch}{', org ' + c.org if c.org else ''})" for c in cfg.sources),
                     cfg.interval, cfg.state)
            daemon.Server(cfg, rebuild=lambda: settings(args)).run()
            return 0
    except CynchrodError as exc:
        print(f"cynchrod: {exc}", file=sys.stderr)
        return 2


def cmd_rollback(args: argparse.Namespace, cfg: config.Settings, out: IO[str]) -> int:
    d = daemon.Daemon.build(cfg)
    app = d.store.app(args.app)
    if app is None and "/" in args.app:
        org, _, name = args.app.partition("/")
        app = d.store.live_apps().get((org, name))
    if app is None:
        raise CynchrodError(f"no app {args.app}", code="not_found")
    for src in d.reconciler.sources:
        src.fetch()
    accepted = d.control.rollback(app, actor="cli", deployment_id=args.to)
    print(accepted.commit or "nothing to change", file=out)
    return 0


def cmd_secret(args: argparse.Namespace, out: IO[str]) -> int:
    state = pathlib.Path(args.state or _env("state") or "state")
    db = store.Store(state / "cynchrod.db")
    try:
        vault = secrets.Secrets(db, state_dir=state)
        if args.secret_command == "list":
            for name, updated in db.secret_names(args.org):
                print(f"{name}\t{updated}", file=out)
            return 0
        org, _, name = args.ref.partition("/")
        vault.check_name(org, name)  # before reading stdin
        if args.secret_command == "set":
            vault.set(org, name, sys.stdin.buffer.read())
            print(f"set {org}/{name}; apps using it are redeployed on the next pass", file=sys.stderr)
        elif not vault.delete(org, name):
            print(f"cynchrod: not_found: no secret {org}/{name}", file=sys.stderr)
            return 1
        return 0
    finally:
        db.close()


def cmd_token(args: argparse.Namespace, out: IO[str]) -> int:
    state = pathlib.Path(args.state or _env("state") or "state")
    db = store.Store(state / "cynchrod.db")
    try:
        if args.token_command == "create":
            if not config.ORG_RE.match(args.org):
                raise CynchrodError(f"--org {args.org!r} is not a DNS label", code="usage")
            _, secret = db.create_token(org=args.org, name=args.name or f"{args.org}-token", admin=args.admin)
            print(secret, file=out)
        elif args.token_command == "list":
            for t in db.tokens():
                print(f"{t.id}\t{t.name}\t{t.org}\t{'admin' if t.admin else '-'}\t{t.created_at}\t"
                      f"{'revoked ' + t.revoked_at if t.revoked_at else 'live'}", file=out)
        elif db.revoke_token(args.token) == 0:
            print(f"cynchrod: not_found: no live token {args.token!r}", file=sys.stderr)
            return 1
        return 0
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
