"""Compose files as apps (desired/compose): the corpus under tests/data/compose, each directory one
app written the way real projects write them, with the errors it must give (``expect.txt``:
``ok``, or one ``file:line: code: message`` per line; ``*`` ends a line that is a prefix)."""

from __future__ import annotations

import dataclasses
import fnmatch
import pathlib

import pytest

from cynchrod.core import specs
from cynchrod.desired import compose, declared, manifests

CORPUS = pathlib.Path(__file__).parents[1] / "data" / "compose"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def files_of(case: str) -> dict[str, bytes]:
    root = CORPUS / case
    return {f"apps/{case}/{f.relative_to(root).as_posix()}": f.read_bytes()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != "expect.txt"}


def parse(case: str, *, org: str | None = None) -> manifests.Result:
    return compose.parse(f"apps/{case}", files_of(case), org=org)


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES)
def test_corpus(case: str) -> None:
    expected = (CORPUS / case / "expect.txt").read_text().splitlines()
    result = parse(case)
    if expected == ["ok"]:
        assert result.errors == ()
        assert result.spec is not None
        return
    assert result.spec is None
    got = [str(e) for e in result.errors]
    assert len(got) == len(expected), got
    for line, want in zip(got, expected, strict=True):
        assert fnmatch.fnmatchcase(line, want.replace("[", "[[]")) if want.endswith("*") else line == want


def service(spec: specs.AppSpec | None, name: str) -> specs.ServiceSpec:
    assert spec is not None
    return next(s for s in spec.services if s.name == name)


def test_web_db_cache_maps_onto_the_spec() -> None:
    spec = parse("web-db-cache").spec
    assert spec is not None
    assert (spec.org, spec.name, spec.domain, spec.path) == ("shop", "shop", "shop.example.com",
                                                             "apps/web-db-cache/compose.yaml")
    web = service(spec, "web")
    assert web.image == "ghcr.io/example/shop:1.4.2"
    env = dict(web.env)
    assert env["DATABASE_URL"] == "postgres://shop:s3cret@db:5432/shop"
    assert env["SECRET_KEY"] == "dev key" and env["WORKERS"] == "4" and env["DEBUG"] == "false"
    assert (web.port, web.host_port, web.cpu, web.memory, web.memory_reservation) == (8000, 8000, 0.5, 256, 128)
    assert web.depends_on == ("cache", "db")
    assert web.depends_on_conditions == (("db", "service_healthy"),)
    db = service(spec, "db")
    assert db.healthcheck == specs.Healthcheck(test=("CMD-SHELL", "pg_isready -U shop"), interval=5.0, timeout=3.0,
                                               retries=10, start_period=10.0)
    assert db.volumes == (specs.Volume("pgdata", "/var/lib/postgresql/data"),)
    cache = service(spec, "cache")
    assert cache.command == ("redis-server", "--save", "", "--appendonly", "no")
    assert cache.tmpfs == ("/data",)
    assert (cache.cpu, cache.memory) == (specs.DEFAULT_CPU, specs.DEFAULT_MEMORY_MB)


def test_override_is_merged_as_compose_does() -> None:
    api = service(parse("override").spec, "api")
    assert api.command == ("serve", "--port", "8080", "--reload")
    assert dict(api.env) == {"LOG_LEVEL": "debug", "REGION": "eu"}
    assert (api.port, api.host_port) == (8080, 8080)
    assert api.ports == (specs.Port(9229, 9229),)
    assert api.labels == (("team", "backend"), ("tier", "api"))


def test_files_list_include_profiles() -> None:
    app = service(parse("files-list").spec, "app")
    assert (app.replicas, app.cpu, app.memory) == (3, 2.0, 1024)
    spec = parse("include").spec
    assert spec is not None and [s.name for s in spec.services] == ["app", "db"]
    assert service(spec, "db").volumes == (specs.Volume("dbdata", "/var/lib/postgresql/data"),)
    spec = parse("profiles").spec
    assert spec is not None and [s.name for s in spec.services] == ["app", "metrics"]


def test_healthcheck_forms_do_not_double_the_prefix() -> None:
    spec = parse("healthcheck-forms").spec
    a = service(spec, "a").healthcheck
    assert a is not None
    assert a.test == ("CMD", "wget", "-q", "-O-", "http://localhost:8080/health")
    assert (a.interval, a.timeout, a.start_period) == (90.0, 10.0, 40.0)
    b = service(spec, "b").healthcheck
    assert b is not None and b.test == ("CMD-SHELL", "curl -f http://localhost/ || exit 1")
    assert service(spec, "c").healthcheck is None and service(spec, "d").healthcheck is None


