"""The ``cynchrod`` command: serve, sync, plan, validate.

About 500 lines: the argument parser and one small function per command; the API client is
``client``.

Every flag also reads a ``CYNCHROD_<FLAG>`` environment variable (``--state``
is ``CYNCHROD_STATE``); precedence is flag, then environment, then the
``--config`` file, then the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from cynchrod import __version__
from cynchrod.cli import client
from cynchrod.core.errors import CynchrodError, StateLocked

if TYPE_CHECKING:
    from cynchrod import daemon
    from cynchrod.desired import config
    from cynchrod.shell import reconciler

#: ``config.RUNTIMES``, here so that the parser (every command's, a client's too) imports no
#: daemon module: a client command starts in a tenth of the time (tests/unit/test_cli_imports.py).
RUNTIMES = ("docker", "swarm")

log = logging.getLogger("cynchrod")


def _env(name: str) -> str | None:
    return os.environ.get(_env_name(name))


def _env_name(dest: str) -> str:
    return "CYNCHROD_" + dest.upper().replace("-", "_")


def _flag(p: argparse.ArgumentParser, *names: str, help: str, from_env: bool = True, **kw: Any) -> None:
    """A flag whose help names its ``CYNCHROD_*`` variable.

    ``from_env``: the variable is its default here. Settings flags leave that to
    ``settings()`` (flag, then variable, then the config file, then the default).
    """
    dest = kw.get("dest") or names[-1].lstrip("-").replace("-", "_")
    var = _env_name(dest)
    if from_env and (raw := os.environ.get(var)) is not None:
        kw["default"] = raw.lower() in ("1", "true", "yes", "on") if kw.get("action") == "store_true" else raw
    p.add_argument(*names, help=f"{help} [{var}]", **kw)


def _settings_flags(p: argparse.ArgumentParser, *names: str) -> None:
    """The daemon's settings flags that ``p`` uses, in a fixed order."""
    flags: dict[str, tuple[str, dict[str, Any]]] = {
        "repo": ("manifests repository: local path, file://, https:// or ssh URL (repeatable)",
                 {"action": "append", "metavar": "URL_OR_PATH"}),
        "branch": ("branch to follow (default main)", {"metavar": "NAME"}),
        "path": ("directory inside the repository that holds apps/ (default: the root)", {"metavar": "DIR"}),
        "state": ("state directory (default ./state)", {"metavar": "DIR"}),
        "config": ("operator config file (YAML)", {"metavar": "FILE"}),
        "owner": ("label namespace of the containers this daemon owns (default cynchrod)", {"metavar": "NAME"}),
        "publish-address": ("host address ports are published on (default 127.0.0.1)", {"metavar": "IP"}),
        "concurrency": ("apps applied at once (default 4)", {"type": int, "metavar": "N"}),
        "stop-timeout": ("seconds a container gets to stop (default 10)", {"type": int, "metavar": "SECONDS"}),
        "interval": ("seconds between passes (default 30)", {"type": float, "metavar": "SECONDS"}),
        "resync": ("seconds between full relists of the engine (default 300)", {"type": float, "metavar": "SECONDS"}),
        "watch": ("on: a push into a local repository or a save in a working tree applies at once (default on)",
                  {"choices": ("on", "off")}),
        "edge": ("Caddy's admin API URL, e.g. http://127.0.0.1:2019: route each app's domain", {"metavar": "URL"}),
        "edge-listen": ("address of the edge's plain-HTTP server (default :80)", {"metavar": "ADDRESS"}),
        "edge-tls-listen": ("address of the edge's HTTPS server (default: none)", {"metavar": "ADDRESS"}),
        "edge-ready-timeout": ("seconds a zero-downtime deploy waits for the new container (default 60)",
                               {"type": float, "metavar": "SECONDS"}),
        "edge-drain": ("seconds the old container keeps serving after the switch (default 2)",
                       {"type": float, "metavar": "SECONDS"}),
        "listen": ("API address (default 127.0.0.1:8080)", {"metavar": "HOST:PORT"}),
        "runtime": ("docker: one engine; swarm: a swarm manager (DOCKER_HOST) (default docker)",
                    {"choices": RUNTIMES}),
        "workers": ("API worker processes beside the reconciler process (default 0: one per core)",
                    {"type": int, "metavar": "N"}),
        "auth-failures": ("wrong credentials a client address may send before it backs off with 429 (default 10)",
                          {"type": int, "metavar": "N"}),
    }
    for name in names:
        text, kw = flags[name]
        _flag(p, f"--{name}", help=text, from_env=False, **kw)


