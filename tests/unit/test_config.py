"""The operator config file and its merge into Settings."""

from __future__ import annotations

import pathlib

import pytest

from cynchrod.desired import config


def test_sources_and_quotas_from_the_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("""
sources:
  - repo: /srv/ops.git
  - repo: https://git.example/tenant.git
    branch: prod
    path: deploy
    org: tenant
defaults: {max_apps: 5}
orgs:
  tenant: {max_apps: 2}
interval: 10
""")
    settings = config.Settings.build(config.load_file(path))
    assert settings.sources == (
        config.SourceConfig("/srv/ops.git"),
        config.SourceConfig("https://git.example/tenant.git", branch="prod", path="deploy", org="tenant"))
    assert settings.repo == "/srv/ops.git"
    assert (settings.max_apps("tenant"), settings.max_apps("other"), settings.interval) == (2, 5, 10.0)


def test_repeated_repos_become_sources() -> None:
    settings = config.Settings.build({"repo": ["/a", "/b"], "branch": "dev"})
    assert [(s.repo, s.branch, s.org) for s in settings.sources] == [("/a", "dev", None), ("/b", "dev", None)]
    assert config.Settings.build({}).sources == ()
    assert config.Settings.build({}).max_apps("x") == 10


@pytest.mark.parametrize("text,fragment", [
    ("orgs: {Bad_Org: {max_apps: 1}}\n", "orgs"),
    ("sources: [{branch: main}]\n", "'repo' is a required property"),
    ("interval: 0\n", "interval"),
    ("bogus: 1\n", "Additional properties"),
])
def test_bad_config_is_refused(tmp_path: pathlib.Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load_file(path)
    assert caught.value.code == "invalid_config" and fragment in str(caught.value)


def test_the_same_repository_twice_is_refused() -> None:
    with pytest.raises(config.ConfigError):
        config.Settings.build({"repo": ["/a", "/a"]})


def test_runtime_and_registry_from_the_file_flag_and_environment(tmp_path: pathlib.Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cynchrod import cli

    path = tmp_path / "c.yaml"
    path.write_text("repo: /srv/ops.git\nruntime: swarm\n"
                    "registry: {url: 'http://10.0.0.1:5000', username: ci, password: s3cret}\n")
    settings = config.Settings.build(config.load_file(path))
    assert (settings.runtime, settings.registry_url, settings.registry_username) == (
        "swarm", "http://10.0.0.1:5000", "ci")
    assert "s3cret" not in repr(settings)
    assert config.Settings.build({}).runtime == "docker"
    monkeypatch.setenv("CYNCHROD_RUNTIME", "docker")
    args = cli.parser().parse_args(["sync", "--config", str(path)])
    assert cli.settings(args).runtime == "docker"  # the environment over the file
    args = cli.parser().parse_args(["sync", "--config", str(path), "--runtime", "swarm"])
    assert cli.settings(args).runtime == "swarm"  # the flag over the environment
    with pytest.raises(config.ConfigError, match="runtime"):
        config.Settings.build({"runtime": "kubernetes"})
    path.write_text("runtime: nomad\n")
    with pytest.raises(config.ConfigError, match="runtime"):
        config.load_file(path)
    path.write_text("registry: {username: x}\n")
    with pytest.raises(config.ConfigError, match="url"):
        config.load_file(path)


def test_build_repo_url_rules() -> None:
    """build.repo on this machine only where builds.localRepos allows it (the daemon's side: test_build_repos)."""
    allow = ("/srv/git", "file:///opt/repos/")
    assert config.repo_allowed("https://git.example/a.git", ())
    assert config.repo_allowed("git@git.example:a/b.git", ())
    assert config.repo_allowed("ssh://git@git.example/a.git", ())
    assert not config.repo_allowed("/srv/git/a.git", ())
    assert config.repo_allowed("/srv/git/a.git", allow)
    assert config.repo_allowed("file:///srv/git/a.git", allow)
    assert config.repo_allowed("/opt/repos/x", allow)
    assert not config.repo_allowed("/srv/git/../../var/lib/cynchrod/state/repos/x.git", allow)
    assert not config.repo_allowed("/srv/gitx/a.git", allow)
    assert not config.repo_allowed("file:///etc", allow)
    assert not config.repo_allowed("./x", allow)
    assert not config.repo_allowed("file://localhost/srv/gitx", allow)


def test_auth_failures_is_read_and_bounded(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cynchrod.yaml"
    path.write_text("authFailures: 25\n")
    assert config.Settings.build(config.load_file(path)).auth_failures == 25
    assert config.Settings().auth_failures == 10
    path.write_text("authFailures: 0\n")
    with pytest.raises(config.ConfigError):
        config.load_file(path)
    with pytest.raises(config.ConfigError):
        config.Settings.build({"auth_failures": 0})
