"""What setup.cfg and constraints.txt promise each other (the install itself: e2e/test_install)."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_constraints_pin_every_runtime_requirement() -> None:
    """Each name in install_requires is pinned with == in constraints.txt (scripts/lock writes both)."""
    import configparser
    import re

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    def norm(name: str) -> str:  # PEP 503
        return re.sub(r"[-_.]+", "-", name).lower()

    wanted = [norm(re.split(r"[<>=!~ ;\[]", line.strip())[0])
              for line in cfg["options"]["install_requires"].splitlines()
              if line.strip() and not line.strip().startswith("#")]
    pins = {norm(m.group(1))
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", (ROOT / "constraints.txt").read_text(), re.M)}
    assert wanted and "packaging" in wanted
    assert [name for name in wanted if name not in pins] == []
