"""The API client behind ``cynchrod apps|status|logs|deployments|restart|stop|start|delete|wait``.

Called by ``cli`` only. It talks to a running daemon over HTTP (urllib) and, for
``logs -f``, a WebSocket (simple-websocket, which flask-sock already brings).
``APP`` is ``ORG/NAME`` (looked up with ``GET /apps/by-name/ORG/NAME``) or an
app id. Output is an aligned table, or with ``-o json`` the API's JSON as is.
API errors are raised as ``ClientError`` with the API's stable code.
"""

from __future__ import annotations

import calendar
import contextlib
import http.client
import json
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import IO, Any

from cynchrod.core.codes import Code
from cynchrod.core.errors import ClientError as ClientError

DEFAULT_API = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0
#: WebSocket close codes of the log stream and the error code each is said with. Every end of
#: a followed stream is an error (exit 1): ``logs -f`` follows until Ctrl-C or SIGTERM.
_CLOSE_REASONS = {4401: "unauthorized", 4404: "not_found", 4429: "too_many_streams", 1011: "docker_unavailable"}
#: Close messages (with 1000) that name their own code.
_CLOSE_MESSAGES = {"app_removed": "the app was removed (deleted from the repository); its history stays: "
                                  "cynchrod status APP"}


class Client:
    def __init__(self, api: str, token: str, *, timeout: float = TIMEOUT_S) -> None:
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, *, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.api + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read())
                code, message = str(answer["error"]), str(answer["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", f"{exc.code} {exc.reason}"
            raise ClientError(message, code=code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # Refused, reset, or cut mid-answer (the daemon stopped or was killed): one line, exit 1.
            raise self.unreachable(getattr(exc, "reason", exc)) from None
        except ValueError:
            raise ClientError(f"the API at {self.api} answered {method} {path} with something that is not "
                              "JSON; is --api the daemon's address?", code="api_unreachable") from None

    def unreachable(self, reason: object) -> ClientError:
        return ClientError(f"cannot reach the API at {self.api} ({reason or type(reason).__name__}); is "
                           "`cynchrod serve` running? Set --api or CYNCHROD_API", code="api_unreachable")

    def details(self, ref: str) -> dict[str, Any]:
        """``{"app", "webhook", "deployments"}`` of ``ORG/NAME`` or an app id."""
        if "/" in ref:
            org, _, name = ref.partition("/")
            path = f"/apps/by-name/{urllib.parse.quote(org, safe='')}/{urllib.parse.quote(name, safe='')}"
        else:
            path = f"/apps/{urllib.parse.quote(ref, safe='')}"
        found: dict[str, Any] = self.call("GET", path)
        return found


# -- output -----------------------------------------------------------------------


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], out: IO[str]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    cells = [[str(h) for h in headers], *[["-" if c in (None, "") else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def age(stamp: str | None, now: float | None = None) -> str:
    """``2026-11-29T16:43:13Z`` as ``5s``, ``3m``, ``2h``, ``4d``."""
    if not stamp:
        return "-"
    try:
        then = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return stamp
    seconds = max(0, int((now if now is not None else time.time()) - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ports(app: dict[str, Any]) -> str:
    if app.get("port") is None:
        return ""
    return f"{app['host_port']}->{app['port']}" if app.get("host_port") else str(app["port"])


def _error(text: str | None, width: int = 60) -> str:
    line = (text or "").splitlines()[0] if text else ""
    return line if len(line) <= width else line[:width - 1] + "…"


def status_text(app: dict[str, Any]) -> str:
    """The status word, and for a failed app whose earlier version serves, that it does."""
    if app["status"] == "failed" and app.get("serving") == "previous":
        return "failed — previous version running"
    return str(app["status"])


def health_text(app: dict[str, Any]) -> str:
    """The app's health in Argo CD's words (``progressing``, ``healthy``, ``degraded``), "" from an older API."""
    return str(app.get("health") or "")


def update_text(u: dict[str, Any]) -> str:
    """One service's image update state (``GET /apps/ID``'s ``updates``) on one line."""
    if u.get("update_available"):
        text = f"update available: {u.get('candidate')}"
    else:
        text = str(u.get("reason") or "not checked yet")
        if u.get("candidate") and u.get("reason") != "committed":
            text += f" (newest: {u['candidate']})"
        elif u.get("reason") == "committed":
            text += f" {u.get('bumped_to')} in {(u.get('bumped_commit') or '')[:12]}"
    if u.get("paused"):
        text += ", paused after a rollback until the manifest changes"
    if u.get("error_code"):
        text += f"; {u['error_code']}: {u.get('error')}"
    return f"{text}; checked {u.get('checked_at') or 'never'}"


def _dump(data: Any, out: IO[str]) -> None:
    print(json.dumps(data, indent=2), file=out)


# -- commands -----------------------------------------------------------------------


def apps(client: Client, *, output: str, include_removed: bool, out: IO[str]) -> int:
    listed = client.call("GET", "/apps" + ("?include_removed=1" if include_removed else ""))
    if output == "json":
        _dump(listed, out)
        return 0
    rows: list[tuple[object, ...]] = [
        (a["id"], f"{a['org']}/{a['name']}", status_text(a), a.get("image"), _ports(a), age(a.get("updated_at")),
         _error(a.get("last_error"))) for a in listed["apps"]]
    rows += _problem_rows(listed.get("problems") or [])
    table(rows, ("ID", "APP", "STATUS", "IMAGE", "PORTS", "UPDATED", "LAST ERROR"), out)
    return 0


def _problem_rows(problems: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """A row per broken file that declares no deployed app: no id, its path for the app, its first error."""
    by_path: dict[str, list[dict[str, Any]]] = {}
    for p in problems:
        by_path.setdefault(p["path"], []).append(p)
    rows: list[tuple[object, ...]] = []
    for path, found in by_path.items():
        first = found[0]
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        text = f"{path}:{first['line']}: {first['code']}: {first['message']}"
        rows.append(("-", path, "failed", None, None, None, _error(text, 80 - len(more)) + more))
    return rows


def _deployment_rows(deployments: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    return [(d["id"], d["status"], d["trigger"], (d.get("commit") or "")[:12], age(d.get("started_at")),
             d.get("error_code"), _error(d.get("error"))) for d in deployments]


_DEPLOYMENT_HEADERS = ("ID", "STATUS", "TRIGGER", "COMMIT", "STARTED", "CODE", "ERROR")


def _domains(app: dict[str, Any]) -> str:
    """The app's domain, then each service's own as ``DOMAIN (SERVICE)``."""
    own = [app["domain"]] if app.get("domain") else []
    return ", ".join([*own, *(f"{s['domain']} ({s['name']})" for s in app.get("services") or [] if s.get("domain"))])


def status(client: Client, ref: str, *, output: str, out: IO[str]) -> int:
    found = client.details(ref)
    if output == "json":
        _dump(found, out)
        return 0
    app = found["app"]
    fields = [("app", f"{app['org']}/{app['name']}"), ("id", app["id"]), ("status", status_text(app)),
              ("health", health_text(app)),
              ("image", app.get("image")), ("ports", _ports(app)), ("domain", _domains(app)),
              ("container", (app.get("container_id") or "")[:12]), ("commit", (app.get("commit") or "")[:12]),
              ("path", app.get("path")), ("updated", f"{app.get('updated_at')} ({age(app.get('updated_at'))} ago)"),
              ("last error", app.get("last_error"))]
    if found.get("webhook"):
        fields.append(("webhook", found["webhook"]["url"]))
    for u in found.get("updates") or []:
        fields.append((f"update {u['service']}", update_text(u)))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key + ':':<{width + 1}} {value if value not in (None, '') else '-'}", file=out)
    if found["deployments"]:
        print("", file=out)
        table(_deployment_rows(found["deployments"][:5]), _DEPLOYMENT_HEADERS, out)
    return 0


def deployments(client: Client, ref: str, *, output: str, out: IO[str]) -> int:
    found = client.details(ref)
    if output == "json":
        _dump(found["deployments"], out)
        return 0
    table(_deployment_rows(found["deployments"]), _DEPLOYMENT_HEADERS, out)
    return 0


def act(client: Client, action: str, ref: str, *, output: str, out: IO[str]) -> int:
    """restart, stop, start or delete: the commit is made by the daemon; print what was queued."""
    app = client.details(ref)["app"]
    method, path = ("DELETE", f"/apps/{app['id']}") if action == "delete" else ("POST", f"/apps/{app['id']}/{action}")
    reply = client.call(method, path)
    if output == "json":
        _dump(reply, out)
    elif reply["changed"]:
        print(f"{action} {app['org']}/{app['name']}: commit {reply['commit'][:12]}, deployment "
              f"{reply['deployment_id']} {reply['app']['status']}", file=out)
    else:
        print(f"{action} {app['org']}/{app['name']}: nothing to change (status {reply['app']['status']})", file=out)
    return 0


def _print_line(line: dict[str, Any], *, output: str, services: bool, out: IO[str]) -> None:
    if output == "json":
        print(json.dumps(line), file=out)
    else:
        print(f"{line['service']} | {line['line']}" if services else line["line"], file=out)
    out.flush()


def websocket(url: str) -> Any:
    """A WebSocket client (simple-websocket's) that also handles the frames that arrived in
    the same read as the handshake reply: a close sent at once (``4404``, ``4401``) or the
    first lines would otherwise wait for the next read, or be lost when the server hangs up."""
    import simple_websocket  # only ``logs -f`` (and tests) need it

    class _Client(simple_websocket.Client):  # type: ignore[misc]
        def _thread(self) -> None:
            self.connected = self._handle_events()
            if not self.connected:
                self.sock.close()
                return
            super()._thread()

    return _Client.connect(url)


def _closed(closed: Any, api: str) -> ClientError:
    """What a closed log stream means, as an error (``closed``: simple-websocket's ``ConnectionClosed``)."""
    message = (closed.message or "").strip()
    if closed.reason in _CLOSE_REASONS:
        return ClientError(f"the log stream was closed: {message}".strip(), code=_CLOSE_REASONS[closed.reason])
    if message in _CLOSE_MESSAGES:
        return ClientError(_CLOSE_MESSAGES[message], code=message)
    if closed.reason in (1005, 1006):  # no close frame: the connection dropped
        return ClientError(f"the connection to the API at {api} was lost (the daemon stopped, or the network "
                           "dropped)", code="stream_closed")
    return ClientError(f"the daemon ended the log stream ({closed.reason} {message})".replace(" )", ")"),
                       code="stream_closed")


def _stop_on(signum: int, frame: object) -> None:
    """``logs -f`` ended by a signal: the stream is closed and the command exits 128 + the signal,
    as a shell reports a process the signal ended (``SystemExit``: like Ctrl-C's ``KeyboardInterrupt``,
    no ``except Exception`` on the way catches it)."""
    raise SystemExit(128 + signum)


def logs(client: Client, ref: str, *, tail: int, follow: bool, output: str, out: IO[str]) -> int:
    """The last ``tail`` lines; with ``follow``, then every new line until Ctrl-C or SIGTERM.

    For ``follow`` the stream is opened before the tail is read, so no line falls
    between them; lines that are in both are printed once. Any end of the stream
    other than a signal (the app removed, the daemon gone) is a ``ClientError``.
    """
    app = client.details(ref)["app"]
    if not follow:
        return _print_tail(client, app, tail=tail, output=output, out=out)[0]
    import simple_websocket  # only ``logs -f`` needs it

    # SIGTERM (kill, systemd, a supervisor) ends the stream as Ctrl-C does: closed, no traceback.
    previous = signal.signal(signal.SIGTERM, _stop_on)
    ws = None
    try:
        ticket = client.call("POST", f"/apps/{app['id']}/logs/ticket")["ticket"]
        url = client.api.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            ws = websocket(f"{url}/apps/{app['id']}/logs/stream?ticket={ticket}")
        except (OSError, simple_websocket.ConnectionError) as exc:
            raise client.unreachable(exc) from None
        _, services, seen, newest = _print_tail(client, app, tail=tail, output=output, out=out)
        while True:
            try:
                message = ws.receive()
            except simple_websocket.ConnectionClosed as closed:
                raise _closed(closed, client.api) from None
            batch = json.loads(message)  # a JSON array of lines (one object from an older daemon)
            for line in batch if isinstance(batch, list) else [batch]:
                if line["timestamp"] <= newest and (line["timestamp"], line["service"], line["line"]) in seen:
                    continue
                _print_line(line, output=output, services=services or line["service"] != "main", out=out)
    except KeyboardInterrupt:
        return 130
    except SystemExit as stopped:
        return int(stopped.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ws is not None:
            with contextlib.suppress(simple_websocket.ConnectionClosed):  # the server closed it first
                ws.close()


def _print_tail(client: Client, app: dict[str, Any], *, tail: int, output: str,
                out: IO[str]) -> tuple[int, bool, set[tuple[str, str, str]], str]:
    """Print the last ``tail`` lines; (exit status, several services, the lines seen, the newest timestamp)."""
    lines = client.call("GET", f"/apps/{app['id']}/logs?tail={tail}")["lines"]
    services = len({line["service"] for line in lines}) > 1 or any(line["service"] != "main" for line in lines)
    for line in lines:
        _print_line(line, output=output, services=services, out=out)
    seen = {(line["timestamp"], line["service"], line["line"]) for line in lines}
    return 0, services, seen, max((line["timestamp"] for line in lines), default="")


#: Statuses an app stays in (a pass's outcome is final for it), and those of them that are failures.
SETTLED = frozenset({"running", "stopped", "failed", "removed", "completed", "crashed", "unhealthy", "rolled_back"})
FAILING = frozenset({"failed", "crashed", "unhealthy", "rolled_back"})


def _outcome(client: Client, commit: str) -> tuple[str | None, list[dict[str, Any]]] | None:
    """(the pass's source error, each app's org, app, status and error) once a pass that applied
    ``commit`` is over and its apps have settled; None while not yet.

    The pass a webhook queued (``GET /passes?commit=``) when there is one; else (a push seen by the
    interval or a watch) the apps the last pass recorded at that commit, once ``/healthz`` says the
    last pass read it."""
    done = [p for p in client.call("GET", f"/passes?commit={urllib.parse.quote(commit)}")["passes"]
            if p["status"] == "done"]
    if done:
        error, apps = done[0]["source_error"], list(done[0]["apps"])
    else:
        health = _healthz(client)
        last = str((health.get("last_pass") or {}).get("commit") or "")
        if not last.startswith(commit.lower()):
            return None
        error = None
        apps = [{"org": a["org"], "app": a["name"], "status": a["status"], "error": a["last_error"]}
                for a in client.call("GET", "/apps")["apps"] if str(a.get("commit") or "").startswith(commit.lower())]
    settled = []
    for app in apps:
        if app["status"] not in SETTLED:  # queued behind a build, or still deploying: its row says more
            row = client.details(f"{app['org']}/{app['app']}")["app"]
            if row["status"] not in SETTLED:
                return None
            app = {**app, "status": row["status"], "error": row["last_error"]}
        settled.append(app)
    return error, settled


def _healthz(client: Client) -> dict[str, Any]:
    request = urllib.request.Request(client.api + "/healthz", headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=client.timeout) as response:
            found: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 while unhealthy: the body still says what the last pass read
        found = json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise client.unreachable(getattr(exc, "reason", exc)) from None
    return found


def wait(client: Client, commit: str, *, timeout: float, output: str, out: IO[str],
         every: float = 1.0) -> int:
    """Wait until the daemon has applied ``commit`` and its apps have settled; 0 when none failed, 1 else
    (and ``wait_timeout`` when that did not happen within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = _outcome(client, commit)
        except ClientError as exc:
            # A daemon restarting (or not up yet) is waited for too, within the same time.
            if exc.code != Code.API_UNREACHABLE or time.monotonic() >= deadline:
                raise
            found = None
        if found is not None:
            error, apps = found
            failed = bool(error) or any(a["status"] in FAILING for a in apps)
            if output == "json":
                _dump({"commit": commit, "failed": failed, "source_error": error, "apps": apps}, out)
            else:
                table([(f"{a['org']}/{a['app']}", a["status"], _error(a.get("error"))) for a in apps],
                      ("APP", "STATUS", "ERROR"), out)
                if error:
                    print(f"source error: {error}", file=out)
            return 1 if failed else 0
        if time.monotonic() >= deadline:
            raise ClientError(f"commit {commit} was not applied within {timeout:g}s", code=Code.WAIT_TIMEOUT)
        time.sleep(every)
