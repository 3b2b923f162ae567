"""The CRDs are generated from the models, structural, documented, bounded, and committed."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import re2
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
        if node == {"x-kubernetes-preserve-unknown-fields": True}:
            continue  # any JSON value (a sweep's categorical values), which structural schemas allow
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
        # A categorical value is a number, a string or a boolean; the trials table echoes them.
        "FineTuneSweep": [
            "spec.template.deepspeed.config",
            "spec.parameters[].values[]",
            "status.trials[].parameters",
            "status.bestTrial.parameters",
        ],
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


# --- Every invalid document, as the API server's schema sees it --------------------------------

_INT64 = 2**63
_MAX_EXACT_FLOAT = 2**53 - 1


def _server_integer(_: Any, value: Any) -> bool:
    """An integer as the API server decodes JSON: int64 only (larger numbers become floats), and a
    whole float up to 2^53 counts as one."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    return isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_FLOAT


def _server_number(_: Any, value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    """Patterns as the API server matches them: RE2, where "$" is the end of the text (Python's re
    also matches it before a trailing newline)."""
    if isinstance(instance, str) and not re2.search(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


ServerSchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    validators={"pattern": _re2_pattern},
    type_checker=jsonschema.Draft4Validator.TYPE_CHECKER.redefine_many(
        {"integer": _server_integer, "number": _server_number}
    ),
)


def _unknown_fields(value: Any, schema: dict[str, Any], path: list[str | int]) -> list[list[str | int]]:
    """Fields strict field validation refuses (fieldValidation=Strict, as kubectl sends)."""
    found: list[list[str | int]] = []
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if path == [] and key == "metadata":  # ObjectMeta is the server's, not the CRD's
                continue
            child = (props or {}).get(key) or (extra if isinstance(extra, dict) else None)
            if child is None and props is not None:
                found.append([*path, key])
            elif child is not None:
                found += _unknown_fields(item, child, [*path, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += _unknown_fields(item, schema["items"], [*path, i])
    return found


def server_field_paths(doc: dict[str, Any]) -> list[str]:
    """The fields the API server names when it refuses ``doc``: decoding (apiVersion, kind,
    unknown fields), then the structural schema after defaulting, then (only for a
    schema-valid object) the CEL rules."""
    from kubetune.api import API_VERSION
    from kubetune.api.validation import _format_path
    from tests.unit.test_cel import cel_violations

    if doc.get("apiVersion") != API_VERSION:
        return ["apiVersion"]
    if doc.get("kind") not in SCHEMAS:
        return ["kind"]
    schema = SCHEMAS[doc["kind"]]
    unknown = _unknown_fields(doc, schema, [])
    if unknown:
        return sorted(_format_path(p) for p in unknown)
    defaulted = apply_defaults(copy.deepcopy(doc), schema)
    paths = set()
    for error in ServerSchemaValidator(schema).iter_errors(defaulted):
        path: list[str | int] = list(error.absolute_path)
        if error.validator == "required":
            missing = [r for r in error.validator_value if r not in error.instance]
            paths.update(_format_path([*path, name]) for name in missing)
        else:
            paths.add(_format_path(path))
    if paths:
        return sorted(paths)
    return sorted({path for path, _ in cel_violations(defaulted, schema)})


def _invalid_cases() -> list[Any]:
    from tests.unit.test_api import INVALID

    return [pytest.param(doc, path, id=name) for name, doc, path, _ in INVALID]


@pytest.mark.parametrize(("doc", "path"), _invalid_cases())
def test_the_crd_schema_refuses_every_invalid_document_naming_the_same_field(
    doc: dict[str, Any], path: str
) -> None:
    """``kubetune validate`` and the CRD (schema with RE2 patterns and the server's number
    decoding, then CEL) name the same field for each invalid document of the API tests."""
    assert server_field_paths(doc) == [path]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_crd_schema_takes_every_example(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc.get("kind") in KINDS:
            assert server_field_paths(doc) == []


_SCHEMA_KEYS = {
    "description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "minProperties",
    "maxProperties", "anyOf", "required", "properties", "additionalProperties", "items",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-validations",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_schema_nodes_hold_only_openapi_keys(kind: str) -> None:
    """A bound pydantic cannot place (ge/le beside a validator) lands in the schema as an unknown
    key: the API server refuses the whole CRD, and the bound is lost."""
    stray = [
        (path, sorted(set(node) - _SCHEMA_KEYS))
        for path, node in nodes(SCHEMAS[kind])
        if set(node) - _SCHEMA_KEYS
    ]
    assert stray == []
