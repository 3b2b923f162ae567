"""Storage URIs: ``s3://bucket/key``, ``file:///absolute/path`` and ``hf://org/model[@revision]/path``.

URIs are parsed by hand rather than with :func:`urllib.parse.urlparse`: S3 keys may legally contain
``?``, ``#`` and ``;``, which a URL parser would cut off as query, fragment or parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final, Literal, get_args
from urllib.parse import unquote

from kubetune.errors import InvalidInputError

Scheme = Literal["s3", "file", "hf"]
SCHEMES: Final[tuple[str, ...]] = get_args(Scheme)
_ALLOWED: Final = "s3://bucket/key, file:///absolute/path or hf://org/model[@revision][/path]"

# S3 bucket naming rules (3-63 characters, lowercase letters, digits, dots and hyphens), relaxed to
# accept uppercase and underscores, which legacy us-east-1 buckets and some MinIO setups still use.
_BUCKET_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
_HF_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The Hub's own hf:// file-system URIs prefix dataset and space repositories with their type.
_HF_REPO_TYPES: Final = {"datasets": "dataset", "spaces": "space"}


class StorageURIError(InvalidInputError, ValueError):
    """A storage URI is malformed or uses an unsupported scheme (exit code 2).

    It is also a :class:`ValueError`, so pydantic validators that call :func:`parse_uri` turn it into
    an ordinary validation error.
    """


@dataclass(frozen=True)
class StorageURI:
    """A parsed storage URI.

    ``bucket`` is the S3 bucket, the Hub repository (``org/name``, ``datasets/org/name``, with an
    optional ``@revision``) or ``""`` for ``file://``. ``key`` is the path inside it without a leading
    slash; for ``file://`` it is the absolute path without its leading slash. A trailing slash on
    ``key`` (a prefix) is kept, so ``str(parse_uri(u)) == u`` for every canonical URI.
    """

    scheme: Scheme
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file:///{self.key}"
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    @property
    def name(self) -> str:
        """The last path segment (``""`` for a bucket or repository root)."""
        return self.key.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> StorageURI:
        """The enclosing prefix, with a trailing slash (the root stays the root)."""
        head = self.key.rstrip("/").rpartition("/")[0]
        return StorageURI(self.scheme, self.bucket, f"{head}/" if head else "")

    def join(self, *parts: str) -> StorageURI:
        """Append path segments: ``parse_uri("s3://b/run").join("checkpoints", "step-10/")``.

        Slashes at the ends of each part are collapsed; a trailing slash on the last part is kept
        (it marks a prefix). ``..`` segments are rejected: they would escape the prefix on
        ``file://`` and be literal key characters on S3, and neither is ever what was meant.
        """
        if not parts:
            return self
        segments = [s for s in self.key.split("/") if s]
        for part in parts:
            for segment in part.split("/"):
                if segment == "..":
                    raise StorageURIError(
                        f"cannot join {part!r} to {self}: '..' segments are not allowed in storage paths"
                    )
                if segment and segment != ".":
                    segments.append(segment)
        trailing = "/" if parts[-1].endswith("/") and segments else ""
        return StorageURI(self.scheme, self.bucket, "/".join(segments) + trailing)

    def as_prefix(self) -> StorageURI:
        """The same location read as a prefix ("directory"): the key gets a trailing slash."""
        if not self.key or self.key.endswith("/"):
            return self
        return StorageURI(self.scheme, self.bucket, self.key + "/")

    @property
    def local_path(self) -> PurePosixPath:
        """The absolute local path of a ``file://`` URI."""
        if self.scheme != "file":
            raise StorageURIError(f"{self} is not a file:// URI and has no local path")
        return PurePosixPath("/" + self.key)

    @property
    def repo_id(self) -> str:
        """The Hub repository id (``org/name``) of an ``hf://`` URI."""
        self._require_hf()
        parts = self.bucket.split("/")
        if parts[0] in _HF_REPO_TYPES:
            parts = parts[1:]
        return "/".join(parts).partition("@")[0]

    @property
    def repo_type(self) -> str:
        """``model``, ``dataset`` or ``space`` for an ``hf://`` URI."""
        self._require_hf()
        return _HF_REPO_TYPES.get(self.bucket.split("/")[0], "model")

    @property
    def revision(self) -> str | None:
        """The ``@revision`` of an ``hf://`` URI (percent-decoded, so ``refs%2Fpr%2F1`` works)."""
        self._require_hf()
        _, at, revision = self.bucket.partition("@")
        return unquote(revision) if at else None

    def _require_hf(self) -> None:
        if self.scheme != "hf":
            raise StorageURIError(f"{self} is not an hf:// URI")


