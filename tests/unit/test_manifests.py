"""Schema and semantic validation: exact codes and line numbers."""

from __future__ import annotations

import pytest

from cynchrod.core import specs
from cynchrod.desired import declared, manifests


def errors(text: str) -> list[str]:
    return [str(e) for e in manifests.parse("apps/x.yaml", text.encode()).errors]


def test_minimal_manifest_gets_defaults() -> None:
    result = manifests.parse("apps/x.yaml", b"name: web\nimage: img:1\n")
    assert result.errors == ()
    spec = result.spec
    assert spec is not None
    assert (spec.org, spec.name, spec.state, spec.path) == ("default", "web", "running", "apps/x.yaml")
    assert spec.services[0].cpu == 1.0 and spec.services[0].memory == 512
    assert spec.services[0].command is None


def test_full_manifest() -> None:
    spec = manifests.parse("apps/x.yaml", b"""
name: web
org: acme
image: img:1
command: sh -c 'echo "hi there"'
port: 8080
hostPort: 18080
domain: web.example.com
env: {B: 2, A: true, C: text}
cpu: 0.5
memory: 64
state: stopped
restartedAt: 2026-11-28T10:00:00Z
""").spec
    assert spec is not None
    service = spec.services[0]
    assert service.command == ("sh", "-c", 'echo "hi there"')
    assert service.env == (("A", "true"), ("B", "2"), ("C", "text"))
    assert (service.port, service.host_port, service.cpu, service.memory) == (8080, 18080, 0.5, 64)
    assert (spec.org, spec.domain, spec.state) == ("acme", "web.example.com", "stopped")
    assert spec.restarted_at is not None and spec.restarted_at.startswith("2026-11-28")


