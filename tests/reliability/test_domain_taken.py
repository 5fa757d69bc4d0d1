"""``domain_taken`` does not name another org's app (issue 24, item 8).

Every other cross-org lookup is a 404, so a refused claim must not say which app of which
org holds the domain: it says only that the domain is taken. Within one org, naming the
holder helps and leaks nothing. Real daemon, real git; every surface the message reaches
is read with the claimant's token: the REST API (list, by id, by name, deployments), the
dashboard (list, its JSON, the app's page) and the CLI (``apps``, ``status``).
"""

from __future__ import annotations

import pathlib
import re

import requests

from tests.helpers import Daemon, GitRepo, cli, manifest, new_token, wait_for

#: A container that listens on the port it declares (a declared port is part of its readiness).
SERVE = "[httpd, -f, -p, '8080']"


def sign_in(ui: requests.Session, api: str, token: str) -> requests.Response:
    """The dashboard's sign-in form, sent as a browser sends it (with the page's CSRF token)."""
    page = ui.get(f"{api}/signin", timeout=10).text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page[:500]
    return ui.post(f"{api}/signin", data={"token": token, "csrf_token": found.group(1)}, timeout=10)


def _failed(api: str, token: str, name: str) -> dict:  # type: ignore[type-arg]
    headers = {"Authorization": f"Bearer {token}"}
    found: dict = {}  # type: ignore[type-arg]

    def done() -> bool:
        apps = requests.get(f"{api}/apps", headers=headers, timeout=10).json()["apps"]
        found.update(next((a for a in apps if a["name"] == name and a["status"] == "failed"), {}))
        return bool(found)

    wait_for(done, 60, f"{name} to be refused")
    return found


def _surfaces(daemon: Daemon, token: str, app: dict) -> str:  # type: ignore[type-arg]
    """All a token's holder can read about ``app``, as one text."""
    api, headers = daemon.api, {"Authorization": f"Bearer {token}"}
    texts = [requests.get(f"{api}/apps", headers=headers, timeout=10).text,
             requests.get(f"{api}/apps/{app['id']}", headers=headers, timeout=10).text,
             requests.get(f"{api}/apps/by-name/{app['org']}/{app['name']}", headers=headers, timeout=10).text]
    ui = requests.Session()
    assert sign_in(ui, api, token).status_code == 200
    for path in ("/", "/ui/apps.json", f"/ui/apps/{app['id']}"):
        r = ui.get(api + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        texts.append(r.text)
    env = {"CYNCHROD_API": api, "CYNCHROD_TOKEN": token}
    for args in (["apps"], ["apps", "-o", "json"], ["status", f"{app['org']}/{app['name']}"]):
        run = cli(*args, env=env)
        assert run.returncode == 0, run.stderr
        texts.append(run.stdout + run.stderr)
    return "\n".join(texts)


def test_domain_taken_names_the_holder_only_within_its_org(repo: GitRepo, daemons,  # type: ignore[no-untyped-def]
                                                         tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    acme, beta = new_token(state, "acme"), new_token(state, "beta")
    repo.push({"apps/web.yaml": manifest("web", SERVE, extra="org: acme\ndomain: shop.localhost\nport: 8080\n")})
    daemon = daemons(interval=1).start()
    daemon.wait_healthy()
    wait_for(lambda: _status(daemon, acme, "web") == "running", 60, "acme/web to run")
    repo.push({"apps/shop.yaml": manifest("shop", SERVE, extra="org: beta\ndomain: SHOP.localhost\nport: 8080\n"),
               "apps/other.yaml": manifest("other", SERVE, extra="org: acme\ndomain: shop.localhost\nport: 8080\n")})

    shop = _failed(daemon.api, beta, "shop")
    assert shop["last_error"].startswith("domain_taken: domain shop.localhost is taken"), shop["last_error"]
    seen = _surfaces(daemon, beta, shop)
    assert "domain_taken" in seen and "shop.localhost is taken" in seen
    # Neither the holder's org nor its name, anywhere the other org can look.
    assert not re.search(r"\bacme\b", seen), [line for line in seen.splitlines() if "acme" in line][:5]
    assert "acme/web" not in seen and "app web" not in seen

    # Within its own org, the holder is named.
    other = _failed(daemon.api, acme, "other")
    assert other["last_error"].startswith("domain_taken: domain shop.localhost belongs to app acme/web"), \
        other["last_error"]
    assert "belongs to app acme/web" in _surfaces(daemon, acme, other)
    assert "Traceback" not in daemon.output()



def _app(daemon: Daemon, token: str, name: str) -> dict:  # type: ignore[type-arg]
    apps = requests.get(f"{daemon.api}/apps", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    return next((a for a in apps["apps"] if a["name"] == name), {})


def _status(daemon: Daemon, token: str, name: str) -> str | None:
    return _app(daemon, token, name).get("status")
