"""The dashboard in a real browser (Playwright + Debian's chromium) against a real
`cynchrod serve`, a real dockerd and a bare Git repo.

One daemon serves the module (starting one costs seconds); each test opens its
own browser context (its own cookies) and, when it changes an app, an app of
its own. The test that counts passes runs first, before any test wakes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import pathlib
import re
import secrets
import subprocess
import time
from collections.abc import Iterator

import docker
import pytest
import requests
import simple_websocket
from playwright.sync_api import Browser, BrowserContext, Dialog, Locator, Page, expect, sync_playwright

from cynchrod import runtime
from cynchrod.cli.client import websocket
from tests.conftest import Caddy, remove_owned
from tests.helpers import TEST_IMAGE, Daemon, GitRepo, cli, git, new_token, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WEBHOOK_SECRET = "dashboard-test-webhook-secret"
XSS = "<script>window.__pwned=1</script>"
XSS_LINE = "<script>window.__pwned=2</script><img src=x onerror=window.__pwned=3>"
XSS_COMMAND = f"""
  - sh
  - -c
  - "while true; do echo '{XSS_LINE}'; sleep 0.3; done"
"""
TICKER = "[sh, -c, 'i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done']"
DUO = f"""name: duo
memory: 64
services:
  alpha: {{image: '{TEST_IMAGE}', command: [sh, -c, 'while true; do echo from-alpha; sleep 0.5; done']}}
  beta: {{image: '{TEST_IMAGE}', command: [sh, -c, 'httpd -p 8080; while true; do echo from-beta; sleep 0.5; done'],
         port: 8080, domain: beta.duo.localhost}}
"""


def app(name: str, *, org: str = "default", command: str = "[sleep, '3600']", extra: str = "") -> str:
    return f"name: {name}\norg: {org}\nimage: {TEST_IMAGE}\ncommand: {command}\nmemory: 64\n{extra}"


@dataclasses.dataclass
class Site:
    daemon: Daemon
    url: str
    repo: GitRepo
    state: pathlib.Path
    owner: str
    tokens: dict[str, str]

    def api(self, method: str, path: str, *, token: str = "root", **kw: object) -> requests.Response:
        return requests.request(method, self.url + path, headers={"Authorization": f"Bearer {self.tokens[token]}"},
                                timeout=30, **kw)  # type: ignore[arg-type]

    def apps(self) -> dict[str, dict[str, object]]:
        rows = self.api("GET", "/apps?include_removed=1").json()["apps"]
        return {f"{a['org']}/{a['name']}": a for a in rows}

    def app_id(self, name: str, org: str = "default") -> str:
        return str(self.apps()[f"{org}/{name}"]["id"])

    def status(self, name: str, org: str = "default") -> object:
        return self.apps()[f"{org}/{name}"]["status"]

    def log(self) -> list[str]:
        """The branch's commit subjects, newest first, as the remote has them."""
        return git("log", "--format=%s", "main", cwd=self.repo.bare).splitlines()

    def passes(self) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r"^cynchrod_passes_total\{[^}]*\} ([\d.e+]+)$", text, re.M))

    def wake(self) -> None:
        """A signed webhook delivery: the daemon fetches and runs a pass now."""
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        signature = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        response = requests.post(self.url + "/webhooks/git", data=body, timeout=10, headers={
            "X-Cynchrod-Event": "push", "X-Cynchrod-Signature": f"sha256={signature}"})
        assert response.status_code == 202, response.text


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient,
         images: object) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("dashboard")
    owner = "t" + secrets.token_hex(4)
    state = root / "state"
    tokens = {name: new_token(state, org, name, admin=admin)
              for name, org, admin in (("alice", "default", False), ("bob", "other", False), ("root", "ops", True))}
    repo = GitRepo(root)
    repo.push({"apps/web.yaml": app("web", extra="env: {GREETING: hi}\n"),
               "apps/ticker.yaml": app("ticker", command=TICKER),
               "apps/doomed.yaml": app("doomed"),
               "apps/cfg.yaml": app("cfg", extra="env: {LEVEL: one}\n"),
               "apps/xss.yaml": app("xss", command=XSS_COMMAND, extra=f"env: {{NOTE: '{XSS}'}}\n"),
               "apps/duo.yaml": DUO,
               "apps/theirs.yaml": app("theirs", org="other")})
    # Not watched: a test looks at a pushed change before any pass applies it (the next-pass diff).
    daemon = Daemon(repo, state, owner, interval=300, env={"CYNCHROD_WEBHOOK_SECRET": WEBHOOK_SECRET,
                                                           "CYNCHROD_WATCH": "off"}).start()
    s = Site(daemon, daemon.api, repo, state, owner, tokens)
    try:
        wait_for(lambda: _all_running(s, 7), 60, "seven apps running")
        yield s
    finally:
        assert daemon.stop() == 0
        remove_owned(docker_client, owner)
    log = daemon.output()
    for token in tokens.values():
        assert token not in log  # no token in any log line


