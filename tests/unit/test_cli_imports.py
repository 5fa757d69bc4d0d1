"""A client command (``cynchrod apps``, ``logs``, ``wait``...) imports none of the daemon's modules:
it starts in 0.08 s instead of 0.35 s. The parser's ``--runtime`` choices are the config's."""

from __future__ import annotations

import json
import subprocess
import sys

from cynchrod import cli
from cynchrod.desired import config

#: Modules a client command has no use for (the reconciler, the store, Git, Docker, schemas, YAML).
HEAVY = ("cynchrod.shell", "cynchrod.daemon", "cynchrod.store", "cynchrod.desired", "cynchrod.runtime",
         "pygit2", "docker", "jsonschema", "ruamel")

PROBE = """
import io, json, sys, contextlib
from cynchrod import cli
err = io.StringIO()
with contextlib.redirect_stderr(err):
    status = cli.main(sys.argv[1:])
print(json.dumps({"status": status, "stderr": err.getvalue(), "modules": sorted(sys.modules)}))
"""


def _run(*argv: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def test_a_client_command_imports_no_daemon_module() -> None:
    # Nothing listens on port 1: the command fails as a client does, after parsing and calling out.
    result = _run("apps", "--api", "http://127.0.0.1:1", "--token", "t")
    assert result["status"] == 1 and "127.0.0.1:1" in str(result["stderr"]), result["stderr"]
    modules = result["modules"]
    assert isinstance(modules, list)
    assert [m for m in modules if m.startswith(HEAVY)] == []


def test_a_settings_command_still_imports_what_it_uses() -> None:
    # The probe is not blind: a command that reads settings does import the config (and fails on a bad file).
    result = _run("plan", "--repo", "/nonexistent", "--config", "/nonexistent.yaml")
    assert result["status"] == 2
    modules = result["modules"]
    assert isinstance(modules, list) and "cynchrod.desired.config" in modules


def test_the_runtime_choices_are_the_configs() -> None:
    assert cli.RUNTIMES == config.RUNTIMES
