"""Building blocks shared by every kubetune API type.

Each cross-field rule is declared once, as a :class:`CelRule` holding both the CEL expression
that the Kubernetes API server evaluates (emitted into the CRD as ``x-kubernetes-validations``)
and a Python predicate with the same meaning, evaluated by pydantic. Local mode and
``kubetune validate`` therefore reject exactly what the API server would; the test suite
evaluates both sides on the same documents to keep them twins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class CelRule:
    """A validation rule with a CEL expression for the API server and its Python twin.

    ``field`` names the offending field relative to the object the rule sits on (it becomes
    the CRD rule's ``fieldPath`` and the last part of the error path in pydantic errors).
    ``transition`` rules compare ``self`` with ``oldSelf`` and only apply to updates.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field: str | None = None
    reason: str = "FieldValueInvalid"

    def to_crd(self) -> dict[str, str]:
        rule = {"rule": self.cel, "message": self.message}
        if self.field:
            rule["fieldPath"] = "." + self.field
        if self.reason != "FieldValueInvalid":
            rule["reason"] = self.reason
        return rule


class KubeModel(BaseModel):
    """A Kubernetes-style object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
        use_attribute_docstrings=False,
    )

    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rule_twins(self) -> KubeModel:
        for rule in type(self).cel_rules:
            if not rule.check(self):
                raise PydanticCustomError(
                    "cel_rule",
                    "{message}",
                    {"message": rule.message, "field": rule.field or "", "rule": rule.cel},
                )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase keys, unset fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- Scalar types with readable errors and structural CRD schemas ------------------------------

# The largest whole number a JSON float can carry exactly; the API server reads a float up to it
# with no fraction (2.0) as an integer, and refuses every other float for an integer field.
_MAX_EXACT_FLOAT = 2**53 - 1


def _whole_float(value: object) -> object:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_FLOAT:
        return int(value)
    return value


WHOLE_FLOAT = BeforeValidator(_whole_float)
STRICT = Strict()

Int = Annotated[int, WHOLE_FLOAT, STRICT]
"""An integer as the API server takes one: no strings ("10"), booleans or fractions; a whole
float (``2.0``) is read as an integer, as the server does. Bounds go on the field
(``Int = Field(1, ge=1)``); an optional bounded integer is spelled
``Annotated[int, Field(ge=1), WHOLE_FLOAT, STRICT] | None``, bounds first, or pydantic applies
them to the validator and writes them into the schema as unknown keys (ge, le)."""

Float = Annotated[float, Strict()]
"""A number as the API server takes one: integers and floats, never strings or booleans."""

Bool = Annotated[bool, Strict()]
"""A boolean as the API server takes one: ``true`` or ``false``, never "true", 1 or "yes"."""

# The grammar of resource.Quantity (k8s.io/apimachinery), as controller-gen emits it for CRDs:
# a signed decimal with an optional binary (Ki..Ei), decimal (n..E) or exponent suffix.
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)


def _quantity_to_str(value: object) -> object:
    # An int-or-string field takes integers and strings only: the API server refuses a number
    # with a fraction (1.5, which must be written "1.5" or 1500m) and a boolean.
    if isinstance(value, bool):
        return value
    value = _whole_float(value)
    if isinstance(value, float):
        raise PydanticCustomError(
            "quantity_fraction",
            "{value} is a number with a fraction, which a quantity field takes only as a string",
            {"value": repr(value)},
        )
    if isinstance(value, int):
        return str(value)
    return value


def _check_quantity(value: str) -> str:
    # fullmatch: re's "$" also matches before a trailing newline, the API server's RE2 does not.
    if not _QUANTITY.fullmatch(value):
        raise PydanticCustomError(
            "quantity",
            # pydantic formats templates with str.format-like {name} only (no !r), so the
            # quoting is done here.
            "{value} is not a Kubernetes quantity; use a number with an optional suffix such as "
            "500m, 2, 1.5, 8Gi or 100M",
            {"value": repr(value)},
        )
    return value


MAX_QUANTITY_LENGTH = 64

Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    StringConstraints(max_length=MAX_QUANTITY_LENGTH),
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": MAX_QUANTITY_LENGTH,
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A Kubernetes resource quantity (``500m``, ``8Gi``, ``2``)."""

URI_SCHEMES_READ = ("s3", "file", "hf")
URI_SCHEMES_WRITE = ("s3", "file")
# The path of a URI, written in the syntax RE2 (the API server) and Python's re share: segments of
# any characters but '/' and control characters (a newline included), never a '..' segment
# (it would escape the prefix on file:// and is a literal, never-meant key on S3).
_CHAR = r"[^/\x00-\x1f\x7f]"
_NAMED_SEGMENT = rf"(\.?[^./\x00-\x1f\x7f]{_CHAR}*|\.\.{_CHAR}+)"
"""A segment that names something: not empty, '.' or '..'."""
_SEGMENT = rf"(\.?|{_NAMED_SEGMENT})"
"""Any segment but '..'."""
_PATH = rf"(/{_SEGMENT})*"
_URI_PATTERNS = {
    "s3": rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]{_PATH}",
    # At least one segment naming a directory: the filesystem root (file:///) is never a prefix.
    "file": rf"file://(/\.?)*/{_NAMED_SEGMENT}{_PATH}",
    "hf": rf"hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^/\x00-\x20\x7f]+)?{_PATH}",
}
_URI_HELP = {
    "s3": "s3://bucket/prefix",
    "file": "file:///absolute/path",
    "hf": "hf://org/name[@revision]",
}