def _all_running(s: Site, n: int) -> bool:
    try:
        apps = s.apps()
    except (requests.RequestException, ValueError, KeyError):
        return False
    return len(apps) == n and all(a["status"] == "running" for a in apps.values())


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    assert errors == []  # no script error on any page


def sign_in(page: Page, site: Site, token: str) -> None:
    page.goto(site.url + "/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    # The apps page, its deferred script run: its controls (the org filter, the buttons) are
    # wired only then, and a change made before would have no listener.
    page.wait_for_url(re.compile(r"/(\?.*)?$"))
    page.wait_for_load_state("load")


def row(page: Page, name: str) -> Locator:
    return page.locator("#rows tr", has=page.get_by_role("rowheader", name=name, exact=True))


def container_ids(client: docker.DockerClient, owner: str, name: str) -> list[str]:
    rows = client.api.containers(all=True, filters={"label": [f"{runtime.LABEL_OWNER}={owner}",
                                                              f"{runtime.LABEL_APP}={name}"]})
    return [r["Id"] for r in rows]


# -- tests -------------------------------------------------------------------------------


def test_polling_list_adds_no_pass(site: Site, page: Page) -> None:
    """The list polls the store every 2 s; it never wakes the reconciler or adds a pass."""
    before = site.passes()
    sign_in(page, site, site.tokens["alice"])
    with page.expect_response(lambda r: "/ui/apps.json" in r.url):
        pass
    for _ in range(2):  # two more polls, 2 s apart
        with page.expect_response(lambda r: "/ui/apps.json" in r.url, timeout=5000):
            pass
    assert site.passes() == before


def test_an_open_page_polls_at_debug_level_and_api_calls_log_at_info(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    for _ in range(2):
        with page.expect_response(lambda r: "/ui/apps.json" in r.url, timeout=5000):
            pass
    web = site.app_id("web")
    assert site.api("GET", f"/apps/{web}", token="alice").ok
    wait_for(lambda: f'"path": "/apps/{web}"' in site.daemon.output(), 5, "the API call's access line")
    access = [line for line in site.daemon.output().splitlines() if "cynchrod.access" in line]
    assert not [line for line in access if "/ui/apps.json" in line], access[-5:]
    assert any(" INFO cynchrod.access: " in line and '"path": "/"' in line for line in access)  # a page view


def test_app_page_services_deployments_manifest_and_next_pass(site: Site, page: Page,
                                                              docker_client: docker.DockerClient) -> None:
    # Runs before any test wakes a pass: no pass may apply this push while the page is looked at.
    passes = site.passes()
    site.repo.push({"apps/cfg.yaml": app("cfg", extra="env: {LEVEL: two}\n")}, "cfg: level two")
    sign_in(page, site, site.tokens["alice"])
    row(page, "cfg").get_by_role("link", name="cfg").click()
    expect(page.get_by_role("heading", name=re.compile("^cfg"))).to_be_visible()
    units = page.locator("table.units tbody tr")
    expect(units).to_have_count(1)
    expect(units).to_contain_text("main")
    expect(units).to_contain_text("running")
    deployments = page.locator("table.deployments tbody tr")
    expect(deployments).to_have_count(1)
    expect(deployments).to_contain_text("running")
    # The manifest as committed (the deployed commit), and what the next pass would change.
    expect(page.locator("pre.manifest")).to_contain_text("LEVEL: one")
    expect(page.locator("#next-pass")).to_contain_text("recreate")
    expect(page.locator("#next-pass")).to_contain_text("env")
    expect(page.locator("pre.diff")).to_contain_text('"two"')
    [cid] = container_ids(docker_client, site.owner, "cfg")  # the preview applied nothing
    assert "LEVEL=one" in docker_client.api.inspect_container(cid)["Config"]["Env"]
    assert site.passes() == passes


def test_sign_in_bad_good_and_the_landing_page(site: Site, page: Page) -> None:
    page.goto(site.url + "/")
    assert page.url.endswith("/signin")  # not signed in: the sign-in page
    page.get_by_role("button", name="Sign in").click()  # empty: the browser's own required check
    assert page.url.endswith("/signin")
    page.get_by_label("API token").fill("cyn_not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")

    sign_in(page, site, site.tokens["alice"])
    assert page.url == site.url + "/"  # the apps list is where a sign-in lands
    expect(page.get_by_role("heading", name="Apps")).to_be_visible()
    assert (site.state / "dashboard.key").stat().st_mode & 0o777 == 0o600
    cookie = next(c for c in page.context.cookies() if c["name"] == "cynchrod_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain http here
    assert site.tokens["alice"] not in cookie["value"]  # the cookie carries the token's id, not the token

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_contain_text("signed out")
    page.goto(site.url + "/")
    assert page.url.endswith("/signin")


def test_sign_out_ends_the_session_on_the_server(site: Site, page: Page) -> None:
    """A copy of the cookie (a shared machine, a stolen backup) is dead once its session signs
    out: reads, actions and log-stream tickets are refused, and an open log stream closes."""
    sign_in(page, site, site.tokens["alice"])
    web = site.app_id("web")
    copy = {"cynchrod_session": next(c["value"] for c in page.context.cookies() if c["name"] == "cynchrod_session")}
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
    assert csrf
    json_headers = {"Accept": "application/json", "X-CSRF-Token": csrf, "Origin": site.url}
    assert requests.get(site.url + "/ui/apps.json", cookies=copy, timeout=10).status_code == 200
    ticket = requests.post(f"{site.url}/ui/apps/{web}/logs/ticket", cookies=copy, headers=json_headers, timeout=10)
    assert ticket.status_code == 200, ticket.text
    ws = websocket(f"{site.url.replace('http', 'ws', 1)}/apps/{web}/logs/stream?ticket={ticket.json()['ticket']}")
    try:
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("status")).to_contain_text("signed out")
        # The stream opened by that session ends with it (the pump checks each second).
        deadline = time.monotonic() + 10
        with pytest.raises(simple_websocket.ConnectionClosed) as closed:
            while time.monotonic() < deadline:
                ws.receive(timeout=1)
        assert (closed.value.reason, closed.value.message) == (4401, "signed_out")
    finally:
        with contextlib.suppress(simple_websocket.ConnectionClosed):
            ws.close()
    assert requests.get(site.url + "/ui/apps.json", cookies=copy, timeout=10).status_code == 401
    restart = requests.post(f"{site.url}/ui/apps/{web}/restart", cookies=copy, headers=json_headers, timeout=10)
    assert restart.status_code in (401, 403), restart.text
    again = requests.post(f"{site.url}/ui/apps/{web}/logs/ticket", cookies=copy, headers=json_headers, timeout=10)
    assert again.status_code in (401, 403), again.text
    assert not any(s.startswith("restart default/web") for s in site.log()[:3])


def test_revoked_token_ends_the_session_at_once(site: Site, page: Page) -> None:
    token = new_token(site.state, "default", "carol")
    sign_in(page, site, token)
    expect(row(page, "web")).to_be_visible()
    assert cli("token", "revoke", "carol", "--state", str(site.state)).returncode == 0
    # The page's next poll (2 s) is refused and sends the person to sign in.
    page.wait_for_url(re.compile(r"/signin$"), timeout=5000)
    expect(page.get_by_role("alert")).to_contain_text("revoked")
    page.goto(site.url + "/ui/apps/" + site.app_id("web"))
    assert page.url.endswith("/signin")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("was revoked")


def test_list_shows_this_orgs_apps_and_statuses(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    # Not bob's "theirs"; rows in name order.
    expect(page.locator("#rows tr th[scope=row]")).to_have_text(["cfg", "doomed", "duo", "ticker", "web", "xss"])
    web = row(page, "web")
    expect(web.locator(".badge")).to_have_text("running")  # a word, not only a colour
    expect(web).to_contain_text(TEST_IMAGE)
    expect(web).to_contain_text("default")
    deployment = site.api("GET", f"/apps/{site.app_id('web')}").json()["deployments"][0]
    expect(web).to_contain_text(deployment["commit"][:12])
    expect(web).to_contain_text(deployment["trigger"])
    for name in ("Logs", "Restart", "Stop", "Delete"):  # visible, named controls on every row
        expect(web.get_by_role("link" if name == "Logs" else "button", name=name, exact=True)).to_be_visible()

    # Another org's app is invisible: not listed, its page is a 404, its actions refused.
    theirs = site.app_id("theirs", org="other")
    response = page.goto(site.url + f"/ui/apps/{theirs}")
    assert response is not None and response.status == 404
    assert "theirs" not in page.content()

    # The search box filters as you type.
    page.goto(site.url + "/")
    page.get_by_role("searchbox", name="Search").fill("tick")
    expect(page.locator("#rows tr:visible")).to_have_count(1)
    expect(row(page, "ticker")).to_be_visible()


def test_admin_sees_every_org_with_a_filter(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["root"])
    expect(row(page, "theirs")).to_be_visible()
    page.get_by_label("Org").select_option("other")
    page.wait_for_url(re.compile(r"org=other"))
    expect(page.locator("#rows tr th[scope=row]")).to_have_text(["theirs"])


def test_stop_start_restart_are_commits_and_the_badge_follows(site: Site, page: Page,
                                                               docker_client: docker.DockerClient) -> None:
    sign_in(page, site, site.tokens["alice"])
    web = row(page, "web")
    web.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="committed")).to_contain_text("stop web")
    assert site.log()[0] == "stop default/web (by alice)"
    expect(web.locator(".badge")).to_have_text("stopped", timeout=20000)  # live, no reload
    [cid] = container_ids(docker_client, site.owner, "web")
    assert docker_client.api.inspect_container(cid)["State"]["Running"] is False

    web.get_by_role("button", name="Start", exact=True).click()  # the Stop button became Start
    expect(web.locator(".badge")).to_have_text("running", timeout=20000)
    assert site.log()[0] == "start default/web (by alice)"
    [cid] = container_ids(docker_client, site.owner, "web")
    assert docker_client.api.inspect_container(cid)["State"]["Running"] is True

    web.get_by_role("button", name="Restart", exact=True).click()
    # The click shows at once; the real status follows.
    expect(web.locator(".badge")).to_have_text(re.compile("queued|deploying|running"))
    wait_for(lambda: container_ids(docker_client, site.owner, "web") not in ([], [cid]), 20, "a new container")
    expect(web.locator(".badge")).to_have_text("running", timeout=20000)
    assert site.log()[0] == "restart default/web (by alice)"


def test_a_stopped_app_offers_start_not_restart(site: Site, page: Page) -> None:
    """A restart of a stopped app is refused (``app_stopped``): the button is not offered."""
    sign_in(page, site, site.tokens["alice"])
    web = row(page, "web")
    expect(web.get_by_role("button", name="Restart", exact=True)).to_be_visible()
    assert site.api("POST", f"/apps/{site.app_id('web')}/stop", token="alice").status_code == 202
    expect(web.locator(".badge")).to_have_text("stopped", timeout=20000)
    # Live: the poll that shows "stopped" takes Restart away and offers Start.
    expect(web.get_by_role("button", name="Restart", exact=True)).to_have_count(0)
    expect(web.get_by_role("button", name="Start", exact=True)).to_be_visible()
    page.reload()  # as the server renders it
    expect(row(page, "web").get_by_role("button", name="Restart", exact=True)).to_have_count(0)
    expect(row(page, "web").get_by_role("button", name="Start", exact=True)).to_be_visible()
    page.goto(site.url + f"/ui/apps/{site.app_id('web')}")
    actions = page.locator("div.actions")
    expect(actions.get_by_role("button", name="Start", exact=True)).to_be_visible()
    expect(actions.get_by_role("button", name="Restart", exact=True)).to_have_count(0)

    page.goto(site.url + "/")
    assert site.api("POST", f"/apps/{site.app_id('web')}/start", token="alice").status_code == 202
    expect(row(page, "web").locator(".badge")).to_have_text("running", timeout=20000)
    expect(row(page, "web").get_by_role("button", name="Restart", exact=True)).to_be_visible()


def test_no_last_error_is_not_painted_as_an_error(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    page.goto(site.url + f"/ui/apps/{site.app_id('ticker')}")
    none = page.locator("dl.facts dt", has_text="Last error").locator("xpath=following-sibling::dd[1]")
    expect(none).to_have_text("none")
    body = page.evaluate("getComputedStyle(document.body).color")
    assert none.evaluate("el => getComputedStyle(el).color") == body


@pytest.mark.parametrize("where", ["apps", "app", "logs"])
def test_a_narrow_screen_scrolls_no_page_sideways(site: Site, page: Page, where: str) -> None:
    """A phone-sized window (420 px): the page fits its width, the row's buttons are reachable."""
    page.set_viewport_size({"width": 420, "height": 800})
    sign_in(page, site, site.tokens["alice"])
    duo = site.app_id("duo")
    path = {"apps": "/", "app": f"/ui/apps/{duo}", "logs": f"/ui/apps/{duo}/logs"}[where]
    page.goto(site.url + path)
    page.wait_for_load_state("load")
    if where == "apps":
        box = row(page, "duo").get_by_role("button", name="Delete", exact=True).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 420, box
    width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], width


def test_delete_after_confirm_removes_containers_and_the_row_turns_removed(
        site: Site, page: Page, docker_client: docker.DockerClient) -> None:
    sign_in(page, site, site.tokens["alice"])
    doomed = row(page, "doomed")
    prompts: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        prompts.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    doomed.get_by_role("button", name="Delete", exact=True).click()
    wait_for(lambda: prompts, 5, "the confirmation")
    assert "doomed" in prompts[0]  # the confirmation names the app
    assert site.log()[0] != "delete default/doomed (by alice)"  # cancelled: nothing committed

    page.once("dialog", lambda dialog: dialog.accept())
    doomed.get_by_role("button", name="Delete", exact=True).click()
    expect(doomed.locator(".badge")).to_have_text("removed", timeout=20000)
    assert site.log()[0] == "delete default/doomed (by alice)"
    assert container_ids(docker_client, site.owner, "doomed") == []
    expect(doomed.get_by_role("button")).to_have_count(0)  # nothing left to do to it

    page.reload()  # removed apps are behind a toggle
    expect(row(page, "doomed")).to_have_count(0)
    page.get_by_role("link", name=re.compile("Show removed apps")).click()
    expect(row(page, "doomed").locator(".badge")).to_have_text("removed")


def test_logs_show_lines_written_after_opening(site: Site, page: Page, docker_client: docker.DockerClient) -> None:
    sign_in(page, site, site.tokens["alice"])
    row(page, "ticker").get_by_role("link", name="Logs").click()
    expect(page.get_by_role("heading", name="Logs of ticker")).to_be_visible()
    expect(page.locator("#lines tr").first).to_contain_text("tick")  # the tail
    # A line streamed over the WebSocket proves the stream is following; then write one.
    expect(page.locator("#log")).to_have_attribute("data-streamed", re.compile(r"[1-9]"), timeout=10000)
    marker = "marker-" + secrets.token_hex(4)
    [cid] = container_ids(docker_client, site.owner, "ticker")
    docker_client.api.exec_start(docker_client.api.exec_create(cid, ["sh", "-c", f"echo {marker} > /proc/1/fd/1"]))
    expect(page.locator("#lines tr", has_text=marker)).to_have_count(1, timeout=10000)

    # Pause holds new lines back; the filter hides what does not match.
    page.get_by_label("Follow").uncheck()
    shown = page.locator("#lines tr").count()
    page.wait_for_function("() => /waiting/.test(document.getElementById('counts').textContent)", timeout=5000)
    assert page.locator("#lines tr").count() == shown
    page.get_by_label("Follow").check()
    page.get_by_role("searchbox", name="Filter").fill(marker)
    expect(page.locator("#lines tr:visible")).to_have_count(1)


def test_logs_of_a_multi_service_app_name_the_service(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    row(page, "duo").get_by_role("link", name="Logs").click()
    expect(page.get_by_role("columnheader", name="Service")).to_be_visible()
    for service in ("alpha", "beta"):
        line = page.locator("#lines tr", has_text=f"from-{service}").last
        expect(line.locator("td.svc")).to_have_text(service, timeout=10000)


def test_a_services_domain_is_a_link_in_the_list_and_on_the_app_page(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    link = row(page, "duo").get_by_role("link", name="beta.duo.localhost")
    expect(link).to_have_attribute("href", "http://beta.duo.localhost/")
    expect(link).to_have_attribute("title", "service beta")
    row(page, "duo").get_by_role("link", name="duo", exact=True).click()
    expect(page.locator("dl.facts")).to_contain_text("Domain of beta")
    expect(page.locator("dl.facts").get_by_role("link", name="beta.duo.localhost")).to_be_visible()


EDGE_WEB = (f"name: edged\nimage: {TEST_IMAGE}\nport: 8080\nmemory: 64\ndomain: edged.localhost\ncommand: "
            "[sh, -c, 'mkdir -p /w && echo through-the-edge > /w/index.html && exec httpd -f -p 8080 -h /w']\n")


def _through(caddy: Caddy, host: str) -> tuple[int, str] | None:
    try:
        return caddy.fetch(host)
    except OSError:  # the edge's server is made by the daemon's first pass
        return None


def test_a_domain_link_carries_the_edges_port(repo: GitRepo, owner: str, images: object, caddy: Caddy,
                                              tmp_path: pathlib.Path, browser: Browser) -> None:
    """An edge on a port of its own (the demo's): the domain link goes there, and answers."""
    repo.push({"apps/edged.yaml": EDGE_WEB})
    state = tmp_path / "state"
    token = new_token(state, "default")
    daemon = Daemon(repo, state, owner, env={"CYNCHROD_EDGE": caddy.admin,
                                             "CYNCHROD_EDGE_LISTEN": f"127.0.0.1:{caddy.port}",
                                             "CYNCHROD_WATCH": "off"}).start()
    ctx = browser.new_context()
    try:
        wait_for(lambda: _through(caddy, "edged.localhost") == (200, "through-the-edge\n"), 60,
                 "the app through the edge")
        s = Site(daemon, daemon.api, repo, state, owner, {"root": token})
        wait_for(lambda: _all_running(s, 1), 30, "the API")
        page = ctx.new_page()
        sign_in(page, s, token)
        link = row(page, "edged").get_by_role("link", name="edged.localhost")
        expect(link).to_have_attribute("href", f"http://edged.localhost:{caddy.port}/")
        row(page, "edged").get_by_role("link", name="edged", exact=True).click()
        page.locator("dl.facts").get_by_role("link", name="edged.localhost").click()
        expect(page.locator("body")).to_have_text("through-the-edge")  # *.localhost is this machine
    finally:
        ctx.close()
        assert daemon.stop() == 0


FLOOD = """() => new Promise((done) => {
    // 10,000 lines, 500 every 10 ms (far faster than frames come), into the page's own WebSocket
    // handler; counts the animation frames and the separate changes of the lines table (mutation
    // callbacks). (At 50 lines a tick, a loaded runner painted one tick a frame: 200 frames, 50 s.)
    const ws = window.__sockets[window.__sockets.length - 1];
    let sent = 0, frames = 0, changes = 0;
    new MutationObserver(() => { changes++; }).observe(document.getElementById("lines"),
                                                         {childList: true, subtree: true});
    const frame = () => {
      frames++;
      if (sent < 10000) requestAnimationFrame(frame);
      else setTimeout(() => requestAnimationFrame(() => done({frames: frames + 1, changes})), 100);
    };
    requestAnimationFrame(frame);
    const feed = setInterval(() => {
      for (let i = 0; i < 500; i++, sent++) {
        ws.dispatchEvent(new MessageEvent("message", {data: JSON.stringify(
          {service: "main", timestamp: new Date().toISOString(), line: "flood " + sent})}));
      }
      if (sent >= 10000) clearInterval(feed);
    }, 10);
})"""
KEEP_SOCKETS = """(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native { constructor(...args) { super(...args); window.__sockets.push(this); } };
})();"""


def test_logs_page_copes_with_a_flood(site: Site, page: Page) -> None:
    """A flood of 10,000 lines: DOM updates are batched per frame and at most 5,000 rows are kept.

    Asserted as behaviour (how many times the table changed against how many lines came),
    not as a frame time, which a loaded machine stretches whatever the page does."""
    page.add_init_script(KEEP_SOCKETS)
    sign_in(page, site, site.tokens["alice"])
    page.goto(site.url + f"/ui/apps/{site.app_id('ticker')}/logs")
    expect(page.locator("#log")).to_have_attribute("data-streamed", re.compile(r"[1-9]"), timeout=10000)
    seen = page.evaluate(FLOOD)
    expect(page.locator("#lines tr", has_text="flood 9999")).to_have_count(1)
    assert page.locator("#lines tr").count() <= 5000
    assert page.locator("#lines tr", has_text="flood 0").count() == 0  # the oldest were dropped
    # One change of the table per painted frame at most, not one per line (10,000 lines came).
    assert 0 < seen["changes"] <= seen["frames"] + 2, seen
    assert seen["changes"] <= 10000 / 20, seen


def test_post_without_csrf_token_is_refused(site: Site, page: Page) -> None:
    sign_in(page, site, site.tokens["alice"])
    head = site.log()[0]
    web = site.app_id("web")
    stop = site.url + f"/ui/apps/{web}/stop"
    # The browser's own session cookie, no token: refused.
    response = page.request.post(stop, headers={"Accept": "application/json"})
    assert (response.status, response.json()["error"]) == (403, "csrf_failed")
    assert page.request.post(stop, form={"csrf_token": "wrong"}).status == 403
    assert page.request.post(site.url + f"/ui/apps/{web}/logs/ticket").status == 403
    # The right token sent from another origin: refused too.
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    assert page.request.post(stop, form={"csrf_token": token}, headers={"Origin": "http://evil.example"}).status == 403
    assert site.log()[0] == head  # nothing was committed
    # With it, the same request works (so the 403s above were the missing token, nothing else).
    response = page.request.post(stop, form={"csrf_token": token})
    assert response.ok and site.log()[0] == "stop default/web (by alice)"
    # The bearer-token API needs no CSRF token and is unchanged.
    assert site.api("POST", f"/apps/{web}/start", token="alice").status_code == 202
    wait_for(lambda: site.status("web") == "running", 20, "web running again")


def test_script_in_env_logs_and_errors_stays_text(site: Site, page: Page, docker_client: docker.DockerClient) -> None:
    # The error: a key the schema refuses, named in last_error.
    bad = app("xss", command=XSS_COMMAND, extra=f"env: {{NOTE: '{XSS}'}}\n'{XSS}': 1\n")
    site.repo.push({"apps/xss.yaml": bad}, "xss: break it")
    site.wake()
    wait_for(lambda: "<script>" in str(site.apps()["default/xss"]["last_error"]), 20, "the manifest error")
    sign_in(page, site, site.tokens["alice"])
    # As the server wrote them (before the script touches anything): escaped, never markup.
    escaped = "&lt;script&gt;window.__pwned=1&lt;/script&gt;"
    for path in ("/", f"/ui/apps/{site.app_id('xss')}"):
        html = page.request.get(site.url + path).text()
        assert escaped in html and XSS not in html, path
        assert "script-src 'self'" in page.request.get(site.url + path).headers["content-security-policy"]
    xss_row = row(page, "xss")
    expect(xss_row.locator('[data-field="last_error"]')).to_contain_text(XSS)
    xss_row.get_by_role("link", name="xss", exact=True).click()
    expect(page.locator("pre.manifest")).to_contain_text(XSS)  # the env, as committed
    expect(page.locator("dd.error")).to_contain_text(XSS)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main script").count() == 0

    page.get_by_role("link", name="Logs").click()
    # The app prints the line every 0.3 s: in the tail, then over the stream.
    expect(page.locator("#log")).to_have_attribute("data-streamed", re.compile(r"[1-9]"), timeout=10000)
    expect(page.locator("#lines tr").last).to_contain_text(XSS_LINE)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#lines img, #lines script").count() == 0
    assert docker_client.ping()


def test_screenshot_script_makes_a_png(site: Site, tmp_path: pathlib.Path) -> None:
    """scripts/screenshot-dashboard signs in and saves the apps page (what makes docs/dashboard.png)."""
    out = tmp_path / "shot.png"
    subprocess.run([str(pathlib.Path(__file__).resolve().parents[2] / "scripts" / "screenshot-dashboard"),
                    "--url", site.url, "--token", site.tokens["alice"], "--out", str(out)],
                   check=True, capture_output=True, timeout=60, input=b"")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_broken_files_and_a_refused_version_say_what_runs(site: Site, page: Page) -> None:
    """A file that declares no app is listed under Problems (to its org); an app whose new version
    is refused reads "failed — previous version running", and its page does not say "in sync"."""
    site.repo.push({"apps/frail.yaml": app("frail")}, "frail")
    site.wake()
    wait_for(lambda: site.apps().get("default/frail", {}).get("status") == "running", 30, "frail running")
    site.repo.push({"apps/frail.yaml": app("frail").replace("memory: 64", "memory: 64MB"),
                    "apps/broken.yaml": "name: [half\n"}, "break frail, add a broken file")
    site.wake()
    wait_for(lambda: site.status("frail") == "failed", 30, "frail refused")
    sign_in(page, site, site.tokens["alice"])
    problems = page.locator("#problems")
    expect(problems).to_contain_text("apps/broken.yaml")
    expect(problems).to_contain_text("apps/broken.yaml:2: yaml_syntax: expected ',' or ']'")
    frail = row(page, "frail")
    expect(frail.locator(".badge")).to_have_text("failed")  # the status word stays the reference's
    expect(frail).to_contain_text("previous version running")
    frail.get_by_role("link", name="frail", exact=True).click()
    expect(page.locator("h1")).to_contain_text("previous version running")
    expect(page.locator("#next-pass")).not_to_contain_text("In sync")
    expect(page.locator("#next-pass")).to_contain_text("previous version keeps running")

    bob = page.context.browser.new_context().new_page()  # type: ignore[union-attr]
    sign_in(bob, site, site.tokens["bob"])
    expect(bob.locator("#rows tr").first).to_be_visible()
    assert bob.locator("#problems").count() == 0  # not bob's org's file
    bob.context.close()

    site.repo.push({"apps/frail.yaml": None, "apps/broken.yaml": None}, "clean up")
    site.wake()
    wait_for(lambda: site.apps().get("default/frail", {}).get("status") == "removed", 30, "frail removed")
    page.goto(site.url + "/")
    assert page.locator("#problems").count() == 0
