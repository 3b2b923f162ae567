"""The CRDs are generated from the models, structural, documented, bounded, and committed."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune.api import KINDS
from kubetune.api.crd import GENERATED_HEADER, generate_crds, render_crds
from kubetune.cli import main
from tests.documents import apply_defaults

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_DIRS = [ROOT / "crds", ROOT / "manifests" / "crds"]
CRDS = generate_crds()
SCHEMAS = {
    crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for crd in CRDS.values()
}
EXAMPLES = ROOT / "manifests" / "examples"


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (``spec.resources.requests.*``, ``...tolerations[]``)."""
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from nodes(prop, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}.*")
    for variant in schema.get("anyOf", []):
        yield from nodes(variant, path)


def properties(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in schema.get("properties", {}).items():
        child = f"{path}.{name}" if path else name
        yield child, prop
        yield from properties(prop, child)
    for key, suffix in (("items", "[]"), ("additionalProperties", ".*")):
        if isinstance(schema.get(key), dict):
            yield from properties(schema[key], path + suffix)


@pytest.mark.parametrize("directory", OUTPUT_DIRS, ids=["crds", "manifests-crds"])
def test_committed_crds_match_the_models(directory: Path) -> None:
    """Fails on drift: regenerate with `kubetune crds` (make crds) and commit."""
    for name, text in render_crds().items():
        assert (directory / name).read_text() == text, f"{directory / name} is stale; run `make crds`"
    assert sorted(p.name for p in directory.glob("*.kubetune.io.yaml")) == sorted(CRDS)


def test_crds_check_command_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crds"
    assert main(["crds", "--out", str(out)]) == 0
    assert main(["crds", "--out", str(out), "--check"]) == 0
    path = out / "finetunejobs.kubetune.io.yaml"
    path.write_text(path.read_text().replace("maximum: 3", "maximum: 7"))
    shutil.copy(path, out / "trainjobs.kubetune.io.yaml")
    capsys.readouterr()
    assert main(["crds", "--out", str(out), "--check"]) == 1
    report = capsys.readouterr()
    assert "-                    maximum: 7\n+                    maximum: 3\n" in report.out
    assert "trainjobs.kubetune.io.yaml: not generated from the models any more" in report.out
    assert "run `kubetune crds`" in report.err


def test_files_say_they_are_generated() -> None:
    for text in render_crds().values():
        assert text.startswith(GENERATED_HEADER)
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


def test_generation_is_deterministic() -> None:
    assert render_crds() == render_crds()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_names_scope_and_versions(kind: str) -> None:
    model = KINDS[kind]
    crd = CRDS[f"{model.plural}.kubetune.io.yaml"]
    assert crd["metadata"]["name"] == f"{model.plural}.kubetune.io"
    spec = crd["spec"]
    assert spec["group"] == "kubetune.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": model.plural,
        "singular": kind.lower(),
        "shortNames": [{"FineTuneJob": "ftj", "CompressJob": "cj"}[kind]],
        "categories": ["kubetune"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    def columns(kind: str) -> list[tuple[str, str]]:
        crd = CRDS[f"{KINDS[kind].plural}.kubetune.io.yaml"]
        return [(c["name"], c["jsonPath"]) for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]

    assert columns("FineTuneJob") == [
        ("Phase", ".status.phase"),
        ("Progress", ".status.progress.percent"),
        ("Loss", ".status.progress.loss"),
        ("Restarts", ".status.restarts"),
        ("Age", ".metadata.creationTimestamp"),
    ]
    assert columns("CompressJob") == [
        ("Phase", ".status.phase"),
        ("Ratio", ".status.results.sizeRatio"),
        ("Source", ".status.sourceModelUri"),
        ("Age", ".metadata.creationTimestamp"),
    ]


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_schema_is_structural(kind: str) -> None:
    """No references, titles or nulls; every node typed except int-or-string and free-form ones;
    anyOf only as the int-or-string pair."""
    text = yaml.safe_dump(SCHEMAS[kind])
    for forbidden in ("$ref", "$defs", "title:", "type: 'null'", "const:", "additionalProperties: false"):
        assert forbidden not in text
    for path, node in nodes(SCHEMAS[kind]):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}]
            continue
        if node in ({"type": "integer"}, {"type": "string"}):  # the int-or-string variants
            continue
        assert "anyOf" not in node, path
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if "default" in node:
            assert node["default"] is not None, path


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_field_has_a_description(kind: str) -> None:
    """kubectl explain shows these; metadata is described by Kubernetes itself."""
    missing = [
        path
        for path, prop in properties(SCHEMAS[kind])
        if not path.startswith("metadata") and not prop.get("description")
    ]
    assert missing == []


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_only_deepspeed_config_is_free_form(kind: str) -> None:
    free = [path for path, node in nodes(SCHEMAS[kind]) if node.get("x-kubernetes-preserve-unknown-fields")]
    expected = {
        "FineTuneJob": ["spec.deepspeed.config"],
        "CompressJob": ["spec.distillation.deepspeed.config"],
    }[kind]
    assert free == expected


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_spec_strings_lists_and_maps_are_bounded(kind: str) -> None:
    """The API server estimates the worst-case cost of CEL rules from maxLength, maxItems and
    maxProperties; unbounded values under spec (which the rules compare) could get the CRD
    rejected for exceeding the cost budget."""
    unbounded = []
    for path, node in nodes(SCHEMAS[kind]["properties"]["spec"], "spec"):
        if node == {"type": "string"}:  # the string variant of an int-or-string, bounded above it
            continue
        kind_of = "string" if node.get("x-kubernetes-int-or-string") else node.get("type")
        if kind_of == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if kind_of == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind_of == "object" and "properties" not in node and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == []
    name = SCHEMAS[kind]["properties"]["metadata"]["properties"]["name"]
    assert name["maxLength"] == 253  # bounds the cost of matches() in the name rule


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_schema_is_valid_openapi_and_defaults_satisfy_it(kind: str) -> None:
    schema = SCHEMAS[kind]
    jsonschema.Draft4Validator.check_schema(schema)
    for _, node in nodes(schema):
        if "default" in node:
            jsonschema.Draft4Validator({k: v for k, v in node.items() if k != "default"}).validate(
                node["default"]
            )


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_rule_field_paths_exist(kind: str) -> None:
    paths = {path for path, _ in nodes(SCHEMAS[kind])}
    for path, node in nodes(SCHEMAS[kind]):
        for rule in node.get("x-kubernetes-validations", []):
            if "fieldPath" in rule:
                target = (path + rule["fieldPath"]) if path else rule["fieldPath"].lstrip(".")
                assert target in paths, rule


def test_zero_stage_is_bounded_in_the_crd() -> None:
    zero = SCHEMAS["FineTuneJob"]["properties"]["spec"]["properties"]["deepspeed"]["properties"]["zeroStage"]
    assert (zero["type"], zero["minimum"], zero["maximum"], zero["default"]) == ("integer", 0, 3, 2)


def test_exclusive_bounds_use_openapi_3_0_flags() -> None:
    sparsity = SCHEMAS["CompressJob"]["properties"]["spec"]["properties"]["pruning"]["properties"]["sparsity"]
    assert sparsity == {
        "description": sparsity["description"],
        "type": "number",
        "default": 0.5,
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "exclusiveMaximum": True,
    }


def test_conditions_merge_by_type() -> None:
    conditions = SCHEMAS["FineTuneJob"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_crd_defaults_equal_model_defaults(path: Path) -> None:
    """What the API server stores after defaulting is what the models fill in."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc.get("kind") not in KINDS:
            continue
        stored = apply_defaults(copy.deepcopy(doc), SCHEMAS[doc["kind"]])
        assert stored == KINDS[doc["kind"]].model_validate(doc).to_wire()
