"""Image updates as a user meets them: ``cynchrod serve`` with a loopback docker-registry; a new tag
is committed and running within one interval; ``commit: false`` shows ``update_available`` in the
API, ``cynchrod status``, the dashboard's app page and ``/metrics``."""

from __future__ import annotations

import json
import pathlib
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.helpers import Daemon, GitRepo, cli, git, new_token, wait_for
from tests.registryd import LocalRegistry, Pusher
from tests.reliability.test_domain_taken import sign_in

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture
def reg(tmp_path: pathlib.Path) -> Iterator[tuple[LocalRegistry, Pusher]]:
    (tmp_path / "registry").mkdir()
    served = LocalRegistry(tmp_path / "registry")
    pusher = Pusher()
    try:
        for tag in ("1.4.2", "2.0.0"):
            pusher.push(served.host, "shop/web", tag, content=tag)
        yield served, pusher
    finally:
        pusher.cleanup()
        served.stop()


def get(daemon: Daemon, token: str, path: str) -> dict:  # type: ignore[type-arg]
    request = urllib.request.Request(daemon.api + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_a_new_tag_is_committed_and_running_within_one_interval(
        reg: tuple[LocalRegistry, Pusher], daemons: Callable[..., Daemon], repo: GitRepo,
        tmp_path: pathlib.Path) -> None:
    # ``reg`` first: it is torn down last, once the daemon and its containers are gone, so the
    # images the engine pulled from it can be removed.
    served, pusher = reg
    repo.push({
        "apps/web.yaml": f"name: web\nimage: '{served.host}/shop/web:1.4.2'  # followed\ncommand: [sleep, '3600']\n"
                         "memory: 64\nupdate:\n  semver: '^1.4'\n  interval: 5s\n",
        "apps/peek.yaml": f"name: peek\nimage: {served.host}/shop/web:1.4.2\ncommand: [sleep, '3600']\nmemory: 64\n"
                          "update: {semver: '>=1.4', commit: false, interval: 5s}\n",
    })
    daemon = daemons(interval=300).start()
    token = new_token(tmp_path / "state", "default", admin=True)

    def details(name: str) -> dict:  # type: ignore[type-arg]
        try:
            apps = {a["name"]: a for a in get(daemon, token, "/apps")["apps"]}
        except OSError:  # the API is not listening yet
            return {}
        return get(daemon, token, f"/apps/{apps[name]['id']}") if name in apps else {}

    wait_for(lambda: (details("web").get("updates") or [{}])[0].get("reason") == "up_to_date", 60, "the first check")
    # commit: false: reported, not committed.
    wait_for(lambda: details("peek").get("app", {}).get("update_available"), 30, "update_available")
    peek = details("peek")
    assert peek["updates"][0]["candidate"] == "2.0.0" and peek["updates"][0]["reason"] == "available"
    env = {"CYNCHROD_API": daemon.api, "CYNCHROD_TOKEN": token}
    shown = cli("status", "default/peek", env=env)
    assert shown.returncode == 0 and "update available: 2.0.0" in shown.stdout, shown.stdout + shown.stderr
    metrics = urllib.request.urlopen(daemon.api + "/metrics", timeout=10).read().decode()
    assert "cynchrod_updates_available 1.0" in metrics
    ui = requests.Session()
    assert sign_in(ui, daemon.api, token).status_code == 200
    page = ui.get(f"{daemon.api}/ui/apps/{peek['app']['id']}", timeout=10).text
    assert 'id="image-updates"' in page and "update available" in page and "<code>2.0.0</code>" in page
    # A new tag in range: committed and running within one interval (5 s) and a pass.
    pusher.push(served.host, "shop/web", "1.5.0", content="1.5.0")
    took = wait_for(lambda: details("web").get("app", {}).get("image") == f"{served.host}/shop/web:1.5.0"
                    and details("web")["app"]["status"] == "running", 30, "the update running")
    print(f"\nthe update was running {took:.1f}s after the tag was pushed (interval 5s)")
    assert took < 5 + 10, took
    git("pull", "-q", "origin", "main", cwd=repo.work)
    assert git("log", "-1", "--format=%s", "--", "apps/web.yaml", cwd=repo.work).strip() == \
        "update default/web: web 1.4.2 → 1.5.0"
    assert f"image: '{served.host}/shop/web:1.5.0'  # followed" in (repo.work / "apps/web.yaml").read_text()
    assert details("web")["deployments"][0]["trigger"] == "update"
    metrics = urllib.request.urlopen(daemon.api + "/metrics", timeout=10).read().decode()
    assert f'cynchrod_image_updates_committed_total{{registry="{served.host}"}} 1.0' in metrics
