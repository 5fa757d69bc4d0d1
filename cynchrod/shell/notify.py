"""Notifications and commit statuses: the notifier's thread, its targets and their wire shapes.

Runs in the reconciler process beside the passes, never inside one: a pass only writes status
changes to the store (its triggers do), and this thread turns them into messages in the outbox
(``store/outbox.py``) and delivers them on a small pool of its own, each attempt with a timeout.
A target that is down or slow therefore never delays or fails a pass. Failed attempts are
retried after ``backoff``, 2 ``backoff`` ... ``max_backoff`` seconds; after ``attempts`` tries a
message is dead (``GET /notifications?status=dead``, ``/metrics``). What each change means is
decided in ``core/notices.py``.

Targets: a generic webhook (the event JSON, HMAC-SHA256 signed in ``X-Cynchrod-Signature-256``),
any Apprise URL (this module is the only one that imports ``apprise``), and the forge's commit
statuses (GitHub, Gitea/Forgejo, GitLab, Bitbucket, each in its documented shape).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from cynchrod import store
from cynchrod.core import notices
from cynchrod.core.errors import CynchrodError
from cynchrod.desired import config

log = logging.getLogger("cynchrod.notify")
SIGNATURE_HEADER = "X-Cynchrod-Signature-256"
USER_AGENT = "cynchrod"
#: How often the notifier looks for status changes when nothing woke it (seconds).
POLL_S = 1.0


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def app_url(public_url: str, app_id: str) -> str | None:
    """The app's page on the dashboard, when ``publicUrl`` says where the dashboard is."""
    return f"{public_url}/ui/apps/{app_id}" if public_url else None


# -- the forges' documented request shapes --------------------------------------------------------

#: Our states in each forge's words.
FORGE_STATES = {
    "github": {notices.PENDING: "pending", notices.SUCCESS: "success", notices.FAILURE: "failure"},
    "gitea": {notices.PENDING: "pending", notices.SUCCESS: "success", notices.FAILURE: "failure"},
    "gitlab": {notices.PENDING: "running", notices.SUCCESS: "success", notices.FAILURE: "failed"},
    "bitbucket": {notices.PENDING: "INPROGRESS", notices.SUCCESS: "SUCCESSFUL", notices.FAILURE: "FAILED"},
}