_SOURCE = ("repo", "branch", "path", "state", "config")
_APPLY = ("owner", "publish-address", "concurrency", "stop-timeout", "runtime", "edge", "edge-listen",
          "edge-tls-listen", "edge-ready-timeout", "edge-drain")


def _client_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--api", metavar="URL", help=f"the daemon's API URL (default {client.DEFAULT_API})")
    _flag(p, "--token", metavar="TOKEN", help="API token (cynchrod token create prints one)")
    _flag(p, "-o", "--output", choices=("table", "json"), default="table", help="output format")


def _sub(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand with a one-line description (in the list and atop its own --help)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=text)
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cynchrod", description="GitOps reconciler for Docker hosts.",
        epilog="Every flag also reads the CYNCHROD_* variable shown in brackets; a flag wins over it. "
               "`cynchrod COMMAND --help` shows a command's own flags.")
    p.add_argument("--version", action="version", version=f"cynchrod {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _settings_flags(_sub(sub, "serve", "run the daemon: reconcile every interval and serve the API"),
                    *_SOURCE, *_APPLY, "interval", "resync", "watch", "listen", "workers",
                    "auth-failures")
    _settings_flags(_sub(sub, "sync", "run one pass now, showing progress, and print a summary"), *_SOURCE, *_APPLY)
    _settings_flags(_sub(sub, "plan", "print what a pass would do, with reasons; change nothing"),
                    *_SOURCE, "owner", "publish-address")
    v = _sub(sub, "validate", "validate manifest files or a checkout, offline")
    v.add_argument("paths", nargs="+", metavar="PATH")
    c = _sub(sub, "convert", "print a native manifest as a compose file, or a compose file as a native "
             "manifest; what the other format cannot say is warned on stderr")
    c.add_argument("file", metavar="FILE")
    rb = _sub(sub, "rollback", "commit an app's manifest as of a previous successful deployment")
    rb.add_argument("app", metavar="APP", help="app id, or ORG/NAME")
    _flag(rb, "--to", type=int, metavar="DEPLOYMENT_ID",
          help="the deployment to go back to (default: the last that ran and differs)")
    _settings_flags(rb, *_SOURCE)

    ls = _sub(sub, "apps", "list apps: id, status, image, ports, last error")
    _flag(ls, "--all", action="store_true", help="include removed apps")
    _client_flags(ls)
    for name, text in (("status", "an app's details and its last deployments"),
                       ("deployments", "an app's deployment history (last 20)"),
                       ("restart", "recreate an app's containers (commits restartedAt)"),
                       ("stop", "stop an app (commits state: stopped)"),
                       ("start", "start a stopped app (commits state: running)"),
                       ("delete", "delete an app (commits the removal of its manifest)")):
        c = _sub(sub, name, text)
        c.add_argument("app", metavar="APP", help="ORG/NAME or app id")
        _client_flags(c)
    lg = _sub(sub, "logs", "print an app's last log lines; -f follows new ones")
    lg.add_argument("app", metavar="APP", help="ORG/NAME or app id")
    _flag(lg, "--tail", type=int, default=200, metavar="N", help="lines to print first, 1-2000 (default 200)")
    _flag(lg, "-f", "--follow", action="store_true",
          help="keep printing new lines until Ctrl-C or SIGTERM; exit 1 when the stream ends otherwise "
               "(the app removed, the daemon gone)")
    _client_flags(lg)
    wt = _sub(sub, "wait", "wait until a commit is applied and its apps settle; exit 1 when one failed")
    _flag(wt, "--commit", required=True, metavar="SHA", help="the commit (7 to 40 hex digits) a push delivered")
    _flag(wt, "--timeout", type=float, default=600.0, metavar="SECONDS",
          help="give up (wait_timeout, exit 1) after this long (default 600)")
    _client_flags(wt)

    t = _sub(sub, "token", "API tokens: create, list, revoke")
    tsub = t.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tc = _sub(tsub, "create", "make a token and print it (only this once)")
    _flag(tc, "--org", required="CYNCHROD_ORG" not in os.environ, help="the org the token acts for")
    _flag(tc, "--admin", action="store_true", help="see and act on every org")
    _flag(tc, "--name", help="a name for the token (in commit messages and logs)")
    tl = _sub(tsub, "list", "list tokens (never their values)")
    tr = _sub(tsub, "revoke", "revoke a token by id or name; its open log streams close")
    tr.add_argument("token", metavar="ID_OR_NAME")
    for tp in (tc, tl, tr):
        _settings_flags(tp, "state")
    sec = _sub(sub, "secret", "secrets: set (value from stdin), delete, list names")
    ssub = sec.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    ss = _sub(ssub, "set", "set ORG/NAME to the bytes read from stdin")
    sd = _sub(ssub, "delete", "delete ORG/NAME")
    for sp in (ss, sd):
        sp.add_argument("ref", metavar="ORG/NAME")
    sl = _sub(ssub, "list", "list an org's secret names (never values)")
    sl.add_argument("org", metavar="ORG")
    for sp in (ss, sd, sl):
        _settings_flags(sp, "state")
    return p