def test_long_syntax_and_plain_keys() -> None:
    web = service(parse("long-syntax").spec, "web")
    assert (web.port, web.host_port, web.ports) == (80, 8081, (specs.Port(443, 8443),))
    assert web.volumes == (specs.Volume("html", "/usr/share/nginx/html", True), specs.Volume("", "/var/log/nginx"))
    assert web.tmpfs == ("/var/cache/nginx",)
    assert (web.read_only, web.user, web.working_dir, web.hostname) == (True, "101:101", "/usr/share/nginx", "web")
    assert (web.stop_signal, web.stop_grace_period, web.init) == ("SIGQUIT", 60.0, True)
    assert web.entrypoint == ("/docker-entrypoint.sh",)


def test_dollar_escapes_and_bare_names_from_dotenv() -> None:
    job = service(parse("dollar-escape").spec, "job")
    assert job.command == ("sh", "-c", "echo $HOME and hello named")
    assert dict(job.env) == {"PRICE": "$5", "FROM_DOTENV": "yes"}


def test_named_by_directory_and_state() -> None:
    spec = parse("named-by-directory").spec
    assert spec is not None and (spec.name, spec.state, spec.org) == ("named-by-directory", "stopped", "default")


def test_daemon_environment_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "from-the-daemon")
    assert parse("required-var-missing").spec is None


def test_an_org_pinned_repository_refuses_other_orgs() -> None:
    result = parse("web-db-cache", org="other")
    assert [e.code for e in result.errors] == ["org_forbidden"]


def test_cache_parses_each_app_once_and_native_manifests_beside() -> None:
    blobs: dict[str, bytes] = {}
    listing: list[tuple[str, str]] = []
    for case in ("web-db-cache", "override", "wordpress"):
        for path, raw in files_of(case).items():
            blobs[f"id-{path}"] = raw
            listing.append((path, f"id-{path}"))
    blobs["id-native"] = b"name: native\nimage: busybox\n"
    listing.append(("apps/native.yaml", "id-native"))
    reads: list[str] = []

    def read(oid: str) -> bytes:
        reads.append(oid)
        return blobs[oid]

    cache = declared.Cache()
    desired = cache.load(listing, read)
    assert desired.errors == ()
    assert sorted(desired.apps) == [("default", "native"), ("default", "override"), ("default", "wordpress"),
                                    ("shop", "shop")]
    assert cache.parses == 4
    reads.clear()
    cache.load(listing, read)  # a no-op pass
    assert (cache.parses, reads) == (4, [])
    blobs["id-2"] = b"POSTGRES_PASSWORD=rotated\nTAG=1.4.2\n"
    changed = [(p, "id-2" if p == "apps/web-db-cache/.env" else o) for p, o in listing]
    desired = cache.load(changed, read)
    assert cache.parses == 5  # that app alone
    assert "rotated" in dict(service(desired.apps[("shop", "shop")], "web").env)["DATABASE_URL"]


def test_absolute_paths_as_cynchrod_validate_gives_them() -> None:
    files = {f"/abs{p[len('apps'):]}": raw for p, raw in files_of("wordpress").items()}
    files["/abs/solo.yaml"] = b"name: solo\nimage: busybox\n"
    desired = declared.Cache().load([(p, p) for p in files], files.__getitem__)
    assert desired.errors == () and sorted(desired.apps) == [("default", "solo"), ("default", "wordpress")]


def test_external_secrets_are_cynchrods_own() -> None:
    spec = parse("secrets-external").spec
    assert service(spec, "db").secrets == ("db-password",)
    assert service(spec, "app").secrets == ("api-token", "db-password")


def test_bind_mounts_of_repository_files_are_copied_by_content(tmp_path: pathlib.Path) -> None:
    files = files_of("bind-ok")
    web = service(compose.parse("apps/bind-ok", files, files_dir=tmp_path).spec, "web")
    conf, site = web.binds
    assert (conf.target, conf.read_only, site.target, site.read_only) == (
        "/etc/nginx/conf.d/default.conf", True, "/usr/share/nginx/html", True)
    assert pathlib.Path(conf.source).read_text() == "server { listen 80; }\n"
    assert pathlib.Path(conf.source).name == "default.conf"
    assert sorted(p.relative_to(site.source).as_posix() for p in pathlib.Path(site.source).rglob("*")) == [
        "a", "a/b.txt", "index.html"]
    assert oct(pathlib.Path(site.source, "index.html").stat().st_mode & 0o777) == "0o644"
    # The same content is the same copy (no new container); a change is a new one (only for that mount).
    again = service(compose.parse("apps/bind-ok", files, files_dir=tmp_path).spec, "web")
    assert again.binds == web.binds
    files["apps/bind-ok/site/index.html"] = b"changed\n"
    changed = service(compose.parse("apps/bind-ok", files, files_dir=tmp_path).spec, "web")
    assert changed.binds[0] == conf and changed.binds[1].source != site.source
    assert pathlib.Path(changed.binds[1].source, "index.html").read_text() == "changed\n"
    assert pathlib.Path(site.source, "index.html").read_text() == "index\n"  # the running copy is untouched


