"""``cynchrod convert`` (desired/convert): a native manifest as a compose file and back, for what
each can say; what the other cannot is a warning, never dropped silently."""

from __future__ import annotations

from cynchrod.core import specs
from cynchrod.desired import compose, convert, manifests

NATIVE = b"""name: shop
org: team
domain: shop.example.com
services:
  web:
    image: registry.example.com/shop/web:1.4.2
    command: [serve, --port, "8000", "--price=$5"]
    port: 8000
    hostPort: 8081
    env: {GREETING: hello, PRICE: "$5"}
    cpu: 0.5
    memory: 256
    depends_on: {db: {condition: service_healthy}, migrate: {condition: service_completed_successfully}}
    update: {semver: "^1.4", interval: 30}
  migrate:
    image: registry.example.com/shop/web:1.4.2
    command: [migrate]
    oneshot: true
  db:
    image: postgres:16-alpine
    volumes: ["pgdata:/var/lib/postgresql/data", "conf:/etc/pg:ro"]
    secrets: [db-password]
    healthcheck: {test: "pg_isready -U shop", interval: 5, retries: 10}
    replicas: 1
  worker:
    image: registry.example.com/shop/worker:1.4.2
    replicas: 3
    update: {regex: '^build-(\\d+)$', sort: numeric, commit: false}
"""

EXPRESSIBLE = ("image", "command", "env", "port", "host_port", "cpu", "memory", "volumes", "depends_on",
               "healthcheck", "secrets", "replicas", "update", "depends_on_conditions", "oneshot")


def same(a: specs.AppSpec, b: specs.AppSpec) -> None:
    assert (a.org, a.name, a.domain, a.state) == (b.org, b.name, b.domain, b.state)
    assert [s.name for s in a.services] == [s.name for s in b.services]
    for x, y in zip(a.services, b.services, strict=True):
        assert {k: getattr(x, k) for k in EXPRESSIBLE} == {k: getattr(y, k) for k in EXPRESSIBLE}, x.name


def test_a_native_manifest_becomes_a_compose_file_that_reads_back_the_same() -> None:
    native = manifests.parse("apps/shop.yaml", NATIVE)
    assert native.spec is not None, native.errors
    text, warnings = convert.to_compose(native.spec)
    assert warnings == []
    back = compose.parse("apps/shop", {"apps/shop/compose.yaml": text.encode()})
    assert back.errors == (), text
    assert back.spec is not None
    same(native.spec, back.spec)
    assert "$$5" in text  # Compose interpolates: a literal $ is written $$


def test_a_compose_file_becomes_a_native_manifest_and_what_it_cannot_say_is_warned() -> None:
    native = manifests.parse("apps/shop.yaml", NATIVE)
    assert native.spec is not None
    text, _ = convert.to_compose(native.spec)
    richer = text.replace("  web:\n", "  web:\n    user: '1000'\n    labels: {team: web}\n", 1)
    spec = compose.parse("apps/shop", {"apps/shop/compose.yaml": richer.encode()}).spec
    assert spec is not None
    manifest, warnings = convert.to_native(spec)
    back = manifests.parse("apps/shop.yaml", manifest.encode())
    assert back.errors == (), manifest
    assert back.spec is not None
    same(spec, back.spec)
    assert warnings == ["services.web.labels: not expressible in a native manifest (left out)",
                        "services.web.user: not expressible in a native manifest (left out)"]


def test_a_one_service_compose_app_becomes_a_flat_manifest() -> None:
    spec = compose.parse("apps/blog", {"apps/blog/compose.yaml": b"services:\n  web:\n    image: blog:1\n"
                                       b"    ports: ['8080']\n"}).spec
    assert spec is not None
    manifest, warnings = convert.to_native(spec)
    assert (manifest, warnings) == ("name: blog\nimage: blog:1\nport: 8080\n", [])


def test_a_compose_build_is_warned_towards_a_native_manifest() -> None:
    spec = compose.parse("apps/blog", {"apps/blog/compose.yaml": b"services:\n  web:\n    build: .\n",
                                       "apps/blog/Dockerfile": b"FROM scratch\n"}).spec
    assert spec is not None
    manifest, warnings = convert.to_native(spec)
    assert manifest.startswith("name: blog\nimage: cynchrod/default-blog-web:")
    assert warnings == ["services.web.build: a build context of the manifests repository is not expressible in a "
                        "native manifest (its build: names a repository of its own); the image is the tag cynchrod "
                        "builds from it"]