@pytest.mark.parametrize("text,expected", [
    ("name: web\nimage: i\nbogus: 1\n", ["apps/x.yaml:3: unknown_key: bogus is not a known key"]),
    ("image: i\n", ["apps/x.yaml:1: missing_key: name is a required property"]),
    ("name: web\n", ["apps/x.yaml:1: missing_key: image is required (or build, or services)"]),
    ("name: Web_1\nimage: i\n", ["apps/x.yaml:1: invalid_value: name: 'Web_1' does not match "
                                 "'^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'"]),
    ("name: web\nimage: i\ncpu: 9\n", ["apps/x.yaml:3: out_of_range: cpu: 9 is greater than the maximum of 8"]),
    ("name: web\nimage: i\ncpu: 0\n",
     ["apps/x.yaml:3: out_of_range: cpu: 0 is less than the minimum of 0.01"]),
    ("name: web\nimage: i\nmemory: 32\n",
     ["apps/x.yaml:3: out_of_range: memory: 32 is less than the minimum of 64 (memory is in MB)"]),
    ("name: web\nimage: i\nmemory: 16385\n",
     ["apps/x.yaml:3: out_of_range: memory: 16385 is greater than the maximum of 16384 (memory is in MB)"]),
    ("name: web\nimage: i\nport: '80'\n", ["apps/x.yaml:3: invalid_type: port: '80' is not of type 'integer'"]),
    ("name: web\nimage: i\nstate: paused\n",
     ["apps/x.yaml:3: invalid_value: state: 'paused' is not one of ['running', 'stopped']"]),
    ("name: web\nimage: i\nenv:\n  OK: 1\n  bad-name: 2\n",
     ["apps/x.yaml:5: invalid_value: env.bad-name: 'bad-name' does not match '^[A-Za-z_][A-Za-z0-9_]*$'"]),
    ("name: web\nimage: i\nprivileged: true\n",
     ["apps/x.yaml:3: policy_violation: privileged is not allowed: cynchrod never grants it"]),
    ("name: web\nimage: i\nhostPort: 18080\n", ["apps/x.yaml:3: invalid_value: hostPort needs port"]),
    ("# comment\nname: web\nimage: [i\n",
     ["apps/x.yaml:4: yaml_syntax: expected ',' or ']', but got '<stream end>'"]),
    ("name: web\nname: other\nimage: i\n",
     ['apps/x.yaml:2: yaml_syntax: found duplicate key "name" with value "other" (original value: "web")']),
    ("- name: web\n", ["apps/x.yaml:1: invalid_type: a manifest must be a mapping of keys to values"]),
    ("name: web\nimage: i\n---\nname: b\n",
     ["apps/x.yaml:1: invalid_manifest: expected exactly one YAML document, found 2"]),
    ("a: &x [1]\nb: *x\n", ["apps/x.yaml:2: yaml_alias: YAML aliases are not allowed in manifests"]),
    ("name: web\nimage: i\nservices: {a: {image: i}}\n",
     ["apps/x.yaml:2: invalid_value: image: set it per service when the app has services"]),
    ("name: web\nservices:\n  db:\n    image: i\n    privileged: true\n",
     ["apps/x.yaml:5: policy_violation: services.db.privileged is not allowed: cynchrod never grants it"]),
    ("name: web\nservices:\n  db:\n    image: i\n    volumes: [/etc:/data]\n",
     ["apps/x.yaml:5: policy_violation: services.db.volumes[0]: '/etc:/data' mounts a host path; "
      "only named volumes are allowed"]),
    ("name: web\nimage: i\nvolumes:\n  - data:/var/lib/x\n  - ./here:/x\n",
     ["apps/x.yaml:5: policy_violation: volumes[1]: './here:/x' mounts a host path; only named volumes are allowed"]),
    ("name: web\nimage: i\nvolumes: ['sock:/var/run/docker.sock']\n",
     ["apps/x.yaml:3: policy_violation: volumes[0]: the Docker socket is never mounted"]),
    ("name: web\nimage: i\nvolumes: ['data:../x']\n",
     ["apps/x.yaml:3: invalid_mount: volumes[0]: '../x': a mount path must be absolute (start with /)"]),
    ("name: web\nservices:\n  a: {image: i, depends_on: [b]}\n  b: {image: i, depends_on: [a]}\n",
     ["apps/x.yaml:2: invalid_value: services: depends_on has a cycle: a -> b -> a"]),
    ("name: web\nservices:\n  a: {image: i, depends_on: [nope]}\n",
     ["apps/x.yaml:3: invalid_value: services.a.depends_on: 'nope' is not another service of this app"]),
    ("name: web\nservices:\n  a: {image: i, cpu: 9}\n",
     ["apps/x.yaml:3: out_of_range: services.a.cpu: 9 is greater than the maximum of 8"]),
    ("name: web\nservices:\n  a: {command: [x]}\n",
     ["apps/x.yaml:3: missing_key: services.a: give exactly one of image and build"]),
    ("name: web\nbuild: {repo: /src, context: ../..}\n",
     ["apps/x.yaml:2: policy_violation: build.context: '../..' must stay inside the source repository"]),
    ("name: web\nimage: i\nbuild: {repo: /src}\n",
     ["apps/x.yaml:3: invalid_value: give either image or build, not both"]),
    ("name: web\nimage: i\nsecrets: [db-password, '../x']\n",
     ["apps/x.yaml:3: invalid_value: secrets.1: '../x' does not match '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'"]),
])
def test_errors_have_file_line_code_message(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


@pytest.mark.parametrize("value,expected", [
    ("64MB", "memory is in MB: write 64, not '64MB'"),
    ("512m", "memory is in MB: write 512, not '512m'"),
    ("1GB", "memory is in MB: write 1024, not '1GB'"),
    ("1.5Gi", "memory is in MB: write 1536, not '1.5Gi'"),
    ("'128'", "memory is in MB: write 128, not '128'"),
    ("lots", "memory is a whole number of MB (64 to 16384), e.g. memory: 512; got 'lots'"),
    ("100.5", "memory is a whole number of MB (64 to 16384), e.g. memory: 512; got 100.5"),
])
def test_memory_errors_name_the_unit(value: str, expected: str) -> None:
    assert errors(f"name: web\nimage: i\nmemory: {value}\n") == [f"apps/x.yaml:3: invalid_type: {expected}"]
    nested = errors(f"name: web\nservices:\n  db:\n    image: i\n    memory: {value}\n")
    assert nested == [f"apps/x.yaml:5: invalid_type: services.db.{expected}"]


@pytest.mark.parametrize("text,expected", [
    ("name: web\nimage: i\nmemroy: 64\n",
     "apps/x.yaml:3: unknown_key: memroy is not a known key; did you mean memory?"),
    ("name: web\nimage: i\nHOST-PORT: 1\n",
     "apps/x.yaml:3: unknown_key: HOST-PORT is not a known key; did you mean hostPort?"),
    ("name: web\nimgae: i\n", "apps/x.yaml:2: unknown_key: imgae is not a known key; did you mean image?"),
    ("name: web\nservices:\n  db:\n    image: i\n    replica: 2\n",
     "apps/x.yaml:5: unknown_key: services.db.replica is not a known key; did you mean replicas?"),
    ("name: web\nimage: i\nhealthcheck: {test: x, interval: 5, retires: 2}\n",
     "apps/x.yaml:3: unknown_key: healthcheck.retires is not a known key; did you mean retries?"),
    ("name: web\nimage: i\nzzz: 1\n", "apps/x.yaml:3: unknown_key: zzz is not a known key"),
])
def test_a_misspelt_key_gets_did_you_mean(text: str, expected: str) -> None:
    assert expected in errors(text)


@pytest.mark.parametrize("text,org,expected", [
    (b"name: [web\n", None, "default"),  # no org: key at all: the default org's file
    (b"org: acme\nname: [web\n", None, "acme"),
    (b"org: 'acme'   # ours\nname: [web\n", None, "acme"),
    (b"org: [acme\n", None, None),  # an org: line that cannot be read: nobody's but the operator's
    (b"  org: acme\nname: [\n", None, "default"),  # indented: not the top-level key
    (b"name: web\norg: acme\nimage: i\nmemory: 1MB\n", None, "acme"),
    (b"name: [web\n", "tenant", "tenant"),  # a source pinned to an org
    (b"\xff\xfe", None, "default"),
])
def test_a_failed_file_says_which_org_it_belongs_to(text: bytes, org: str | None, expected: str | None) -> None:
    result = manifests.parse("apps/x.yaml", text, org=org)
    assert result.spec is None and result.org == expected


def test_every_error_is_reported_not_just_the_first() -> None:
    assert [e.split(": ")[1] for e in errors("name: web\nimage: i\ncpu: 9\nmemory: 1\nfoo: 1\n")] == [
        "out_of_range", "out_of_range", "unknown_key"]  # in line order


def test_oversized_manifest() -> None:
    big = b"name: web\nimage: i\n# " + b"x" * manifests.MAX_MANIFEST_BYTES
    assert manifests.parse("apps/x.yaml", big).errors[0].code == "manifest_too_large"


def test_billion_laughs_is_refused_fast() -> None:
    lol = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    result = manifests.parse("apps/x.yaml", lol.encode())
    assert result.errors[0].code == "yaml_alias"


def test_cache_parses_each_blob_once_and_reports_duplicates() -> None:
    blobs = {"1": b"name: a\nimage: i\n", "2": b"name: b\nimage: i\n", "3": b"name: a\nimage: j\n"}
    reads: list[str] = []

    def read(oid: str) -> bytes:
        reads.append(oid)
        return blobs[oid]

    cache = declared.Cache()
    desired = cache.load([("apps/a.yaml", "1"), ("apps/b.yaml", "2"), ("apps/c.yaml", "3")], read)
    assert sorted(desired.apps) == [("default", "a"), ("default", "b")]
    assert [str(e) for e in desired.errors] == [
        "apps/c.yaml:1: duplicate_app: app default/a is already declared in apps/a.yaml"]
    assert desired.failed_paths == {"apps/c.yaml"}
    assert desired.failed_orgs == {"apps/c.yaml": "default"}
    again = cache.load([("apps/a.yaml", "1"), ("apps/b.yaml", "2")], read)
    assert reads == ["1", "2", "3"]  # nothing parsed twice
    assert sorted(again.apps) == [("default", "a"), ("default", "b")]


def test_spec_round_trips_through_json() -> None:
    spec = manifests.parse("apps/x.yaml", b"name: web\nimage: i\ncommand: [a, b]\nenv: {X: 1}\nport: 80\n").spec
    assert spec is not None
    assert specs.AppSpec.from_json(spec.to_json()) == spec


def test_multi_service_app() -> None:
    spec = manifests.parse("apps/x.yaml", b"""
name: shop
memory: 128
env: {LOG: info}
services:
  web:
    image: web:1
    port: 8080
    depends_on: [db]
    env: {LOG: debug, DB: db}
    healthcheck: {test: wget -q -O- localhost:8080, interval: 5}
  db:
    image: db:1
    memory: 256
    volumes: [data:/var/lib/db, conf:/etc/db:ro]
    secrets: [db-password]
""").spec
    assert spec is not None and spec.multi
    db, web = spec.services
    assert (db.name, web.name) == ("db", "web")
    assert db.memory == 256 and web.memory == 128 and web.cpu == 1.0
    assert web.env == (("DB", "db"), ("LOG", "debug")) and db.env == (("LOG", "info"),)
    assert db.volumes == (specs.Volume("data", "/var/lib/db"), specs.Volume("conf", "/etc/db", True))
    assert web.depends_on == ("db",) and db.secrets == ("db-password",)
    assert web.healthcheck == specs.Healthcheck(test=("CMD-SHELL", "wget -q -O- localhost:8080"), interval=5.0)
    assert spec.secret_names == {"db-password"}
    assert specs.AppSpec.from_json(spec.to_json()) == spec


def test_repo_app() -> None:
    spec = manifests.parse("apps/x.yaml", b"name: web\nbuild: {repo: /src/web.git, args: {V: 2}}\nport: 8080\n").spec
    assert spec is not None
    service = spec.services[0]
    assert service.image == "" and service.build == specs.Build(repo="/src/web.git", args=(("V", "2"),))
    assert specs.AppSpec.from_json(spec.to_json()) == spec
