"""Limits, OOM, quotas, multi-service apps, secrets, delete and policy against a real dockerd."""

from __future__ import annotations

import json
import os
import time

import docker

from cynchrod import runtime
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, TEST_IMAGE_2, git, wait_for

SLEEP = "[sleep, '3600']"


def manifest(name: str, extra: str = "", image: str = TEST_IMAGE) -> str:
    return f"name: {name}\nimage: {image}\ncommand: {SLEEP}\nmemory: 64\n{extra}"


def run(client: docker.DockerClient, container_id: str, *cmd: str) -> str:
    exec_id = client.api.exec_create(container_id, list(cmd))["Id"]
    output: bytes = client.api.exec_start(exec_id)
    return output.decode()


SHOP = f"""name: shop
memory: 64
services:
  db:
    image: {TEST_IMAGE}
    command: [sh, -c, 'mkdir -p /www && echo pong > /www/ping && exec httpd -f -p 8080 -h /www']
    volumes: [data:/var/lib/db]
    secrets: [db-password]
  web:
    image: {TEST_IMAGE}
    command: [httpd, -f, -p, '8080']
    port: 8080
    depends_on: [db]
    cpu: 0.5
    memory: 96
"""


def test_per_service_limits_and_private_network(repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    harness.secrets.set("default", "db-password", b"s3cret\n")
    repo.push({"apps/shop.yaml": SHOP, "apps/solo.yaml": manifest("solo")})
    result = harness.sync()
    assert result.ok, result
    rows = {(r["Labels"][runtime.LABEL_APP], r["Labels"][runtime.LABEL_SERVICE]): r
            for r in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)}
    assert set(rows) == {("shop", "db"), ("shop", "web"), ("solo", "main")}
    db, web = rows[("shop", "db")], rows[("shop", "web")]
    web_host = harness.rt.api.inspect_container(web["Id"])["HostConfig"]
    db_host = harness.rt.api.inspect_container(db["Id"])["HostConfig"]
    assert (web_host["NanoCpus"], web_host["Memory"]) == (500_000_000, 96 * 2**20)
    assert (db_host["NanoCpus"], db_host["Memory"], db_host["MemorySwap"]) == (10**9, 64 * 2**20, 64 * 2**20)
    network = harness.rt.network_name("default", "shop")
    assert web_host["NetworkMode"] == network
    labels = docker_client.api.inspect_network(network)["Labels"]
    assert labels[runtime.LABEL_OWNER] == harness.rt.owner and labels[runtime.LABEL_APP] == "shop"
    # The row shows the main service (the first with a port) and every service's units.
    shop = harness.app("shop")
    web_port = int(web["Ports"][0]["PublicPort"])
    assert (shop.image, shop.port, shop.host_port, shop.container_id) == (TEST_IMAGE, 8080, web_port, web["Id"])
    services = {s["name"]: s for s in json.loads(shop.services_json or "[]")}
    assert services["web"]["host_port"] == web_port and services["db"]["port"] is None
    assert [u["state"] for s in services.values() for u in s["units"]] == ["running", "running"]
    # The web service reaches the db service by its name over the private network.
    wait_for(lambda: run(docker_client, web["Id"], "wget", "-q", "-O-", "http://db:8080/ping") == "pong\n", 10,
             "web to reach db")
    # The single-container app is not on it.
    assert harness.rt.api.inspect_container(rows[("solo", "main")]["Id"])["HostConfig"]["NetworkMode"] == "default"
    # The secret is a read-only 0400 file, never in env or labels.
    assert run(docker_client, db["Id"], "cat", "/run/secrets/db-password") == "s3cret\n"
    assert run(docker_client, db["Id"], "stat", "-c", "%a", "/run/secrets/db-password").strip() == "400"
    inspect = harness.rt.api.inspect_container(db["Id"])
    assert "s3cret" not in str(inspect["Config"]["Env"]) + str(inspect["Config"]["Labels"])
    shop = harness.app("shop")
    assert shop.status == "running"
    assert "s3cret" not in str(harness.db.deployments(shop.id)) + str(shop)

    # A change to one service recreates that service only.
    repo.push({"apps/shop.yaml": SHOP.replace("memory: 96", "memory: 128")})
    result = harness.sync()
    assert [a.actions for a in result.apps if a.name == "shop"] == [["recreate default/shop [web]: changed: memory"]]
    after = {(r["Labels"][runtime.LABEL_APP], r["Labels"][runtime.LABEL_SERVICE]): r["Id"]
             for r in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)}
    assert after[("shop", "db")] == db["Id"] and after[("shop", "web")] != web["Id"]

    # Rotating the secret redeploys the app that uses it, and only that one.
    harness.secrets.set("default", "db-password", b"rotated\n")
    result = harness.sync()
    changed = {a.name: a.actions for a in result.apps}
    assert changed["shop"] == ["recreate default/shop [db]: changed: secret_digest"]
    assert changed["solo"] == []
    new_db = next(r["Id"] for r in harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)
                  if r["Labels"][runtime.LABEL_SERVICE] == "db")
    assert run(docker_client, new_db, "cat", "/run/secrets/db-password") == "rotated\n"
    assert "rotated" not in str(harness.rt.api.inspect_container(new_db)["Config"]["Labels"])

    # Delete: containers, the private network and the staged secret files go; the volume (data) stays.
    staged = harness.secrets.app_dir("default", "shop")
    assert (staged / "db-password").stat().st_mode & 0o777 == 0o400
    repo.push({"apps/shop.yaml": None}, "delete shop")
    assert harness.sync().ok
    remaining = [r["Labels"][runtime.LABEL_APP] for r in
                 harness.rt.api.containers(all=True, filters=harness.rt.owner_filter)]
    assert remaining == ["solo"]
    assert docker_client.api.networks(names=[network]) == []
    assert not staged.exists()
    assert docker_client.api.images(filters={"label": f"{runtime.LABEL_APP}=shop"}) == []
    assert docker_client.api.volumes(filters={"name": harness.rt.volume_name("default", "shop", "data")})["Volumes"]
    assert harness.db.app(shop.id).status == "removed"  # type: ignore[union-attr]