def forge_request(forge: config.Forge, status: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(URL, headers, JSON body) of one commit status. ``status``: sha, state (ours), context,
    description, target_url (or None).

    GitHub: ``POST /repos/{owner}/{repo}/statuses/{sha}`` (Gitea/Forgejo: the same under /api/v1);
    GitLab: ``POST /projects/:id/statuses/:sha``; Bitbucket Cloud:
    ``POST /repositories/{workspace}/{repo}/commit/{sha}/statuses/build``."""
    sha, context = status["sha"], status["context"]
    state = FORGE_STATES[forge.kind][status["state"]]
    description = str(status.get("description") or "")[:140]
    target_url = status.get("target_url")
    if forge.kind in ("github", "gitea"):
        url = f"{forge.api_url}/repos/{forge.repository}/statuses/{sha}"
        auth = f"Bearer {forge.token}" if forge.kind == "github" else f"token {forge.token}"
        headers = {"Authorization": auth, "Accept": "application/vnd.github+json" if forge.kind == "github"
                   else "application/json"}
        if forge.kind == "github":
            headers["X-GitHub-Api-Version"] = "2022-11-28"
        body: dict[str, Any] = {"state": state, "context": context, "description": description}
        if target_url:
            body["target_url"] = target_url
    elif forge.kind == "gitlab":
        project = urllib.parse.quote(forge.repository, safe="")
        url = f"{forge.api_url}/projects/{project}/statuses/{sha}"
        headers = {"PRIVATE-TOKEN": forge.token}
        body = {"state": state, "name": context, "description": description}
        if target_url:
            body["target_url"] = target_url
    else:
        url = f"{forge.api_url}/repositories/{forge.repository}/commit/{sha}/statuses/build"
        headers = {"Authorization": f"Bearer {forge.token}"}
        # Bitbucket's key is at most 40 characters: a digest of the context when it is longer.
        key = context if len(context) <= 40 else "cynchrod-" + hashlib.sha256(context.encode()).hexdigest()[:31]
        body = {"key": key, "state": state, "name": context, "description": description,
                "url": target_url or forge.api_url}
    headers["Content-Type"] = "application/json"
    return url, headers, body


# -- turning changes into messages ----------------------------------------------------------------

class Targets:
    """The configured targets, re-read from the settings at each use (a reloaded config applies)."""

    def __init__(self, settings: Callable[[], config.Settings]) -> None:
        self._settings = settings

    @property
    def settings(self) -> config.Settings:
        return self._settings()

    def turn(self, changes: list[notices.Change],
             told: dict[str, str]) -> tuple[list[store.Message], dict[str, str | None]]:
        """Messages for ``changes`` (see ``store.Outbox.take_changes``)."""
        cfg = self.settings
        messages: list[store.Message] = []
        new_told: dict[str, str | None] = {}
        for change in changes:
            if change.kind in (notices.APP, notices.UPDATE):
                last = new_told[change.app_id] if change.app_id in new_told else told.get(change.app_id)
                event, now_told = notices.app_event(change, last)
                if now_told != last:
                    new_told[change.app_id] = now_told
                if event is None:
                    continue
                body = json.dumps(notices.event_json(change, event, url=app_url(cfg.public_url, change.app_id)),
                                  separators=(",", ":"))
                for target in cfg.notify:
                    if target.route.matches(event, change.org, change.app):
                        messages.append(store.Message(
                            dedupe=f"{target.id}:{change.id}", target=target.id, target_name=target.name,
                            kind=target.kind, event=event, org=change.org, app=change.app, body=body))
            elif cfg.forge is not None:
                state = notices.forge_state(change)
                if state is None or change.commit is None:
                    continue
                forge = cfg.forge
                status = {"sha": change.commit, "state": state, "context": f"cynchrod/{change.org}/{change.app}",
                          "description": _describe(state, change), "target_url": app_url(cfg.public_url,
                                                                                         change.app_id)}
                messages.append(store.Message(
                    dedupe=f"{forge.id}:{change.app_id}:{change.commit}:{state}", target=forge.id,
                    target_name=forge.name, kind="forge", event=f"commit_{state}", org=change.org, app=change.app,
                    body=json.dumps(status, separators=(",", ":"))))
        return messages, new_told

    def find(self, target_id: str) -> config.NotifyTarget | config.Forge | None:
        cfg = self.settings
        if cfg.forge is not None and cfg.forge.id == target_id:
            return cfg.forge
        return next((t for t in cfg.notify if t.id == target_id), None)


def _describe(state: str, change: notices.Change) -> str:
    if state == notices.PENDING:
        return "deploying"
    if state == notices.SUCCESS:
        return change.new
    code = change.code or change.failure_code
    return f"{change.new}: {code}" if code else change.new


# -- sending ---------------------------------------------------------------------------------------

def _post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> str | None:
    """POST; why it failed (no URL, no secret in it), or None."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"User-Agent": USER_AGENT, **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read(65536)
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"[:200]
    return None


def send(target: config.NotifyTarget | config.Forge, message: store.Notification, *, timeout: float) -> str | None:
    """One attempt: why it failed, or None when it was delivered."""
    body = message.body.encode()
    if isinstance(target, config.Forge):
        url, headers, payload = forge_request(target, json.loads(message.body))
        return _post(url, json.dumps(payload).encode(), headers, timeout=timeout)
    if target.kind == "webhook":
        headers = {"Content-Type": "application/json", "X-Cynchrod-Event": message.event,
                   "X-Cynchrod-Delivery": str(message.id)}
        if target.secret:
            headers[SIGNATURE_HEADER] = signature(target.secret, body)
        return _post(target.url, body, headers, timeout=timeout)
    return _apprise(target.url, json.loads(message.body), timeout=timeout)


def _apprise(url: str, event: dict[str, Any], *, timeout: float) -> str | None:
    import apprise  # imported on first use: a daemon with no Apprise target never loads it

    # Apprise says "Sent ... notification" at INFO for every message: its warnings and errors are enough.
    logging.getLogger("apprise").setLevel(logging.WARNING)

    notifier = apprise.Apprise()
    # Apprise's own timeouts (connect, read), in its URL arguments, unless the URL sets them.
    sep = "&" if "?" in url else "?"
    timed = url if "cto=" in url or "rto=" in url else f"{url}{sep}cto={timeout:g}&rto={timeout:g}"
    if not notifier.add(timed):
        return "apprise does not know this URL"
    title = f"cynchrod: {event['org']}/{event['app']} {event['event']}"
    text = f"{event['event']}: {event['org']}/{event['app']} is {event['status']}"
    if event.get("code"):
        text += f" ({event['code']})"
    if event.get("commit"):
        text += f" at {str(event['commit'])[:12]}"
    if event.get("url"):
        text += f"\n{event['url']}"
    if not notifier.notify(title=title, body=text):
        return "apprise could not deliver the message"
    return None


# -- the thread --------------------------------------------------------------------------------------

class Notifier:
    """Status changes -> outbox -> targets, on a thread of its own and a pool of ``workers``."""

    def __init__(self, db: store.Store, targets: Targets, *, workers: int = 4,
                 clock: Callable[[], float] = time.time, poll_s: float = POLL_S) -> None:
        self.db = db
        self.targets = targets
        self._clock = clock
        self._poll_s = poll_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="notify")
        self._workers = workers
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self.serve, args=(stop,), name="notifier", daemon=True)
        self._thread.start()

        def wake_on_stop() -> None:
            stop.wait()
            self._wake.set()

        threading.Thread(target=wake_on_stop, name="notifier-stop", daemon=True).start()

    def serve(self, stop: threading.Event) -> None:
        said: str | None = None
        try:
            while not stop.is_set():
                try:
                    self.step()
                    said = None
                except CynchrodError as exc:  # a busy or full store: try again at the next step
                    if str(exc) != said:  # once, not every second
                        log.warning("notifications wait: %s", exc)
                    said = str(exc)
                except Exception:
                    log.exception("notifications: a step crashed")
                self._wake.wait(self._sleep())
                self._wake.clear()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _sleep(self) -> float:
        try:
            due = self.db.next_notification_at()
        except CynchrodError:
            return self._poll_s
        return self._poll_s if due is None else max(0.01, min(self._poll_s, due - self._clock()))

    def step(self) -> list[concurrent.futures.Future[None]]:
        """Take the status changes waiting, and start the deliveries that are due (on the pool)."""
        while self.db.take_changes(self.targets.turn) >= 200:
            pass
        with self._lock:
            room = self._workers * 2 - len(self._inflight)
            if room <= 0:
                return []
            due = self.db.due_notifications(at=self._clock(), limit=room, skip=self._inflight)
            self._inflight.update(m.id for m in due)
        return [self._pool.submit(self._deliver, m) for m in due]

    def drain(self, timeout: float = 30) -> None:
        """Tests and one-shot commands: a step, and wait for its deliveries."""
        concurrent.futures.wait(self.step(), timeout=timeout)

    def _deliver(self, message: store.Notification) -> None:
        try:
            delivery = self.targets.settings.delivery
            target = self.targets.find(message.target)
            if target is None:
                self.db.notification_failed(message.id, error="the target is no longer configured", retry_at=None)
                return
            error = send(target, message, timeout=delivery.timeout_s)
            if error is not None:
                attempts = message.attempts + 1
                retry = None if attempts >= delivery.attempts else self._clock() + notices.backoff(
                    attempts, base=delivery.backoff_s, cap=delivery.max_backoff_s)
                log.warning("notification %d to %s failed (attempt %d%s): %s", message.id, message.target_name,
                            attempts, ", dead" if retry is None else "", error)
                self.db.notification_failed(message.id, error=error, retry_at=retry)
            else:
                self.db.notification_sent(message.id)
        except Exception:
            log.exception("notification %d: delivery crashed", message.id)
        finally:
            with self._lock:
                self._inflight.discard(message.id)
            self._wake.set()

