"""yamlio's depth guard: a deep flow collection is refused after reading MAX_DEPTH of its brackets."""

from __future__ import annotations

import io

import pytest
from ruamel.yaml import YAML
from ruamel.yaml.events import CollectionStartEvent
from ruamel.yaml.scanner import Scanner

from cynchrod.desired import yamlio


@pytest.fixture
def brackets_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the flow collections (``[``, ``{``) ruamel's scanner reads."""
    read: list[int] = []
    fetch = Scanner.fetch_flow_collection_start

    def counted(self: Scanner, *args: object, **kwargs: object) -> None:
        read.append(1)
        fetch(self, *args, **kwargs)

    monkeypatch.setattr(Scanner, "fetch_flow_collection_start", counted)
    return read


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_a_deep_flow_collection_is_refused_after_max_depth_brackets(
        brackets_read: list[int], opening: str, closing: str) -> None:
    text = "name: web\nimage: i\nenv: " + opening * 20_000 + closing * 20_000 + "\n"
    with pytest.raises(yamlio.YamlError) as refused:
        yamlio.load(text)
    assert (refused.value.code, refused.value.line) == ("yaml_too_deep", 3)
    assert str(refused.value).endswith(f"nested more than {yamlio.MAX_DEPTH} levels deep")
    assert len(brackets_read) == yamlio.MAX_DEPTH


def test_without_the_scanner_check_a_line_of_brackets_is_read_a_thousand_deep(brackets_read: list[int]) -> None:
    """The control: ruamel's own scanner, walked to the event the depth check refuses, has read
    about a thousand brackets (its 1,024-character look-ahead), each checking every open one."""
    depth = 0
    for event in YAML(typ="rt").parse(io.StringIO("env: " + "[" * 20_000 + "]" * 20_000 + "\n")):
        depth += isinstance(event, CollectionStartEvent)
        if depth > yamlio.MAX_DEPTH:
            break
    assert len(brackets_read) > 1000


def test_max_depth_levels_load_and_one_more_is_refused() -> None:
    flow = yamlio.MAX_DEPTH - 1  # the document's own mapping is the first level
    assert yamlio.load("env: " + "[" * flow + "]" * flow + "\n")["env"] is not None
    with pytest.raises(yamlio.YamlError) as refused:
        yamlio.load("env: " + "[" * (flow + 1) + "]" * (flow + 1) + "\n")
    assert refused.value.code == "yaml_too_deep"


def test_block_and_flow_levels_count_together() -> None:
    block = "".join("  " * i + f"k{i}:\n" for i in range(yamlio.MAX_DEPTH - 2))
    tail = "  " * (yamlio.MAX_DEPTH - 2) + "v: [[1]]\n"  # 30 block mappings, one more, and two lists: 33
    with pytest.raises(yamlio.YamlError) as refused:
        yamlio.load(block + tail)
    assert (refused.value.code, refused.value.line) == ("yaml_too_deep", yamlio.MAX_DEPTH - 1)
    assert yamlio.load(block + "  " * (yamlio.MAX_DEPTH - 2) + "v: [1]\n") is not None
