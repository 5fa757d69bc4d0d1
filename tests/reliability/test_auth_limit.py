"""Failed authentication backs off per client address (issue 24, item 10).

300 wrong sign-ins in 0.4 s were all 401. Now each client address gets ``throttle.FREE``
failures, then ``429 too_many_attempts`` with ``Retry-After``, on every door a credential
comes in by: the bearer header, the dashboard's sign-in form and the log stream's
``?token=``. The count is shared by the API's worker processes (each request below opens
a new connection, so they land on both workers: a per-worker count would let 20 through).
Other addresses and successful authentications are not slowed or counted. Dashboard
responses carry ``X-Frame-Options: DENY`` beside CSP's ``frame-ancestors 'none'``.

Real daemon (two API workers), real HTTP from several loopback addresses (127.0.0.0/8 is
all loopback on Linux, so each test client has an address of its own).
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from cynchrod.api import throttle
from tests.helpers import Daemon, GitRepo, manifest, new_token, wait_for
from tests.reliability.test_domain_taken import sign_in


class _From(HTTPAdapter):
    """Connections from one local address."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client(address: str) -> requests.Session:
    s = requests.Session()
    s.mount("http://", _From(address))
    s.headers["Connection"] = "close"  # a new connection each time: the workers take turns
    return s


@pytest.fixture
def api(repo: GitRepo, daemons, tmp_path: pathlib.Path) -> tuple[Daemon, str]:  # type: ignore[no-untyped-def]
    token = new_token(tmp_path / "state", "default")
    repo.push({"apps/web.yaml": manifest("web")})
    daemon: Daemon = daemons(interval=300).start()

    daemon.wait_healthy()
    return daemon, token


def _statuses(responses: list[requests.Response]) -> list[int]:
    return [r.status_code for r in responses]


def _backed_off(send: Callable[[], requests.Response], times: int) -> list[requests.Response]:
    """``send`` ``times`` times: FREE answers of 401, then 429 too_many_attempts with a Retry-After
    in seconds. A refusal that runs out while the loop goes on lets one more failure through, and
    the next refusal is twice as long: at most log2(seconds taken + 1) + 1 more 401s (with counts
    per worker process, two workers would let about 2 * FREE through)."""
    started = time.monotonic()
    responses = [send() for _ in range(times)]
    elapsed = time.monotonic() - started
    statuses = _statuses(responses)
    assert statuses[:throttle.FREE + 1] == [401] * throttle.FREE + [429], statuses
    assert set(statuses) == {401, 429}, statuses
    assert statuses.count(401) <= throttle.FREE + 1 + math.log2(elapsed + 1), (elapsed, statuses)
    first = responses[throttle.FREE]
    assert 1 <= int(first.headers["Retry-After"]) <= throttle.MAX_S, first.headers
    if first.headers.get("Content-Type", "").startswith("application/json"):
        assert first.json()["error"] == "too_many_attempts"
    return responses


def test_wrong_bearer_tokens_back_off_per_address_and_good_ones_are_not_slowed(api: tuple[Daemon, str]) -> None:
    daemon, token = api
    good, wrong = {"Authorization": f"Bearer {token}"}, {"Authorization": "Bearer cyn_wrong"}
    attacker = client("127.0.0.2")
    _backed_off(lambda: attacker.get(f"{daemon.api}/apps", headers=wrong, timeout=10), 300)
    # Even a good token waits out the back-off from that address (a success resets nothing)...
    refused = attacker.get(f"{daemon.api}/apps", headers=good, timeout=10)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    # ...while every other address goes on as before.
    assert requests.get(f"{daemon.api}/apps", headers=good, timeout=10).status_code == 200
    # Successes are not counted: many of them, then a client still has all its free failures.
    user = client("127.0.0.3")
    assert set(_statuses([user.get(f"{daemon.api}/apps", headers=good, timeout=10) for _ in range(50)])) == {200}
    _backed_off(lambda: user.get(f"{daemon.api}/apps", headers=wrong, timeout=10), throttle.FREE + 2)
    # The back-off ends: the attacker's first refusal was BASE_S long (refused requests do not count).
    wait_for(lambda: attacker.get(f"{daemon.api}/apps", headers=good, timeout=10).status_code == 200,
             throttle.BASE_S + 5, "the back-off to end")
    assert "Traceback" not in daemon.output()


def test_wrong_sign_ins_back_off_and_the_dashboard_may_not_be_framed(api: tuple[Daemon, str]) -> None:
    daemon, token = api
    browser = client("127.0.0.4")
    page = browser.get(f"{daemon.api}/signin", timeout=10)
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    responses = _backed_off(lambda: sign_in(browser, daemon.api, "cyn_wrong"), 60)
    assert "Too many failed sign-ins" in responses[throttle.FREE].text
    # A good token from the same address waits too; from another it signs in.
    assert sign_in(browser, daemon.api, token).status_code == 429
    assert sign_in(client("127.0.0.5"), daemon.api, token).status_code == 200


def test_wrong_log_stream_tokens_back_off(api: tuple[Daemon, str]) -> None:
    daemon, token = api
    app = requests.get(f"{daemon.api}/apps", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    url = f"{daemon.api}/apps/{app['apps'][0]['id']}/logs/stream"
    streamer = client("127.0.0.6")
    _backed_off(lambda: streamer.get(url, params={"token": "cyn_wrong"}, timeout=10), 30)
    # A plain GET with a good token is told what the URL is for.
    plain = requests.get(url, params={"token": token}, timeout=10)
    assert (plain.status_code, plain.json()["error"]) == (400, "not_a_websocket")
