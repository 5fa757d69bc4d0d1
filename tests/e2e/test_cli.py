"""The CLI as a user runs it: validate, plan, sync, flags from env and config."""

from __future__ import annotations

import pathlib

import docker
import pytest

from cynchrod.cli import main
from tests.helpers import TEST_IMAGE, GitRepo, cli, owned, wait_for

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
    assert cli("token", "create", "--org", "acme", "--state", state).returncode == 0  # makes the state dir
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


def test_mistakes_get_a_sentence_and_create_nothing(tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "cynchrod", *args], input=stdin, capture_output=True,
                              timeout=60, cwd=tmp_path)
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())

    planned = run("plan", "--repo", str(tmp_path / "nonexistent"))
    assert planned.returncode == 2 and "nothing to do" not in planned.stdout
    assert "no such directory; give the path of a Git repository" in planned.stderr
    served = run("serve", "--repo", str(tmp_path / "nonexistent"), "--state", str(tmp_path / "fresh"))
    assert served.returncode == 2 and "no such directory" in served.stderr  # a first start on a typo
    (tmp_path / "plain").mkdir()
    assert "is not a Git repository" in run("plan", "--repo", str(tmp_path / "plain")).stderr
    listed = run("token", "list")  # outside any project: ./state does not exist
    assert listed.returncode == 2 and "no state directory at state" in listed.stderr
    assert run("token", "revoke", "x").returncode == 2
    typo = run("secret", "set", "default/x", "--state", str(tmp_path / "typo"))
    assert typo.returncode == 2 and "no state directory" in typo.stderr
    assert run("secret", "list", "default", "--state", str(tmp_path / "typo")).returncode == 2
    nosl = run("secret", "set", "nosl")
    assert nosl.returncode == 2 and "give the secret as ORG/NAME, e.g. default/db-password" in nosl.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no ./state, no typo/
    state = tmp_path / "state"
    assert run("token", "create", "--org", "default", "--state", str(state)).returncode == 0
    empty = run("secret", "set", "default/x", "--state", str(state))
    assert empty.returncode == 2 and "no value on stdin" in empty.stderr
    assert run("secret", "list", "default", "--state", str(state)).stdout == ""  # no empty secret stored


def test_help_shows_each_command_its_own_flags_and_variables(capsys: pytest.CaptureFixture[str]) -> None:
    def cli_help(*args: str) -> str:  # in-process: the parser is all there is to it
        with pytest.raises(SystemExit):
            main([*args])
        return capsys.readouterr().out

    top = " ".join(cli_help("--help").split())
    for command in ("serve", "sync", "plan", "validate", "rollback", "apps", "status", "logs", "deployments",
                    "restart", "stop", "start", "delete", "token", "secret", "token create", "secret set"):
        description = cli_help(*command.split(), "--help").split("\n\n")[1].strip()
        assert "\n" not in description and len(description) > 10, command  # one line, under the usage
        assert description in top or command.startswith(("token ", "secret ")), command
    plan = cli_help("plan", "--help")
    assert "--repo" in plan and "[CYNCHROD_REPO]" in plan and "[CYNCHROD_STATE]" in plan
    assert "--listen" not in plan and "--interval" not in plan and "--concurrency" not in plan
    serve = cli_help("serve", "--help")
    assert "[CYNCHROD_LISTEN]" in serve and "[CYNCHROD_INTERVAL]" in serve
    logs = cli_help("logs", "--help")
    assert "--repo" not in logs and "[CYNCHROD_API]" in logs and "[CYNCHROD_TOKEN]" in logs
    token = cli_help("token", "list", "--help")
    assert "--state DIR" in token and "[CYNCHROD_STATE]" in token and "--repo" not in token
    for command in (["serve"], ["sync"], ["plan"], ["apps"], ["logs"], ["rollback"], ["token", "create"],
                    ["secret", "set"]):
        text = cli_help(*command, "--help")
        flags = [line for line in text.splitlines() if line.lstrip().startswith("-") and "--help" not in line]
        described = text.count("[CYNCHROD_")
        assert flags and described == len({f.split()[0] for f in flags}), (command, text)


