"""The CLI as a user runs it: validate, plan, sync, flags from env and config."""

from __future__ import annotations

import pathlib

import docker

from tests.helpers import TEST_IMAGE, GitRepo, cli, owned

GOOD = f"name: web\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n"


def test_validate_files_and_checkouts(tmp_path: pathlib.Path) -> None:
    apps = tmp_path / "repo" / "apps"
    (apps / "team").mkdir(parents=True)
    (apps / "good.yaml").write_text(GOOD)
    (apps / "team" / "bad.yml").write_text("# a comment\nname: bad\nimage: i\ncpu: 12\nextra: 1\n")
    (apps / "notes.txt").write_text("not a manifest")
    out = cli("validate", str(tmp_path / "repo"))
    assert out.returncode == 1
    bad = apps / "team" / "bad.yml"
    assert out.stdout.splitlines() == [
        f"{bad}:4: out_of_range: cpu: 12 is greater than the maximum of 8",
        f"{bad}:5: unknown_key: extra is not a known key",
    ]
    ok = cli("validate", str(apps / "good.yaml"))
    assert (ok.returncode, ok.stdout) == (0, "")
    assert "1 file(s), 1 valid app(s), 0 error(s)" in ok.stderr
    missing = cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "not_found" in missing.stdout


def test_examples_are_valid() -> None:
    examples = pathlib.Path(__file__).resolve().parents[2] / "examples"
    out = cli("validate", str(examples))
    assert out.returncode == 0, out.stdout


def test_plan_sync_and_env_flags(repo: GitRepo, owner: str, images: object, tmp_path: pathlib.Path,
                                 docker_client: docker.DockerClient) -> None:
    state = tmp_path / "state"
    env = {"CYNCHROD_REPO": repo.url, "CYNCHROD_STATE": str(state), "CYNCHROD_OWNER": owner,
           "CYNCHROD_STOP_TIMEOUT": "1"}
    repo.push({"apps/web.yaml": GOOD, "apps/old.yaml": GOOD.replace("web", "old")})
    planned = cli("plan", env=env)
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.splitlines() == ["create default/old: missing", "create default/web: missing"]
    assert owned(docker_client, owner) == []  # plan changed nothing

    synced = cli("sync", env=env)
    assert synced.returncode == 0, synced.stderr
    assert "default/web\trunning\tcreate default/web: missing" in synced.stdout
    assert len(owned(docker_client, owner)) == 2

    repo.push({"apps/web.yaml": GOOD.replace("memory: 64", "memory: 80\nenv: {A: b}"), "apps/old.yaml": None})
    assert cli("plan", env=env).stdout.splitlines() == [
        "remove default/old: no longer declared", "recreate default/web: changed: env, memory"]
    config = tmp_path / "cynchrod.yaml"
    config.write_text(f"repo: {repo.url}\nowner: {owner}\nstopTimeout: 1\n")
    synced = cli("sync", "--config", str(config), "--state", str(state))
    assert synced.returncode == 0, synced.stderr
    assert [c["Labels"]["io.cynchrod.app"] for c in owned(docker_client, owner)] == ["web"]

    repo.push({"apps/web.yaml": GOOD.replace(TEST_IMAGE, "cynchrod-test/absent:1")})
    failed = cli("sync", env=env)
    assert failed.returncode == 1
    expected = "default/web\tfailed\trecreate default/web: changed: env, image, memory -- image_not_found: "
    assert expected in failed.stdout


def test_bad_config_and_missing_repo(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("interval: -1\nbogus: 1\n")
    out = cli("sync", "--config", str(config), "--state", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "invalid_config:" in out.stderr
    out = cli("sync", "--state", str(tmp_path / "s"), env={"CYNCHROD_REPO": ""})
    assert out.returncode == 2 and "usage: --repo" in out.stderr


def test_secret_cli_reads_stdin_and_never_prints_values(tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    state = str(tmp_path / "state")
    value = b"from-stdin-\x00-binary-ok"
    done = subprocess.run([sys.executable, "-m", "cynchrod", "secret", "set", "acme/api-key", "--state", state],
                          input=value, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = cli("secret", "list", "acme", "--state", state)
    assert listed.stdout.split("\t")[0] == "api-key"
    assert b"from-stdin" not in done.stdout + done.stderr and "from-stdin" not in listed.stdout
    bad = cli("secret", "set", "acme/../x", "--state", state)
    assert bad.returncode == 2 and "invalid_secret" in bad.stderr
    assert cli("secret", "delete", "acme/api-key", "--state", state).returncode == 0
    assert cli("secret", "delete", "acme/api-key", "--state", state).returncode == 1


def test_rollback_cli(repo: GitRepo, owner: str, images: object, tmp_path: pathlib.Path,
                      docker_client: docker.DockerClient) -> None:
    env = {"CYNCHROD_REPO": repo.url, "CYNCHROD_STATE": str(tmp_path / "state"), "CYNCHROD_OWNER": owner,
           "CYNCHROD_STOP_TIMEOUT": "1"}
    repo.push({"apps/web.yaml": GOOD})
    assert cli("sync", env=env).returncode == 0
    repo.push({"apps/web.yaml": GOOD.replace("memory: 64", "memory: 80")})
    assert cli("sync", env=env).returncode == 0
    rolled = cli("rollback", "default/web", env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert len(rolled.stdout.strip()) == 40
    assert cli("sync", env=env).returncode == 0
    [row] = owned(docker_client, owner)
    assert docker_client.api.inspect_container(row["Id"])["HostConfig"]["Memory"] == 64 * 2**20
    again = cli("rollback", "default/nope", env=env)
    assert again.returncode == 2 and "not_found" in again.stderr