def settings(args: argparse.Namespace) -> config.Settings:
    """Merge flags, CYNCHROD_* variables, the config file and defaults."""
    from cynchrod.desired import config
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
    from cynchrod.desired import declared, manifests, source
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
    desired = declared.Cache().load(files, lambda f: pathlib.Path(f).read_bytes())
    for err in desired.errors:
        print(err, file=out)
    print(f"{len(files)} file(s), {len(desired.apps)} valid app(s), {len(desired.errors)} error(s)",
          file=sys.stderr)
    return 1 if desired.errors else 0


def cmd_convert(path: str, out: IO[str]) -> int:
    """``cynchrod convert FILE``: a compose file (with its directory: ``.env``, overrides, included
    files) as a native manifest, or a native manifest as a compose file; offline."""
    from cynchrod.desired import compose, convert, manifests
    p = pathlib.Path(path)
    if not p.is_file():
        print(f"{p}:0: not_found: No such file or directory", file=sys.stderr)
        return 1
    if compose.is_compose_file(p.name):
        key = p.resolve().parent.name or "app"
        files = {f"{key}/{f.relative_to(p.parent).as_posix()}": f.read_bytes()
                 for f in sorted(p.parent.rglob("*"))
                 if f.is_file() and not f.is_symlink() and f.stat().st_size <= manifests.MAX_MANIFEST_BYTES
                 and (not f.name.startswith(".") or f.name == ".env")}
        result = compose.parse(key, files)
        writer = convert.to_native
    else:
        result = manifests.parse(str(p), p.read_bytes())
        writer = convert.to_compose
    if result.spec is None:
        for err in result.errors:
            print(err, file=sys.stderr)
        return 1
    text, warnings = writer(result.spec)
    out.write(text)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


CLIENT_COMMANDS = ("apps", "status", "deployments", "logs", "restart", "stop", "start", "delete", "wait")


#: Exit status when the reader of stdout went away (``cynchrod apps | head``): what a shell
#: reports for a process SIGPIPE ended (128 + 13), which ``git``, ``cat`` and the rest exit with
#: there. A ``pipefail`` script sees the same status from cynchrod as from any Unix tool, and it
#: is neither an API error (1) nor a usage error (2). Python ignores SIGPIPE (so that a socket's
#: EPIPE is an exception, not death: the API connection must never kill the command silently),
#: so the closed pipe is caught here instead, as its documentation's "Note on SIGPIPE" does.
PIPE_CLOSED = 141
#: Ctrl-C: 128 + SIGINT, as a shell reports it.
INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status. A closed stdout is quiet: no traceback, no message."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then this function's to handle
        return status
    except BrokenPipeError:
        # The rest of the output (Python flushes it at exit) goes nowhere rather than failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return PIPE_CLOSED
    except KeyboardInterrupt:
        # Ctrl-C before a command set up its own handling (``serve`` while it still imports, say):
        # the status a shell shows for SIGINT, no traceback.
        return INTERRUPTED