def test_sync_shows_progress(repo: GitRepo, owner: str, images: object, tmp_path: pathlib.Path) -> None:
    repo.push({f"apps/a{i}.yaml": GOOD.replace("web", f"a{i}") for i in range(3)})
    env = {"CYNCHROD_REPO": repo.url, "CYNCHROD_STATE": str(tmp_path / "state"), "CYNCHROD_OWNER": owner,
           "CYNCHROD_STOP_TIMEOUT": "1"}
    synced = cli("sync", env=env)
    assert synced.returncode == 0, synced.stderr
    progress = [line for line in synced.stderr.splitlines() if line.startswith("[")]
    assert [line.split()[0] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"]  # plain lines: not a terminal
    assert sorted(line.split(" ", 1)[1] for line in progress) == [
        f"create default/a{i}: missing" for i in range(3)]
    assert "\r" not in synced.stderr


def test_plan_and_rollback_beside_a_running_daemon_leave_its_mirrors_alone(repo: GitRepo, daemons, owner: str,
                                                                          tmp_path: pathlib.Path) -> None:
    repo.push({"apps/web.yaml": GOOD})
    daemon = daemons(interval=300).start()
    state = tmp_path / "state"
    wait_for(lambda: "pass poll" in daemon.output(), 30, "the first pass")

    def mirrors() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in (state / "repos").rglob("*")}

    def passes() -> int:
        return daemon.output().count(" pass ")

    env = {"CYNCHROD_REPO": repo.url, "CYNCHROD_STATE": str(state), "CYNCHROD_OWNER": owner}
    # Each of the daemon's own passes fetches into its mirror (a self-heal pass can follow the
    # first at once): the comparison holds over a window in which the daemon made no pass.
    for _ in range(5):
        ran, before = passes(), mirrors()
        planned = cli("plan", env=env)
        assert planned.returncode == 0 and planned.stdout == "nothing to do\n", planned
        after = mirrors()
        if passes() == ran:
            break
    else:
        pytest.fail("the daemon made a pass during each of five plans")
    assert after == before  # fetched into a scratch copy, not into the daemon's mirror
    assert daemon.stop() == 0


def test_plan_prints_each_error_once_and_fails_on_any(repo: GitRepo, owner: str, tmp_path: pathlib.Path) -> None:
    env = {"CYNCHROD_REPO": repo.url, "CYNCHROD_STATE": str(tmp_path / "state"), "CYNCHROD_OWNER": owner}
    repo.push({"apps/web.yaml": GOOD, "apps/new.yaml": "name: [fresh\n",
               "apps/typo.yaml": GOOD.replace("web", "typo").replace("memory", "memroy")})
    planned = cli("plan", env=env)
    assert planned.returncode == 1, planned
    errors = ["apps/new.yaml:2: yaml_syntax: expected ',' or ']', but got '<stream end>'",
              "apps/typo.yaml:4: unknown_key: memroy is not a known key; did you mean memory?"]
    assert planned.stdout.splitlines() == [*errors, "create default/web: missing"]
    for error in errors:
        assert (planned.stdout + planned.stderr).count(error.split(": ", 1)[1]) == 1, planned.stderr
    assert "nothing to do" not in planned.stdout
    repo.push({"apps/new.yaml": None, "apps/typo.yaml": None})
    clean = cli("plan", env=env)
    assert (clean.returncode, clean.stdout) == (0, "create default/web: missing\n"), clean


def test_convert_prints_the_other_format_and_warns_on_stderr(tmp_path: pathlib.Path) -> None:
    app = tmp_path / "shop"
    app.mkdir()
    (app / "compose.yaml").write_text("services:\n  web:\n    image: ${IMAGE}\n    ports: ['8080']\n"
                                      "    tmpfs: [/tmp]\nx-cynchrod:\n  org: team\n")
    (app / ".env").write_text("IMAGE=web:1.0\n")
    out = cli("convert", str(app / "compose.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "name: shop\norg: team\nimage: web:1.0\nport: 8080\n"
    assert "services.web.tmpfs: not expressible in a native manifest (left out)" in out.stderr
    (tmp_path / "web.yaml").write_text(GOOD)
    back = cli("convert", str(tmp_path / "web.yaml"))
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith("name: web\nservices:\n  main:\n")
    broken = cli("convert", str(app / "nope.yaml"))
    assert broken.returncode == 1 and "not_found" in broken.stderr
