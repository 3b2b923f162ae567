"""Offline validation of kubetune manifests (``kubetune validate``, local mode).

Documents are checked by the pydantic models, which enforce the same rules as the generated CRDs
(types, enums, ranges, patterns and the CEL rules' Python twins). Errors are reported in manifest
terms: the field path as a user writes it (``spec.deepspeed.zeroStage``), the line in the file,
what was wrong and what is allowed — the latter read from the CRD schema of the field, so the
message states exactly what the API server accepts.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from kubetune.api.base import (
    DNS_1035_LABEL_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    ENDPOINT_PATTERN,
    URI_SCHEMES_READ,
    URI_SCHEMES_WRITE,
    uri_help,
    uri_pattern,
)
from kubetune.api.crd import openapi_schema
from kubetune.api.kinds import RESOURCES as KINDS
from kubetune.api.resources import API_VERSION, GROUP, CompressJob, FineTuneJob
from kubetune.api.sweep import FineTuneSweep
from kubetune.errors import InvalidInputError

STDIN = "-"

Resource = FineTuneJob | CompressJob | FineTuneSweep
PathPart = str | int

_URI_HELP_BY_PATTERN = {
    uri_pattern(URI_SCHEMES_READ): uri_help(URI_SCHEMES_READ),
    uri_pattern(URI_SCHEMES_WRITE): uri_help(URI_SCHEMES_WRITE),
}
_PATTERN_HELP = {
    DNS_LABEL_PATTERN: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
    DNS_1035_LABEL_PATTERN: "lowercase letters, digits and '-', starting with a letter, ending with a letter or digit",
    DNS_SUBDOMAIN_PATTERN: "a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending with a "
    "letter or digit",
    ENDPOINT_PATTERN: "an http:// or https:// URL, e.g. http://minio.storage:9000",
}
_QUANTITY_HELP = "a Kubernetes quantity such as 500m, 2, 1.5, 8Gi or 100M"
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


@dataclass(frozen=True)
class FieldError:
    """One problem in one document."""

    path: str
    """The field in manifest terms, e.g. ``spec.deepspeed.zeroStage``; empty for the document."""
    message: str
    """What was wrong."""
    allowed: str | None = None
    """What the field accepts, when that can be said briefly."""
    line: int | None = None
    """1-based line in the file, when known."""
    type: str = "invalid"
    """Machine-readable kind of error (pydantic's error type, ``cel_rule``, ``apiVersion``...)."""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text}; allowed: {self.allowed}" if self.allowed else text


@dataclass
class DocumentReport:
    """The outcome of validating one YAML document (or one unreadable file)."""

    source: str
    index: int | None
    """1-based position of the document in its file; None for file-level problems."""
    status: Literal["valid", "invalid", "skipped"]
    line: int | None = None
    api_version: str | None = None
    kind: str | None = None
    name: str | None = None
    errors: list[FieldError] = field(default_factory=list)
    note: str | None = None
    resource: Resource | None = field(default=None, repr=False, compare=False)

    def where(self, line: int | None = None) -> str:
        """``file:line: Kind/name (document N)``, the prefix of every printed line."""
        line = line or self.line
        place = f"{self.source}:{line}" if line else self.source
        if self.index is None:
            return place
        if not self.kind:
            return f"{place}: document {self.index}"
        what = f"{self.kind}/{self.name}" if self.name else self.kind
        return f"{place}: {what} (document {self.index})"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("resource")
        data["errors"] = [asdict(e) for e in self.errors]
        return data


# --- Documents ------------------------------------------------------------------------------


def validate_document(doc: Any) -> tuple[Resource | None, list[FieldError]]:
    """Validate one parsed kubetune document; returns the resource when it is valid, else the
    errors (paths in manifest terms, without line numbers)."""
    if not isinstance(doc, dict):
        return None, [FieldError("", f"a manifest must be a mapping, got {_type_name(doc)}", type="document")]
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    errors: list[FieldError] = []
    if api_version != API_VERSION:
        message = "is missing" if api_version is None else f"{api_version!r} is not served by kubetune"
        errors.append(FieldError("apiVersion", message, API_VERSION, type="apiVersion"))
    if not isinstance(kind, str) or kind not in KINDS:
        message = "is missing" if kind is None else f"{kind!r} is not a kubetune kind"
        errors.append(FieldError("kind", message, " or ".join(KINDS), type="kind"))
    if errors or not isinstance(kind, str):
        return None, errors
    try:
        return KINDS[kind].model_validate(doc), []
    except ValidationError as exc:
        schema = _schema(kind)
        errors = [_field_error(error, schema) for error in exc.errors()]
    # pydantic checks an object's rules only once its fields are valid, while the API server
    # evaluates every rule; the name rules matter enough to be reported alongside other errors.
    if not any(e.path.startswith("metadata") for e in errors):
        errors += _name_errors(kind, doc)
    return None, errors


def _name_errors(kind: str, doc: dict[str, Any]) -> list[FieldError]:
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        return []
    probe = SimpleNamespace(metadata=SimpleNamespace(name=name))
    rules = [rule for rule in KINDS[kind].cel_rules if rule.field == "metadata.name"]
    return [
        FieldError("metadata.name", rule.message, type="cel_rule") for rule in rules if not rule.check(probe)
    ]


def parse_resource(doc: Any, source: str = "manifest") -> Resource:
    """A FineTuneJob or CompressJob from a parsed document, or InvalidInputError listing every
    problem (for callers such as local mode that need one resource, not a report)."""
    resource, errors = validate_document(doc)
    if resource is None:
        lines = "\n".join(f"  {e}" for e in errors)
        raise InvalidInputError(f"{source} is not a valid kubetune manifest:\n{lines}")
    return resource


def is_kubetune_document(doc: Any) -> bool:
    """Whether a document claims to be ours: the kubetune.io group, or one of our kinds."""
    if not isinstance(doc, dict):
        return False
    api_version = doc.get("apiVersion")
    group = api_version.split("/", 1)[0] if isinstance(api_version, str) and "/" in api_version else None
    return group == GROUP or doc.get("kind") in KINDS


# --- Streams and files ----------------------------------------------------------------------


def validate_text(text: str, source: str = "<stdin>", *, strict: bool = False) -> list[DocumentReport]:
    """Validate every document of a multi-document YAML text. Documents of other APIs are
    skipped with a note, or reported as errors when ``strict``."""
    try:
        documents = list(_compose_documents(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, ManifestYAMLError):
            error = FieldError("", problem, line=line, type="yaml")
        else:
            error = FieldError("", f"not valid YAML: {problem}", line=line, type="yaml")
        return [DocumentReport(source, None, "invalid", line=line, errors=[error])]
    reports = []
    for index, (doc, node) in enumerate(documents, start=1):
        if doc is None:  # an empty document, e.g. a trailing '---'
            continue
        reports.append(_validate_located(doc, node, source, index, strict))
    return reports


def validate_paths(paths: Sequence[str], *, strict: bool = False) -> list[DocumentReport]:
    """Validate files (``-`` reads standard input)."""
    reports: list[DocumentReport] = []
    for path in paths:
        if path == STDIN:
            reports += validate_text(sys.stdin.read(), "<stdin>", strict=strict)
            continue
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            error = FieldError("", f"cannot read file: {reason}", type="file")
            reports.append(DocumentReport(path, None, "invalid", errors=[error]))
            continue
        reports += validate_text(text, path, strict=strict)
    return reports


def load_resources(path: str | Path, *, strict: bool = False) -> list[Resource]:
    """Every FineTuneJob and CompressJob in a manifest file, validated; InvalidInputError with
    every error (file:line, field path, what is allowed) when any document is invalid."""
    reports = validate_paths([str(path)], strict=strict)
    failed = [r for r in reports if r.status == "invalid"]
    if failed:
        raise InvalidInputError(format_reports(failed, quiet=True).rstrip())
    resources = [r.resource for r in reports if r.resource is not None]
    if not resources:
        raise InvalidInputError(f"{path}: no FineTuneJob or CompressJob documents found")
    return resources


def format_reports(reports: Sequence[DocumentReport], *, quiet: bool = False) -> str:
    """Human-readable report: one line per error (and per valid or skipped document unless
    ``quiet``), then a summary unless ``quiet``."""
    lines: list[str] = []
    for report in reports:
        if report.status == "invalid":
            lines += [f"{report.where(error.line)}: {error}" for error in report.errors]
        elif not quiet:
            lines.append(f"{report.where()}: {report.status}" + (f" ({report.note})" if report.note else ""))
    if not quiet:
        lines.append(summary(reports))
    return "\n".join(lines) + "\n"


def summary(reports: Sequence[DocumentReport]) -> str:
    counts = {s: sum(r.status == s for r in reports) for s in ("valid", "invalid", "skipped")}
    return f"{counts['valid']} valid, {counts['invalid']} invalid, {counts['skipped']} skipped"


def reports_to_json(reports: Sequence[DocumentReport]) -> dict[str, Any]:
    return {
        "valid": all(r.status != "invalid" for r in reports),
        "summary": summary(reports),
        "documents": [r.to_json() for r in reports],
    }


# --- Internals ------------------------------------------------------------------------------


MAX_DOCUMENT_NODES = 100_000
"""Values one document may hold once its aliases are expanded. A real manifest holds a few hundred;
an alias bomb (each anchor aliased ten times in the next) holds billions and would cost pydantic,
the run plan and the API server that much time and memory."""


class ManifestYAMLError(yaml.YAMLError):
    """A document the API server would not take although it is YAML: a duplicate key, or aliases
    expanding past :data:`MAX_DOCUMENT_NODES`."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def _check_node_tree(root: yaml.Node) -> None:
    """Refuse duplicate mapping keys (the API server refuses duplicate fields; YAML loaders keep
    the last) and aliases that expand past the node budget, before anything is constructed.

    Sizes are counted per distinct node, so the check costs the size of the text, not of the
    expansion it guards against."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ManifestYAMLError(
                f"{path or 'the document'} contains itself through an alias", node.start_mark
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for k, v in node.value:
                name = str(k.value) if isinstance(k, yaml.ScalarNode) else None
                if name is not None and k.tag != "tag:yaml.org,2002:merge":
                    if name in seen:
                        field = f"{path}.{name}" if path else name
                        first = seen[name].start_mark.line + 1
                        raise ManifestYAMLError(
                            f"duplicate key {name!r} ({field}; first at line {first}): the API server "
                            "refuses duplicate fields, and YAML loaders silently keep the last",
                            k.start_mark,
                        )
                    seen[name] = k
                child = f"{path}.{name}" if path and name is not None else (name or path)
                total += size(k, path) + size(v, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, f"{path}[{i}]")
        active.discard(key)
        if total > MAX_DOCUMENT_NODES:
            raise ManifestYAMLError(
                f"{path or 'the document'} expands to more than {MAX_DOCUMENT_NODES} values through "
                "YAML aliases (an alias bomb?); write the values out instead",
                node.start_mark,
            )
        sizes[key] = total
        return total

    size(root, "")


def _compose_documents(text: str) -> Iterator[tuple[Any, yaml.Node]]:
    """Each document with its node tree, which knows the line of every key and value."""
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            try:
                node = loader.get_node()
            except RecursionError:
                raise ManifestYAMLError("the document nests too deeply", None) from None
            if node is not None:
                _check_node_tree(node)
                yield loader.construct_document(node), node
    finally:
        loader.dispose()


def load_documents(text: str) -> list[Any]:
    """Every document of a YAML stream, read as ``kubetune validate`` reads it: duplicate keys and
    aliases past :data:`MAX_DOCUMENT_NODES` raise :class:`ManifestYAMLError` (a ``yaml.YAMLError``)
    before anything is constructed. For callers that need the documents, not a report."""
    return [doc for doc, _ in _compose_documents(text)]


def _validate_located(doc: Any, node: yaml.Node, source: str, index: int, strict: bool) -> DocumentReport:
    report = DocumentReport(source, index, "valid", line=node.start_mark.line + 1)
    if isinstance(doc, dict):
        report.api_version = _str_or_none(doc.get("apiVersion"))
        report.kind = _str_or_none(doc.get("kind"))
        metadata = doc.get("metadata")
        report.name = _str_or_none(metadata.get("name")) if isinstance(metadata, dict) else None
    if not is_kubetune_document(doc):
        what = "/".join(x for x in (report.api_version, report.kind) if x) or "no apiVersion/kind"
        if strict:
            report.status = "invalid"
            report.errors = [FieldError("", f"not a kubetune document ({what})", type="foreign")]
        else:
            report.status = "skipped"
            report.note = f"not a kubetune kind: {what}"
        return report
    resource, errors = validate_document(doc)
    if resource is not None:
        report.resource = resource
        return report
    report.status = "invalid"
    located = [
        FieldError(e.path, e.message, e.allowed, _line_of(node, e.path), e.type) if e.path else e
        for e in errors
    ]
    report.errors = sorted(located, key=lambda e: e.line or 0)
    return report


@functools.cache
def _schema(kind: str) -> dict[str, Any]:
    return openapi_schema(KINDS[kind])


def _field_error(error: Any, schema: dict[str, Any]) -> FieldError:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    parts: list[PathPart] = list(error["loc"])
    if kind == "cel_rule" and ctx.get("field"):
        parts += str(ctx["field"]).split(".")
    node = _schema_at(schema, parts)
    value = error.get("input")
    allowed = _describe(node) if node is not None else None
    message: str
    if kind == "missing":
        message = "required field is missing"
    elif kind == "extra_forbidden":
        parent = _schema_at(schema, parts[:-1])
        known = sorted((parent or {}).get("properties", {}))
        message = "unknown field"
        allowed = ", ".join(known) if known else None
    elif kind in ("enum", "literal_error"):
        message = f"{value!r} is not one of the allowed values"
    elif kind in _BOUND_ERRORS:
        message = f"{value!r} is out of range"
    elif kind == "cel_rule":
        message, allowed = str(ctx.get("message", error["msg"])), None
    elif kind == "uri":
        message, allowed = f"{ctx['value']}: {ctx['why']}", str(ctx["allowed"])
    elif kind == "string_pattern_mismatch":
        message = f"{value!r} has the wrong form"
    elif kind == "quantity":
        message, allowed = f"{ctx['value']} is not a Kubernetes quantity", _QUANTITY_HELP
    elif kind == "quantity_fraction":
        message = f"{ctx['value']} is a number with a fraction; a quantity takes it only as a string"
        allowed = f"'{value}' (quoted), or an integer, or a suffixed quantity such as 1500m"
    elif kind in ("config_size", "config_derived"):
        message, allowed = error["msg"], None
    elif kind == "search_space":
        # A parameter checked against the template: name the parameter, not the whole spec.
        parts.append("parameters")
        parts.append(int(ctx["index"]))
        message, allowed = f"{ctx['path']}: {ctx['problem']}", None
    else:
        message = error["msg"][0].lower() + error["msg"][1:]
        if value is not None and not isinstance(value, dict | list):
            message += f" (got {value!r})"
    return FieldError(_format_path(parts), message, allowed, type=kind)


def _format_path(parts: Sequence[PathPart]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif any(c in part for c in "./ []"):
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else part
    return text


def _parse_path(path: str) -> list[PathPart]:
    parts: list[PathPart] = []
    rest = path
    while rest:
        if rest.startswith("["):
            end = rest.index("]", 3 if rest[1] in "'\"" else 1)
            inner = rest[1:end]
            parts.append(int(inner) if inner.isdigit() else inner.strip("'\""))
            rest = rest[end + 1 :]
        else:
            rest = rest.lstrip(".")
            cut = min([i for i in (rest.find("."), rest.find("[")) if i >= 0], default=len(rest))
            parts.append(rest[:cut])
            rest = rest[cut:]
    return parts


def _schema_at(schema: dict[str, Any], parts: Sequence[PathPart]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in parts:
        if node is None:
            return None
        if isinstance(part, int):
            node = node.get("items")
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def _describe(node: dict[str, Any]) -> str | None:
    """What a schema node accepts, in words."""
    if node.get("x-kubernetes-int-or-string"):
        return _QUANTITY_HELP
    if "enum" in node:
        return "one of " + ", ".join(str(v) for v in node["enum"])
    if node.get("pattern") in _URI_HELP_BY_PATTERN:
        return _URI_HELP_BY_PATTERN[node["pattern"]]
    if node.get("pattern") in _PATTERN_HELP:
        return _PATTERN_HELP[node["pattern"]] + (
            f", at most {node['maxLength']} characters" if "maxLength" in node else ""
        )
    type_ = node.get("type")
    if type_ in ("integer", "number"):
        return _describe_range(node)
    if type_ == "string":
        limits = []
        if "minLength" in node and "maxLength" in node:
            limits.append(f"of {node['minLength']} to {node['maxLength']} characters")
        elif "maxLength" in node:
            limits.append(f"of at most {node['maxLength']} characters")
        elif "minLength" in node:
            limits.append(f"of at least {node['minLength']} characters")
        if "pattern" in node:
            limits.append(f"matching {node['pattern']}")
        return " ".join(["a string", *limits])
    if type_ == "boolean":
        return "true or false"
    if type_ == "array":
        if "maxItems" in node:
            return f"a list of {node.get('minItems', 0)} to {node['maxItems']} items"
        return "a list"
    if type_ == "object":
        if "properties" in node:
            return "an object with fields " + ", ".join(sorted(node["properties"]))
        return "a mapping"
    return None


def _describe_range(node: dict[str, Any]) -> str:
    noun = "an integer" if node["type"] == "integer" else "a number"
    low, high = node.get("minimum"), node.get("maximum")
    low_open, high_open = node.get("exclusiveMinimum", False), node.get("exclusiveMaximum", False)
    if low is not None and high is not None and not low_open and not high_open:
        return f"{noun} from {low} to {high}"
    bounds = []
    if low is not None:
        bounds.append(f"greater than {low}" if low_open else f"at least {low}")
    if high is not None:
        bounds.append(f"less than {high}" if high_open else f"at most {high}")
    return f"{noun} that is {' and '.join(bounds)}" if bounds else noun


def _line_of(root: yaml.Node, path: str) -> int | None:
    """The line of the deepest node along ``path`` that exists in the document (for a missing
    field, its parent; for an unknown field, its key)."""
    node = root
    line = root.start_mark.line + 1
    for part in _parse_path(path):
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line, child = key.start_mark.line + 1, value
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
