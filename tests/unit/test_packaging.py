"""What setup.cfg and constraints.txt promise each other (the install itself: e2e/test_install)."""

from __future__ import annotations

import json
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


def test_shipped_json_documents_have_no_duplicate_keys() -> None:
    """json.load keeps the last of two equal keys without a word: a schema or the OpenAPI document that
    says a key twice may disagree with itself unseen (config.schema.json said ``workers`` twice)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    found: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        keys = [k for k, _ in items]
        found.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(items)

    files = sorted({*root.joinpath("cynchrod").rglob("*.json"), *root.joinpath("schemas").glob("*.json"),
                    *root.joinpath("docs").glob("*.json")})
    assert files
    for path in files:
        json.loads(path.read_text(), object_pairs_hook=pairs)
        assert not found, f"{path.relative_to(root)} says {found} twice"
