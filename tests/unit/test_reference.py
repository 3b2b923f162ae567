"""docs/reference.md is generated from the API models, lists every field and rule, and is committed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import KINDS, RESOURCES
from kubetune.api.crd import generate_crds
from kubetune.api.reference import escape_markdown, main, render_reference

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
SCHEMAS = {
    crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for crd in generate_crds().values()
}
PAGE = render_reference()


def field_paths(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every declared field under a node, walked independently of the generator:
    ``spec.dataset.train.uri``, ``spec.resources.tolerations[].key``."""
    for name, prop in node.get("properties", {}).items():
        child = f"{path}.{name}"
        yield child, prop
        yield from field_paths(prop, child)
    items = node.get("items")
    if isinstance(items, dict):
        yield from field_paths(items, f"{path}[]")


def kind_section(kind: str) -> str:
    """The part of the page about one kind (spec.model exists in both with different fields)."""
    start = PAGE.index(f"## {kind}\n")
    following = [PAGE.index(f"## {k}\n") for k in RESOURCES if PAGE.index(f"## {k}\n") > start]
    return PAGE[start : min(following, default=len(PAGE))]


def rows(text: str) -> dict[str, str]:
    """Table rows by the field path in their first cell."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"\| `([^`]+)`( \(required\))? \|", line)
        if match:
            found[match.group(1)] = line
    return found


def test_committed_reference_matches_the_models() -> None:
    """Fails on drift: regenerate with `python -m kubetune.api.reference` and commit."""
    assert REFERENCE.read_text() == PAGE, "docs/reference.md is stale; run `python -m kubetune.api.reference`"


def test_rendering_is_deterministic() -> None:
    assert render_reference() == PAGE


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("top", ["spec", "status"])
def test_every_field_has_a_row_with_its_description_and_default(kind: str, top: str) -> None:
    table = rows(kind_section(kind))
    schema = SCHEMAS[kind]
    for path, prop in field_paths(schema["properties"][top], top):
        assert path in table, f"{kind} {path} is missing from the reference"
        row = table[path]
        assert prop["description"].replace("<", "&lt;") in row.replace("\\|", "|").replace("\\*", "*")
        if "default" in prop and prop["default"] != {}:
            default = prop["default"]
            shown = (default or '""') if isinstance(default, str) else json.dumps(default)
            assert f"| `{shown}` |" in row, f"{path}: default {shown} not shown"
        for value in prop.get("enum", []):
            assert f"`{value}`" in row, f"{path}: enum value {value} not listed"
        parent, _, name = path.rpartition(".")
        is_required = row.startswith(f"| `{path}` (required)")
        assert is_required == (name in _required_at(schema, parent)), path
    assert set(table) >= {p for p, _ in field_paths(schema["properties"][top], top)}


def _required_at(schema: dict[str, Any], dotted: str) -> set[str]:
    node = schema
    for part in dotted.split("."):
        list_items = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if list_items:
            node = node["items"]
    return set(node.get("required", []))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_cel_rule_is_listed_with_its_message(kind: str) -> None:
    section = kind_section(kind)

    def rules(node: dict[str, Any]) -> Iterator[dict[str, str]]:
        yield from node.get("x-kubernetes-validations", [])
        for prop in node.get("properties", {}).values():
            yield from rules(prop)
        if isinstance(node.get("items"), dict):
            yield from rules(node["items"])

    listed = list(rules(SCHEMAS[kind]))
    assert listed, "the CRD has CEL rules"
    for rule in listed:
        assert escape_markdown(rule["message"]) in section
        assert f"CEL: `{rule['rule']}`" in section


def test_immutability_rule_is_marked_as_an_update_rule() -> None:
    section = kind_section("FineTuneJob")
    assert "- On update: spec.{model, task, dataset, method, hyperparameters" in section
    assert "reason: `FieldValueForbidden`" in section


def test_every_link_points_at_an_anchor_on_the_page() -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', PAGE))
    links = set(re.findall(r"\]\(#([^)]+)\)", PAGE))
    assert links, "the page links its sections"
    assert links <= anchors, f"dangling links: {sorted(links - anchors)}"
    assert len(re.findall(r'<a id="', PAGE)) == len(anchors), "anchors are unique"


def test_check_mode_reports_drift_with_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reference.md"
    assert main(["--out", str(out), "--check"]) == 1, "a missing file is drift"
    assert main(["--out", str(out)]) == 0
    assert out.read_text() == PAGE
    assert main(["--out", str(out), "--check"]) == 0
    out.write_text(PAGE.replace("Peak learning rate.", "Peak learning rate, edited by hand."))
    capsys.readouterr()
    assert main(["--out", str(out), "--check"]) == 1
    captured = capsys.readouterr()
    assert "-| `spec.hyperparameters.learningRate`" in captured.out
    assert "+| `spec.hyperparameters.learningRate`" in captured.out
    assert "differs from the API models" in captured.err
    assert "edited by hand" in out.read_text(), "--check writes nothing"