def test_configs_are_read_only_files(tmp_path: pathlib.Path) -> None:
    proxy = service(compose.parse("apps/configs", files_of("configs"), files_dir=tmp_path).spec, "proxy")
    got = {b.target: pathlib.Path(b.source).read_text() for b in proxy.binds}
    assert got == {"/etc/caddy/Caddyfile": ':80 {\n  respond "ok"\n}\n', "/banner": "Welcome to example\n",
                   "/motd": "be nice"}
    assert all(b.read_only for b in proxy.binds) and (proxy.tty, proxy.stdin_open) == (True, True)


def test_anchors_and_merge_keys() -> None:
    spec = parse("anchors").spec
    a, b = service(spec, "a"), service(spec, "b")
    assert dict(a.env) == {"TZ": "Europe/Berlin", "LOG_LEVEL": "info"} and a.memory == 128
    assert dict(b.env) == {"TZ": "Europe/Berlin", "LOG_LEVEL": "debug"} and b.memory == 128


def test_a_billion_laughs_is_refused_after_a_bounded_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file asks for 10**9 values; the walk makes MAX_NODES of them and stops (work, not time, is bounded)."""
    from cynchrod.desired import yamlio
    made = 0
    walk = yamlio.plain

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal made
        made += 1
        return walk(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(yamlio, "MAX_NODES", 5_000)
    monkeypatch.setattr(yamlio, "plain", counted)
    result = parse("billion-laughs")
    assert [e.code for e in result.errors] == ["manifest_too_large"]
    assert made == 5_001  # the value over the limit is where it stops


def test_update_blocks_map_onto_the_same_policy_as_a_manifests() -> None:
    from cynchrod.core import updates
    spec = parse("updates").spec
    assert service(spec, "web").update == updates.UpdatePolicy(semver="^1.4", interval=30.0)
    assert service(spec, "worker").update == updates.UpdatePolicy(digest=True, commit=False)
    assert service(spec, "db").update is None
    app = parse("update-app").spec
    assert service(app, "web").update == updates.UpdatePolicy(regex=r"^v(\d+)\.(\d+)\.(\d+)$", interval=3600.0)


def test_an_update_block_changes_no_hash() -> None:
    plain = compose.parse("apps/a", {"apps/a/compose.yaml": b"services:\n  web:\n    image: web:1.0\n"}).spec
    followed = compose.parse("apps/a", {"apps/a/compose.yaml": b"services:\n  web:\n    image: web:1.0\n"
                                        b"    x-cynchrod:\n      update: {semver: '^1'}\n"}).spec
    assert plain is not None and followed is not None
    assert service(followed, "web").update is not None
    assert service(plain, "web").hash(restarted_at=None) == service(followed, "web").hash(restarted_at=None)


def test_an_interpolated_image_may_be_followed_without_commits() -> None:
    result = compose.parse("apps/a", {"apps/a/.env": b"TAG=1.0\n", "apps/a/compose.yaml": (
        b"services:\n  web:\n    image: web:${TAG}\n    x-cynchrod:\n      update: {semver: '^1', commit: false}\n")})
    assert result.errors == ()
    assert service(result.spec, "web").update is not None


def test_one_network_and_its_aliases_map_onto_the_apps_private_network() -> None:
    spec = parse("networks").spec
    assert service(spec, "api").aliases == ("api.internal", "legacy-api")
    assert service(spec, "proxy").aliases == () and service(spec, "db").aliases == ()
    assert service(spec, "api").hash(restarted_at=None) != dataclasses.replace(
        service(spec, "api"), aliases=()).hash(restarted_at=None)
    # No alias: the hash a spec had before aliases existed.
    assert "aliases" not in service(spec, "db").canonical(restarted_at=None)
    again = specs.AppSpec.from_json(spec.to_json()) if spec is not None else None
    assert again == spec


def test_two_networks_in_one_app_are_refused_even_across_services() -> None:
    result = compose.parse("apps/a", {"apps/a/compose.yaml": (
        b"services:\n  web:\n    image: w\n  api:\n    image: a\n    networks: [back]\nnetworks:\n  back:\n")})
    assert [e.code for e in result.errors] == ["unsupported_key"]
    assert "back and default" in result.errors[0].message


def test_secrets_from_a_file_or_dotenv_are_carried_in_memory_only() -> None:
    spec = parse("secrets-repo").spec
    assert spec is not None
    assert service(spec, "api").secrets == ("api-key", "db-password", "vault-token")
    assert service(spec, "worker").secrets == ("db-password",)
    assert spec.secret_values == (("api-key", b"k-123\n"), ("db-password", b"hunter2"))
    assert spec.inline_secrets == frozenset({"api-key", "db-password"})
    # Never in what is recorded, logged or put on a container.
    for text in (repr(spec), spec.json_text, *(s.canonical(restarted_at=None) for s in spec.services)):
        assert "k-123" not in text and "hunter2" not in text
    assert specs.AppSpec.from_json(spec.to_json()).secret_values == ()


def test_a_service_x_cynchrod_that_is_not_a_mapping_is_an_error_not_a_crash() -> None:
    result = compose.parse("apps/a", {"apps/a/compose.yaml": b"services:\n  web:\n    image: w:1\n"
                                      b"    x-cynchrod: yes please\n"})
    assert [(e.code, e.line) for e in result.errors] == [("invalid_type", 4)], result.errors
def test_restart_no_is_a_oneshot_and_its_dependent_waits_for_it() -> None:
    """Health-gated deploys (docs/health.md): a ``restart: "no"`` service runs once, and a dependent with
    ``service_completed_successfully`` starts after it."""
    result = parse("restart-no")
    assert result.errors == () and result.spec is not None
    assert service(result.spec, "migrate").oneshot and not service(result.spec, "web").oneshot
    assert service(result.spec, "web").depends_on_conditions == (("migrate", "service_completed_successfully"),)


def test_x_cynchrod_readiness_keys_reach_the_spec_as_a_native_manifest_s_do() -> None:
    spec = parse("x-cynchrod-health").spec
    assert spec is not None
    assert spec.on_failure == "rollback"
    web, migrate = service(spec, "web"), service(spec, "migrate")
    assert (web.min_ready, web.health_timeout) == (5.0, 120.0)
    assert (migrate.min_ready, migrate.health_timeout, migrate.oneshot) == (5.0, 120.0, True)
    assert web.healthcheck is not None and web.healthcheck.retries == 3
    # As in a native manifest, they are not part of a unit's hash: changing them remakes nothing.
    plain = compose.parse("apps/x-cynchrod-health", {
        "apps/x-cynchrod-health/compose.yaml": (CORPUS / "x-cynchrod-health" / "compose.yaml").read_text()
        .split("x-cynchrod:")[0].encode()}).spec
    assert plain is not None and plain.on_failure == "keep" and service(plain, "web").min_ready is None
    assert plain.hash == spec.hash


def test_build_maps_onto_a_content_tagged_build(tmp_path: pathlib.Path) -> None:
    """``build:`` is a folder of the app's directory copied by content; the image is tagged by the
    digest of the context, Dockerfile, target and args, so equal content is the same tag."""
    files = files_of("build")
    spec = compose.parse("apps/build", files, files_dir=tmp_path).spec
    web, worker, tools = service(spec, "web"), service(spec, "worker"), service(spec, "tools")
    assert web.build is not None and worker.build is not None and tools.build is not None
    assert web.image.startswith("cynchrod/default-build-web:")
    assert worker.image.startswith("cynchrod/default-build-worker:")
    assert web.build.local and web.build.context == worker.build.context  # one copy of one content
    assert sorted(p.name for p in pathlib.Path(web.build.context).iterdir()) == ["Dockerfile", "Dockerfile.multi",
                                                                                "index.html"]
    assert (worker.build.dockerfile, worker.build.target) == ("Dockerfile.multi", "worker")
    assert worker.build.args == (("CHANNEL", "stable"), ("VERSION", "1.0"))  # a bare name from .env
    # The compose file and .env are not part of a context: a commit to them rebuilds nothing.
    assert sorted(p.name for p in pathlib.Path(tools.build.context).rglob("*") if p.is_file()) == [
        "Dockerfile", "Dockerfile", "Dockerfile.multi", "index.html"]
    edited = {**files, "apps/build/compose.yaml": files["apps/build/compose.yaml"] + b"x-cynchrod: {state: stopped}\n",
              "apps/build/.env": b"CHANNEL=stable\nOTHER=1\n"}
    again = compose.parse("apps/build", edited, files_dir=tmp_path).spec
    assert again is not None and spec is not None
    assert [s.image for s in again.services] == [s.image for s in spec.services]
    # New content in the context is a new tag for the services built from it alone.
    changed = compose.parse("apps/build", {**files, "apps/build/web/index.html": b"v2\n"}, files_dir=tmp_path).spec
    assert service(changed, "web").image != web.image and service(changed, "worker").image != worker.image
    assert service(changed, "tools").image != tools.image  # "." holds web/ too
    bumped = compose.parse("apps/build", {**files, "apps/build/.env": b"CHANNEL=beta\n"}, files_dir=tmp_path).spec
    assert service(bumped, "worker").image != worker.image and service(bumped, "web").image == web.image


def test_a_build_target_stays_out_of_the_hash_when_unset() -> None:
    plain = specs.ServiceSpec(name="web", image="x", build=specs.Build(repo="https://example.com/r.git"))
    assert '"target"' not in plain.canonical(restarted_at=None)
    staged = dataclasses.replace(plain, build=specs.Build(repo="https://example.com/r.git", target="prod"))
    assert staged.hash(restarted_at=None) != plain.hash(restarted_at=None)
    assert specs.AppSpec.from_json(specs.AppSpec("o", "a", (staged,)).to_json()).services[0] == staged


def test_a_writable_bind_is_the_apps_own_copy_seeded_once_and_kept(tmp_path: pathlib.Path) -> None:
    text = (b"services:\n  web:\n    image: x\n    volumes:\n      - ./data:/data:rw\n      - type: bind\n"
            b"        source: ./conf/app.ini\n        target: /etc/app.ini\n        read_only: false\n"
            b"      - ./data:/ro\n")
    files = {"apps/rw/compose.yaml": text, "apps/rw/data/seed.txt": b"seed\n", "apps/rw/conf/app.ini": b"a=1\n"}
    spec = compose.parse("apps/rw", files, files_dir=tmp_path).spec
    data, ini, ro = service(spec, "web").binds
    assert (data.source, data.read_only) == (str(tmp_path / "rw/default/rw/data"), False)
    assert (ini.source, ini.read_only) == (str(tmp_path / "rw/default/rw/conf/app.ini"), False)
    assert ro.read_only and ro.source != data.source  # the same folder mounted read-only is the content's copy
    assert (pathlib.Path(data.source) / "seed.txt").read_bytes() == b"seed\n"
    assert pathlib.Path(ini.source).read_bytes() == b"a=1\n"
    # What the app writes stays: a new commit changing the seed neither reseeds nor recreates.
    (pathlib.Path(data.source) / "seed.txt").write_bytes(b"written by the app\n")
    (pathlib.Path(data.source) / "more.txt").write_bytes(b"more\n")
    again = compose.parse("apps/rw", {**files, "apps/rw/data/seed.txt": b"seed v2\n"}, files_dir=tmp_path).spec
    assert again is not None and spec is not None
    assert service(again, "web").binds[0] == data
    assert spec.service_hash(spec.services[0]) != "" and \
        again.service_hash(again.services[0]) != spec.service_hash(spec.services[0])  # the ro copy changed
    assert (pathlib.Path(data.source) / "seed.txt").read_bytes() == b"written by the app\n"
    assert (pathlib.Path(data.source) / "more.txt").exists()


def test_prune_removes_unused_copies_only_a_batch_at_a_time(tmp_path: pathlib.Path) -> None:
    from cynchrod.desired.compose import files as copies

    made = [copies.materialise(tmp_path, "apps/a/x", {"apps/a/x": f"v{n}\n".encode()}) for n in range(5)]
    rw = copies.writable(tmp_path, org="o", app="a", directory="apps/a", inside="apps/a/d",
                         members={"apps/a/d/f": b"1"})
    (tmp_path / "unrelated").mkdir()
    kept = specs.AppSpec("o", "a", (specs.ServiceSpec("web", "x", binds=(specs.Bind(made[0], "/x"),)),)).json_text
    removed = copies.prune(tmp_path, [kept, f'"context": "{made[1].rsplit("/", 1)[0]}"'], limit=2)
    assert len(removed) == 2
    assert copies.prune(tmp_path, [kept, made[1]], limit=2) != []
    assert copies.prune(tmp_path, [kept, made[1]]) == []
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([pathlib.Path(made[0]).parent.name, pathlib.Path(made[1]).parent.name, "rw", "unrelated"])
    assert pathlib.Path(rw).exists()
