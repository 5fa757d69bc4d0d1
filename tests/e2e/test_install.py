"""The install a user does: ``pip install .`` with no extras, through constraints.txt, into a fresh venv.

The test venv has pytest, schemathesis and the rest of the test extras, which bring in packages that the
runtime may import without declaring (gunicorn 27's gevent worker imports ``packaging``): a missing runtime
dependency hides there. This venv has only what setup.cfg's ``install_requires`` brings.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import requests

from tests.helpers import Daemon, GitRepo, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.docker


def test_a_plain_install_serves(tmp_path: pathlib.Path, repo: GitRepo, owner: str) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # From outside the source tree, so nothing is imported from the checkout; a wheel, not editable.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT)],
                   check=True, cwd=tmp_path, env=env, timeout=600)
    installed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=freeze"], check=True, cwd=tmp_path,
                               env=env, capture_output=True, text=True).stdout
    assert "pytest" not in installed  # the venv really is the plain one

    repo.push({"apps/.keep": ""}, "empty")
    d = Daemon(repo, tmp_path / "state", owner, env={**env, "PATH": f"{venv / 'bin'}:{env['PATH']}"})
    with open(d.log, "ab") as out:
        d.proc = subprocess.Popen([str(venv / "bin" / "cynchrod"), *d.args], stdout=out, stderr=subprocess.STDOUT,
                                  env=d.env, cwd=tmp_path, start_new_session=True)
    try:
        def healthy() -> bool:
            assert d.proc is not None and d.proc.poll() is None, d.output()
            try:
                return requests.get(d.api + "/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, 60, "the plain install's API answers /healthz")
        r = requests.get(d.api + "/apps", timeout=5)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"
        assert "ModuleNotFoundError" not in d.output()
    finally:
        assert d.stop() == 0, d.output()
