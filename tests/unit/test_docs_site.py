"""The documentation site: docs/ builds with ``mkdocs build --strict`` (a broken link or anchor fails it),
the README stays a short front page that links into it, and the generated parts match their sources."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def mkdocs_build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` with the venv's mkdocs (the one running these tests), offline."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=120, env=env, check=False)


def test_the_site_builds_in_strict_mode(tmp_path: pathlib.Path) -> None:
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    # The API reference is rendered from the OpenAPI document: every path of it is on the page.
    page = (tmp_path / "site" / "api-reference.html").read_text()
    document = json.loads((ROOT / "cynchrod" / "api" / "openapi.json").read_text())
    missing = [path for path in document["paths"] if path not in page]
    assert missing == []
    assert (tmp_path / "site" / "bench" / "scaling.png").exists()


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: pathlib.Path) -> None:
    """The same config on a copy of the pages with one broken link and one broken anchor."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "cynchrod" / "api").mkdir(parents=True)
    shutil.copy(ROOT / "cynchrod" / "api" / "openapi.json", tmp_path / "cynchrod" / "api" / "openapi.json")
    assert mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "ok").returncode == 0  # the copy builds as it is
    with (tmp_path / "docs" / "statuses.md").open("a") as page:
        page.write("\nSee [a page that is gone](gone.md) and [a heading that is not there](api.md#no-such-heading).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "broken")
    assert result.returncode != 0
    assert "gone.md" in result.stderr
    assert "no-such-heading" in result.stderr


def test_strict_mode_and_link_checks_are_configured() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    assert config["validation"]["links"]["not_found"] == "warn"
    assert config["validation"]["links"]["anchors"] == "warn"
    assert config["theme"]["font"] is False  # no Google Fonts: nothing fetched to build or to read


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [p for item in nav for p in pages(item)]
        if isinstance(nav, dict):
            return [p for value in nav.values() for p in pages(value)]
        return []

    assert sorted(pages(config["nav"])) == sorted(p.name for p in DOCS.glob("*.md"))


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert "docs/index.md" in local and "docs/troubleshooting.md" in local
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_the_docs_copy_of_the_openapi_document_is_the_source() -> None:
    """cynchrod/api/openapi.json is the source (the API serves it); docs/openapi.json is the site's download."""
    assert (DOCS / "openapi.json").read_text() == (ROOT / "cynchrod" / "api" / "openapi.json").read_text(), \
        "copy cynchrod/api/openapi.json to docs/openapi.json"


def test_the_benchmark_block_is_what_bench_table_makes() -> None:
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    assert spec is not None and spec.loader is not None
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    assert table.PAGE == DOCS / "benchmarks.md"
    page = table.PAGE.read_text()
    block = page[page.index(table.BEGIN):page.index(table.END) + len(table.END)]
    assert block == table.markdown(json.loads((ROOT / "bench" / "results.json").read_text()))
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", block):
        assert (DOCS / image).exists()