def _main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("CYNCHROD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # "3 changes detected" at each push or save: our own line says what the change did.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    out = sys.stdout
    try:
        if args.command == "validate":
            return cmd_validate(args.paths, out)
        if args.command == "convert":
            return cmd_convert(args.file, out)
        if args.command in CLIENT_COMMANDS:
            return cmd_client(args, out)
        if args.command == "token":
            return cmd_token(args, out)
        if args.command == "secret":
            return cmd_secret(args, out)
        from cynchrod import daemon  # the daemon's modules: not for the commands above (RUNTIMES)

        cfg = settings(args)
        if args.command != "serve" or not (cfg.state / "cynchrod.db").exists():
            # A daemon that has run keeps serving its last good state through an outage of
            # its repository; a first start (or a one-shot command) on a typo is refused.
            for src in cfg.sources:
                check_repo(src.repo)
        if args.command == "rollback":
            existing_state(cfg.state)
            return cmd_rollback(args, cfg, out)
        if args.command == "plan":
            return cmd_plan(cfg, out)
        with StateLock(cfg.state):
            if args.command == "sync":
                one = daemon.Daemon.build(cfg)
                one.recover()
                rec = one.reconciler
                rec.log_manifest_errors = False  # print_result shows them
                rec.store.interrupt_unfinished()
                rec.progress = Progress(sys.stderr)
                result = rec.sync("poll")
                rec.progress.done()
                print_result(result, out)
                if one.notifier is not None:
                    # One attempt at what the pass has to tell (bounded by the delivery timeout); what
                    # fails stays in the outbox for the daemon, or the next sync.
                    one.notifier.drain(timeout=cfg.delivery.timeout_s + 1)
                return 0 if result.ok else 1
            if not cfg.sources:
                raise CynchrodError("--repo (or CYNCHROD_REPO) is required", code="usage")
            log.info("cynchrod %s following %s every %ss, state %s", __version__,
                     ", ".join(f"{c.repo} ({c.branch}{', org ' + c.org if c.org else ''})" for c in cfg.sources),
                     cfg.interval, cfg.state)
            return daemon.serve(cfg, rebuild=functools.partial(settings, args))
    except client.ClientError as exc:
        print(f"cynchrod: {exc}", file=sys.stderr)
        return 1
    except CynchrodError as exc:
        print(f"cynchrod: {exc}", file=sys.stderr)
        return 2


def check_repo(url: str) -> None:
    """A local ``--repo`` that is not there (or not a Git repository) is a usage error, said plainly."""
    if "://" in url and not url.startswith("file://"):
        return
    if ":" in url and "@" in url.split(":", 1)[0]:
        return  # git@host:path
    path = pathlib.Path(url.removeprefix("file://")).expanduser()
    if not path.exists():
        raise CynchrodError(f"--repo {url}: no such directory; give the path of a Git repository "
                            "(bare or a clone) or an https:// or ssh URL", code="usage")
    if not ((path / "HEAD").is_file() or (path / ".git").exists()):
        raise CynchrodError(f"--repo {url}: {path} is not a Git repository (no .git or HEAD in it)", code="usage")


def existing_state(state: pathlib.Path) -> pathlib.Path:
    """A state directory a command reads: it must be there (a typo never creates one)."""
    if not (state / "cynchrod.db").is_file():
        raise CynchrodError(f"no state directory at {state} (no cynchrod.db in it): pass --state DIR or set "
                            "CYNCHROD_STATE to the daemon's; `cynchrod serve` or `token create` makes one",
                            code="usage")
    return state


def cmd_plan(cfg: config.Settings, out: IO[str]) -> int:
    """What a pass would do. A state dir that is not there yet is not created (a temporary one is used),
    and the repositories are fetched into a scratch copy: a daemon may be using the state dir's mirrors.

    Each manifest error is printed once (on stdout, before the actions); any error, like a
    source error, makes the exit status 1: a file that cannot be applied is never "nothing to do"."""
    from cynchrod import daemon
    with tempfile.TemporaryDirectory(prefix="cynchrod-plan-") as scratch:
        if not cfg.state.exists():
            cfg = dataclasses.replace(cfg, state=pathlib.Path(scratch))
        rec = daemon.Daemon.build(cfg, mirrors=pathlib.Path(scratch)).reconciler
        rec.log_manifest_errors = False
        result, actions = rec.preview()
        rec.store.close()
    if result.source_error:
        print(f"cynchrod: source error: {result.source_error}", file=sys.stderr)
    for err in result.manifest_errors:
        print(err, file=out)
    for action in actions:
        print(action.describe(), file=out)
    if result.manifest_errors:
        files = len({e.split(":", 1)[0] for e in result.manifest_errors})
        print(f"cynchrod: {len(result.manifest_errors)} error(s) in {files} file(s): nothing is applied from "
              "them (an app they declare keeps its last good version)", file=sys.stderr)
    if result.source_error or result.manifest_errors:
        return 1  # never "nothing to do" when the repository could not be read, or a file is broken
    if not actions:
        print("nothing to do", file=out)
    return 0


class Progress:
    """``cynchrod sync`` progress: one redrawn line on a terminal, plain lines otherwise."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int, current: str) -> None:
        text = f"[{done}/{total}] {current}"
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r\x1b[K" + text[:width])
            self._drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        """Clear the redrawn line, so the summary starts on a clean one."""
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()


def cmd_client(args: argparse.Namespace, out: IO[str]) -> int:
    token = args.token
    if not token:
        raise CynchrodError("no API token: pass --token or set CYNCHROD_TOKEN "
                            "(`cynchrod token create --org ORG` prints one)", code="usage")
    api = client.Client(args.api or client.DEFAULT_API, token)
    if args.command == "apps":
        return client.apps(api, output=args.output, include_removed=args.all, out=out)
    if args.command == "status":
        return client.status(api, args.app, output=args.output, out=out)
    if args.command == "deployments":
        return client.deployments(api, args.app, output=args.output, out=out)
    if args.command == "wait":
        if not re.fullmatch(r"[0-9a-fA-F]{7,64}", args.commit):
            raise CynchrodError(f"--commit {args.commit}: give 7 to 40 hex digits of a commit id", code="usage")
        return client.wait(api, args.commit, timeout=args.timeout, output=args.output, out=out)
    if args.command == "logs":
        if not 1 <= args.tail <= 2000:
            raise CynchrodError(f"--tail {args.tail}: give a number of lines from 1 to 2000", code="usage")
        return client.logs(api, args.app, tail=args.tail, follow=args.follow, output=args.output, out=out)
    return client.act(api, args.command, args.app, output=args.output, out=out)


def cmd_rollback(args: argparse.Namespace, cfg: config.Settings, out: IO[str]) -> int:
    from cynchrod import daemon
    # A scratch copy of the mirrors: the daemon holding the state lock fetches into its own.
    with tempfile.TemporaryDirectory(prefix="cynchrod-rollback-") as scratch:
        return _rollback(args, daemon.Daemon.build(cfg, mirrors=pathlib.Path(scratch)), out)


def _rollback(args: argparse.Namespace, d: daemon.Daemon, out: IO[str]) -> int:
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


def _state_arg(args: argparse.Namespace) -> pathlib.Path:
    return pathlib.Path(args.state or _env("state") or "state")


def cmd_secret(args: argparse.Namespace, out: IO[str]) -> int:
    from cynchrod import store
    from cynchrod.desired import secrets
    state = _state_arg(args)
    if args.secret_command in ("set", "delete"):
        org, slash, name = args.ref.partition("/")
        if not slash or not org or not name:
            raise CynchrodError(f"{args.ref!r}: give the secret as ORG/NAME, e.g. default/db-password", code="usage")
        secrets.Secrets.check_name(org, name)  # before reading stdin
    # Secrets live beside the daemon's key: a mistyped --state never makes a new dir and key.
    existing_state(state)
    value = b""
    if args.secret_command == "set":
        value = sys.stdin.buffer.read()
        if not value:
            raise CynchrodError("no value on stdin; pipe it in, e.g. printf %s \"$VALUE\" | "
                                f"cynchrod secret set {args.ref}", code="usage")
    db = store.Store(state / "cynchrod.db")
    try:
        vault = secrets.Secrets(db, state_dir=state)
        if args.secret_command == "list":
            for name, updated in db.secret_names(args.org):
                print(f"{name}\t{updated}", file=out)
            return 0
        if args.secret_command == "set":
            vault.set(org, name, value)
            print(f"set {org}/{name}; apps using it are redeployed on the next pass", file=sys.stderr)
        elif not vault.delete(org, name):
            print(f"cynchrod: not_found: no secret {org}/{name}", file=sys.stderr)
            return 1
        return 0
    finally:
        db.close()


def cmd_token(args: argparse.Namespace, out: IO[str]) -> int:
    from cynchrod import store
    from cynchrod.desired import config
    state = _state_arg(args)
    if args.token_command == "create":
        if not config.ORG_RE.match(args.org):
            raise CynchrodError(f"--org {args.org!r} is not a DNS label", code="usage")
    else:
        existing_state(state)  # list and revoke read: never create a state dir
    db = store.Store(state / "cynchrod.db")
    try:
        if args.token_command == "create":
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