def parse_uri(uri: str) -> StorageURI:
    """Parse and validate a storage URI; raise :class:`StorageURIError` naming the URI and the fix."""
    if not isinstance(uri, str):
        raise StorageURIError(f"a storage URI must be a string like {_ALLOWED}, got {type(uri).__name__}")
    text = uri.strip()
    if not text:
        raise StorageURIError(f"storage URI is empty; expected {_ALLOWED}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        hint = f" (for a local path write file://{text})" if text.startswith("/") else ""
        raise StorageURIError(
            f"{uri!r} is not a storage URI: it has no scheme{hint}; allowed schemes: {', '.join(SCHEMES)}"
        )
    scheme = scheme.lower()
    if scheme == "s3":
        parsed = _parse_s3(uri, rest)
    elif scheme == "file":
        parsed = _parse_file(uri, rest)
    elif scheme == "hf":
        parsed = _parse_hf(uri, rest)
    else:
        raise StorageURIError(
            f"unsupported scheme {scheme + '://'!r} in {uri!r}; allowed schemes: {', '.join(SCHEMES)} "
            f"({_ALLOWED})"
        )
    if ".." in parsed.key.split("/"):
        raise StorageURIError(f"{uri!r} contains a '..' segment, which storage paths do not allow")
    return parsed


@dataclass(frozen=True)
class StoreURIParser:
    """Parses the URIs one store accepts: its own scheme, and for single objects a non-empty key.

    ``object_error`` completes "``<uri>`` names ..." for a URI that ends at a directory, e.g.
    ``"a prefix, not an object (expected s3://bucket/key)"``.
    """

    scheme: Scheme
    store: str
    expected: str
    object_error: str

    def parse(self, uri: str) -> StorageURI:
        parsed = parse_uri(uri)
        if parsed.scheme != self.scheme:
            raise InvalidInputError(f"{self.store} cannot handle {uri!r}: expected {self.expected}")
        return parsed

    def parse_object(self, uri: str) -> StorageURI:
        parsed = self.parse(uri)
        if not parsed.key or parsed.key.endswith("/"):
            raise InvalidInputError(f"{uri!r} names {self.object_error}")
        return parsed


def _parse_s3(uri: str, rest: str) -> StorageURI:
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageURIError(f"{uri!r} has no bucket; expected s3://bucket/key")
    if not _BUCKET_RE.match(bucket):
        raise StorageURIError(
            f"{uri!r}: {bucket!r} is not a valid S3 bucket name "
            "(3-63 letters, digits, dots, hyphens or underscores; starting and ending alphanumeric)"
        )
    return StorageURI("s3", bucket, key)


def _parse_file(uri: str, rest: str) -> StorageURI:
    # file://localhost/abs is the RFC 8089 spelling of file:///abs.
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise StorageURIError(
            f"{uri!r} is not an absolute file URI; write file:///absolute/path (three slashes), "
            "relative paths are not allowed"
        )
    key = rest.lstrip("/")
    return StorageURI("file", "", key)


def _parse_hf(uri: str, rest: str) -> StorageURI:
    parts = rest.split("/")
    type_prefix = [parts.pop(0)] if parts[0] in _HF_REPO_TYPES else []
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise StorageURIError(
            f"{uri!r} does not name a Hub repository; expected hf://org/name[@revision][/path] "
            "(or hf://datasets/org/name for a dataset)"
        )
    org, name = parts[0], parts[1].partition("@")[0]
    if not _HF_NAME_RE.match(org) or not _HF_NAME_RE.match(name):
        raise StorageURIError(
            f"{uri!r}: {org}/{name} is not a valid Hub repository id "
            "(letters, digits, '-', '_' and '.' in org and name)"
        )
    if "@" in parts[1] and not parts[1].partition("@")[2]:
        raise StorageURIError(f"{uri!r} has an empty @revision")
    return StorageURI("hf", "/".join([*type_prefix, parts[0], parts[1]]), "/".join(parts[2:]))
