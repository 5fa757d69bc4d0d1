"""The registry client (``cynchrod.desired.registry``) against Debian's docker-registry on loopback,
with and without basic auth, and through a proxy that counts requests, demands a Bearer token,
answers garbage, errors, 429 or slowly. Images are built locally (busybox, FROM scratch) and pushed."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest

from cynchrod.core import updates
from cynchrod.core.errors import RegistryError
from cynchrod.desired import registry
from tests.registryd import LocalRegistry, Proxy, Pusher

pytestmark = pytest.mark.xdist_group("registry")
REPO = "shop/web"
TAGS = ["1.4.2", "1.5.0", "2.0.0"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, LocalRegistry, dict[str, str]]]:
    """An open registry and one with basic auth over the same storage, with three tags pushed."""
    root = tmp_path_factory.mktemp("registry")
    (root / "open").mkdir()
    (root / "auth").mkdir()
    open_ = LocalRegistry(root / "open")
    locked = LocalRegistry(root / "auth", htpasswd=("bot", "s3cret"), storage=open_.storage)
    pusher = Pusher()
    try:
        names = {tag: pusher.push(open_.host, REPO, tag, content=tag) for tag in TAGS}
        yield open_, locked, names
    finally:
        pusher.cleanup()
        open_.stop()
        locked.stop()


def ref(host: str, repo: str = REPO, tag: str = "1.4.2") -> updates.ImageRef:
    return updates.parse_reference(f"{host}/{repo}:{tag}")


def test_tags_and_digests(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    open_, _, _ = served
    client = registry.Registry()
    assert sorted(client.tags(ref(open_.host))) == TAGS
    digest = client.digest(ref(open_.host), "1.5.0")
    assert digest is not None and digest.startswith("sha256:")
    assert digest != client.digest(ref(open_.host), "2.0.0")
    assert client.digest(ref(open_.host), "9.9.9") is None


def test_digest_is_the_one_docker_resolves(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    import subprocess

    open_, _, names = served
    repo_digests = subprocess.run(["docker", "image", "inspect", "-f", "{{json .RepoDigests}}", names["1.5.0"]],
                                  check=True, capture_output=True, text=True).stdout
    digest = registry.Registry().digest(ref(open_.host), "1.5.0")
    assert f"@{digest}" in repo_digests


def test_basic_auth_with_the_org_credentials(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    _, locked, _ = served
    client = registry.Registry()
    with pytest.raises(RegistryError) as caught:
        client.tags(ref(locked.host))
    assert caught.value.code == "registry_unauthorized"
    client = registry.Registry()
    with pytest.raises(RegistryError) as caught:
        client.tags(ref(locked.host), credentials=registry.Credentials("bot", "wrong"))
    assert caught.value.code == "registry_unauthorized" and "wrong" not in str(caught.value)
    auths = registry.parse_auths(json.dumps({locked.host: {"username": "bot", "password": "s3cret"}}).encode())
    assert sorted(registry.Registry().tags(ref(locked.host), credentials=auths[locked.host])) == TAGS
    docker_style = json.dumps({"auths": {f"http://{locked.host}": {"auth": base64.b64encode(b"bot:s3cret").decode()}}})
    assert registry.parse_auths(docker_style.encode()) == auths


def test_an_unreadable_auth_secret_never_echoes_it() -> None:
    with pytest.raises(RegistryError) as caught:
        registry.parse_auths(b'{"h": {"username": "u"}} hunter2')
    assert "hunter2" not in str(caught.value) and caught.value.code == "registry_unauthorized"


def test_bearer_token_from_the_challenge(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    open_, _, _ = served
    proxy = Proxy(open_.host, mode="bearer")
    try:
        client = registry.Registry()
        creds = registry.Credentials("bot", "s3cret")
        assert sorted(client.tags(ref(proxy.host), credentials=creds)) == TAGS
        assert client.digest(ref(proxy.host), "2.0.0", credentials=creds) is not None
        assert len(proxy.token_requests) == 1  # cached for the second call
        asked = proxy.token_requests[0]
        assert asked["authorization"] == "Basic " + base64.b64encode(b"bot:s3cret").decode()
        assert "scope=repository%3Ashop%2Fweb%3Apull" in asked["query"] and "service=test" in asked["query"]
    finally:
        proxy.stop()


def test_pagination_follows_link(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    open_, _, _ = served
    proxy = Proxy(open_.host, mode="paginate")
    try:
        assert sorted(registry.Registry().tags(ref(proxy.host))) == TAGS
        assert proxy.count[f"/v2/{REPO}/tags/list"] == 2
    finally:
        proxy.stop()


@pytest.mark.parametrize(("mode", "code"), [("garbage", "registry_garbage"), ("error", "registry_unreachable"),
                                             ("ratelimit", "registry_unreachable")])
def test_bad_answers_back_off_without_asking_again(served: tuple[LocalRegistry, LocalRegistry, dict[str, str]],
                                                    mode: str, code: str) -> None:
    open_, _, _ = served
    proxy = Proxy(open_.host, mode=mode)
    try:
        client = registry.Registry()
        with pytest.raises(RegistryError) as caught:
            client.tags(ref(proxy.host))
        assert caught.value.code == code
        assert client.backing_off(proxy.host) >= 4
        if mode == "ratelimit":
            assert client.backing_off(proxy.host) > 25  # Retry-After: 30 honoured
        with pytest.raises(RegistryError) as again:
            client.tags(ref(proxy.host))
        assert "backing off" in str(again.value)
        assert sum(proxy.count.values()) == 1
        assert client.backing_off(open_.host) == 0  # per registry
        assert sorted(client.tags(ref(open_.host))) == TAGS
    finally:
        proxy.stop()


def test_down_and_slow_registries_fail_within_the_timeout(
        served: tuple[LocalRegistry, LocalRegistry, dict[str, str]]) -> None:
    from tests.helpers import free_port

    client = registry.Registry(timeout=(1.0, 1.0))
    start = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        client.tags(ref(f"127.0.0.1:{free_port()}"))
    assert caught.value.code == "registry_unreachable" and "cannot connect" in str(caught.value)
    open_, _, _ = served
    proxy = Proxy(open_.host, mode="slow", delay=3)
    try:
        with pytest.raises(RegistryError) as slow:
            client.tags(ref(proxy.host))
        assert "timed out" in str(slow.value)
    finally:
        proxy.stop()
    assert time.monotonic() - start < 2.9


def test_loopback_is_plain_http_and_other_hosts_tls() -> None:
    assert registry.is_loopback("127.0.0.1:5000") and registry.is_loopback("[::1]:5000")
    assert registry.is_loopback("localhost:5000") and not registry.is_loopback("registry.example.com")
    assert registry.Registry()._base("r.example.com") == "https://r.example.com"
    assert registry.Registry(insecure=["r.lan:5000"])._base("r.lan:5000") == "http://r.lan:5000"
    assert registry.insecure_hosts("http://10.213.0.1:5000") == ["10.213.0.1:5000"]
    assert registry.insecure_hosts("https://r.example.com") == registry.insecure_hosts("") == []