def test_missing_secret_fails_that_app_alone(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a", "secrets: [nope]\n"), "apps/b.yaml": manifest("b")})
    result = harness.sync()
    outcome = {a.name: a for a in result.apps}
    assert outcome["a"].status == "failed"
    assert outcome["a"].error == ("secret_missing: secret(s) nope not set in org default "
                                  "(cynchrod secret set default/nope)")
    assert outcome["b"].status == "running"
    assert list(harness.containers()) == ["b"]
    harness.secrets.set("default", "nope", b"x")
    assert harness.sync().ok
    assert sorted(harness.containers()) == ["a", "b"]


def test_oom_killed_is_reported(repo, harness: Harness) -> None:
    hog = "[sh, -c, 'x=$(head -c 200000000 /dev/zero | tr \"\\\\0\" x); sleep 3600']"
    repo.push({"apps/hog.yaml": f"name: hog\nimage: {TEST_IMAGE}\ncommand: {hog}\nmemory: 64\n"})
    harness.sync()
    wait_for(lambda: harness.containers()["hog"]["State"] == "exited", 30, "the hog to be OOM-killed")
    harness.sync()
    app = harness.app("hog")
    assert app.last_error is not None and app.last_error.startswith(
        "oom_killed: service main of default/hog was killed for exceeding its memory limit of 64 MB")
    assert app.note == "oom_killed"  # the column the next pass reads back, not the text's prefix
    heal = harness.db.deployments(app.id)[0]
    assert (heal.trigger, heal.error_code) == ("self-heal", "oom_killed")


def test_quota_first_come_by_commit_then_name(repo, harness: Harness) -> None:
    harness.max_apps["default"] = 2
    repo.push({"apps/c.yaml": manifest("c")}, "c first")
    repo.push({"apps/b.yaml": manifest("b"), "apps/a.yaml": manifest("a"), "apps/x.yaml": manifest("x", "org: x\n")},
              "then a, b (and x in another org)")
    result = harness.sync()
    outcome = {a.name: a for a in result.apps}
    assert {n: o.status for n, o in outcome.items()} == {"a": "running", "b": "failed", "c": "running",
                                                        "x": "running"}
    assert outcome["b"].error == "quota_exceeded: org default is at its max_apps of 2; b was not deployed"
    refused = harness.db.last_deployment(harness.app("b").id)
    assert refused is not None and (refused.status, refused.error_code) == ("failed", "quota_exceeded")
    assert harness.app("b").refusal == "quota_exceeded"  # the column the next pass reads back
    assert sorted(harness.containers()) == ["a", "c", "x"]
    # Redeploys of admitted apps are exempt; the refused one stays refused, recorded once.
    repo.push({"apps/c.yaml": manifest("c", image=TEST_IMAGE_2)})
    result = harness.sync()
    assert next(a for a in result.apps if a.name == "c").status == "running"
    assert len(harness.db.deployments(harness.app("b").id)) == 1
    # Room made: the refused app gets in.
    repo.push({"apps/a.yaml": None})
    harness.sync()
    assert sorted(harness.containers()) == ["b", "c", "x"]
    assert harness.app("b").refusal is None


POLICY_CASES = {
    "privileged": ("privileged: true\n", "policy_violation"),
    "hostnet": ("network_mode: host\n", "policy_violation"),
    "hostpid": ("pid: host\n", "policy_violation"),
    "hostipc": ("ipc: host\n", "policy_violation"),
    "caps": ("cap_add: [SYS_ADMIN]\n", "policy_violation"),
    "devices": ("devices: [/dev/sda]\n", "policy_violation"),
    "unconfined": ("security_opt: [seccomp=unconfined]\n", "policy_violation"),
    "socket": ("volumes: ['x:/var/run/docker.sock']\n", "policy_violation"),
    "hostpath": ("volumes: ['/etc:/host-etc']\n", "policy_violation"),
    "relpath": ("volumes: ['../../etc:/x']\n", "policy_violation"),
}


def test_policy_refuses_each_case_with_its_code(repo, harness: Harness) -> None:
    files: dict[str, str | None] = {f"apps/{n}.yaml": manifest(n, extra) for n, (extra, _) in POLICY_CASES.items()}
    files["apps/good.yaml"] = manifest("good")
    files["apps/big.yaml"] = manifest("big") + "# " + "x" * (1024 * 1024) + "\n"
    files["apps/bomb.yaml"] = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    repo.push(files)
    link = repo.work / "apps" / "link.yaml"
    os.symlink("/etc/passwd", link)
    git("add", "apps/link.yaml", cwd=repo.work)
    repo.push({}, "a symlink")
    started = time.monotonic()
    result = harness.sync()
    assert time.monotonic() - started < 10
    codes = {line.split(":")[0]: line.split(": ")[1] for line in result.manifest_errors}
    expected = {f"apps/{n}.yaml": code for n, (_, code) in POLICY_CASES.items()}
    expected.update({"apps/big.yaml": "manifest_too_large", "apps/bomb.yaml": "yaml_alias",
                     "apps/link.yaml": "policy_violation"})
    assert codes == expected
    assert list(harness.containers()) == ["good"]
    assert harness.containers()["good"]["State"] == "running"


def test_policy_on_update_keeps_the_last_good_version(repo, harness: Harness) -> None:
    repo.push({"apps/a.yaml": manifest("a"), "apps/b.yaml": manifest("b")})
    harness.sync()
    before = {n: r["Id"] for n, r in harness.containers().items()}
    repo.push({"apps/a.yaml": manifest("a", "volumes: ['/:/host']\n")})
    result = harness.sync()
    assert result.manifest_errors == [
        "apps/a.yaml:5: policy_violation: volumes[0]: '/:/host' mounts a host path; only named volumes are allowed"]
    assert {n: r["Id"] for n, r in harness.containers().items()} == before
    assert harness.app("a").status == "failed" and harness.app("b").status == "running"
    binds = harness.rt.api.inspect_container(before["a"])["HostConfig"]["Binds"]
    assert not binds


def test_secrets_are_encrypted_at_rest(harness: Harness) -> None:
    value = b"correct-horse-battery-staple-42"
    harness.secrets.set("default", "k", value)
    assert (harness.state / "secret.key").stat().st_mode & 0o777 == 0o600
    sealed = harness.db.secret("default", "k")
    assert sealed is not None and value.decode() not in sealed
    on_disk = b"".join(p.read_bytes() for p in harness.state.glob("cynchrod.db*"))
    assert sealed.encode() in on_disk  # the sealed form is what is stored ...
    assert value not in on_disk  # ... and the value itself nowhere


def test_a_planted_bind_volume_is_never_mounted(repo, harness: Harness, docker_client: docker.DockerClient) -> None:
    name = harness.rt.volume_name("default", "a", "data")
    docker_client.api.create_volume(name, driver="local", driver_opts={"type": "none", "o": "bind", "device": "/etc"},
                                    labels={runtime.LABEL_OWNER: harness.rt.owner})
    repo.push({"apps/a.yaml": manifest("a", "volumes: ['data:/data']\n")})
    result = harness.sync()
    assert result.apps[0].status == "failed"
    assert result.apps[0].error is not None and result.apps[0].error.startswith("policy_violation: volume ")
    assert harness.containers() == {}