def uri_pattern(schemes: tuple[str, ...]) -> str:
    return "^(" + "|".join(_URI_PATTERNS[s] for s in schemes) + ")$"


def uri_help(schemes: tuple[str, ...]) -> str:
    """The accepted URI forms, for error messages: ``s3://bucket/prefix, file:///absolute/path``."""
    return ", ".join(_URI_HELP[s] for s in schemes)


def _uri_checker(schemes: tuple[str, ...]) -> Callable[[str], str]:
    compiled = re.compile(uri_pattern(schemes))
    allowed = uri_help(schemes)

    def check(value: str) -> str:
        # fullmatch: re's "$" also matches before a trailing newline, the API server's RE2 does not.
        if not compiled.fullmatch(value):
            scheme, _, rest = value.partition("://") if "://" in value else ("", "", value)
            segments = rest.split("/")
            if scheme and scheme not in schemes:
                why = f"scheme {scheme!r} is not supported here"
            elif any(ord(c) < 0x20 or c == "\x7f" for c in value):
                why = "it contains a control character (a newline?)"
            elif ".." in segments[1:]:
                why = "it has a '..' path segment, which storage paths do not allow"
            elif scheme == "file" and rest.startswith("/") and not set(segments) - {"", "."}:
                why = "it is the filesystem root; name a directory such as file:///data/run"
            else:
                why = "it is not a well-formed URI"
            raise PydanticCustomError(
                "uri",
                "{value}: {why}; allowed: {allowed}",
                {"value": repr(value), "why": why, "allowed": allowed},
            )
        return value

    return check


MAX_URI_LENGTH = 2048


def _uri_type(schemes: tuple[str, ...]) -> Any:
    return Annotated[
        str,
        StringConstraints(max_length=MAX_URI_LENGTH),
        AfterValidator(_uri_checker(schemes)),
        WithJsonSchema({"type": "string", "maxLength": MAX_URI_LENGTH, "pattern": uri_pattern(schemes)}),
    ]


SourceURI = _uri_type(URI_SCHEMES_READ)
"""Where to read a model or data from: ``s3://``, ``file://`` or ``hf://``."""

OutputURI = _uri_type(URI_SCHEMES_WRITE)
"""Where to write artifacts: ``s3://`` or ``file://`` (a hub is never written to)."""

# The endpoint of an S3-compatible server. Credentials in it (http://KEY:SECRET@host) are refused
# by a CEL rule on Storage rather than by this pattern: the API server echoes the value of a field
# that misses its pattern, but not of one that breaks a rule. [^\t\n\f\r /] is RE2's \S.
ENDPOINT_PATTERN = r"^https?://[^\t\n\f\r /]+(/.*)?$"
ENDPOINT_CREDENTIALS = r"^https?://[^/]*@"
"""An endpoint URL with a user-info part (``user:password@``)."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Service names (and so every job name, since children are named after the job) must be
# RFC 1035 labels: a letter first.
DNS_1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
