"""The store interface every backend implements, and local-file helpers the backends share."""

from __future__ import annotations

import errno
import fnmatch
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Protocol, runtime_checkable

from kubetune.errors import InvalidInputError, StorageAccessError

ProgressCallback = Callable[[int], None]
"""Receives byte-count deltas, from several threads at once. A delta is negative when a file is
retried from its start, so a running sum is always the number of bytes currently transferred."""

# Marks files being written; listings skip them so readers never pick up a half-written file.
TMP_SUFFIX: Final = ".kubetune-tmp"
_COPY_CHUNK: Final = 4 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a listed prefix."""

    key: str
    """Path relative to the listed prefix, ``/``-separated (``"shards/model-00001.safetensors"``)."""
    size: int
    """Size in bytes."""


ObjectList = list[ObjectInfo]
PathList = list[Path]
URIList = list[str]


@runtime_checkable
class ObjectStore(Protocol):
    """Object storage addressed by full URIs (``s3://``, ``file://``, ``hf://``).

    A ``prefix_uri`` is read as a directory: ``s3://b/run/model`` covers ``s3://b/run/model/...``
    and never ``s3://b/run/model-old/...``. Missing objects and denied access raise
    :class:`~kubetune.errors.StorageAccessError`; transient failures that outlast the retries raise
    :class:`~kubetune.errors.RetriableError`; writing to a read-only store raises
    :class:`~kubetune.errors.InvalidInputError`.
    """

    def list(self, prefix_uri: str) -> ObjectList:
        """Every object under the prefix, recursively, sorted by key; ``[]`` when there is none."""
        ...

    def exists(self, uri: str) -> bool:
        """Whether an object exists at ``uri`` (a missing bucket raises, a missing key does not)."""
        ...

    def read_bytes(self, uri: str) -> bytes: ...

    def write_bytes(self, uri: str, data: bytes) -> None: ...

    def download_file(self, uri: str, path: str | os.PathLike[str]) -> Path:
        """Download one object to ``path`` (parents created, replaced atomically); return the path."""
        ...

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> None: ...

    def download_prefix(
        self,
        prefix_uri: str,
        local_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> PathList:
        """Download every object under the prefix into ``local_dir``, concurrently.

        Returns the local paths in key order. An empty or missing prefix raises
        :class:`~kubetune.errors.StorageAccessError`: a model or dataset that is not there is an error.
        """
        ...

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix_uri: str,
        *,
        progress: ProgressCallback | None = None,
        exclude: Sequence[str] = (),
    ) -> URIList:
        """Upload every file under ``local_dir`` (recursively, concurrently); return the URIs written.

        ``exclude`` holds glob patterns: one without ``/`` matches any file or directory name at any
        depth (``"*.tmp"``, ``"__pycache__"``); one with ``/`` matches the path relative to
        ``local_dir`` (``"logs/*"``).
        """
        ...

    def delete_prefix(self, prefix_uri: str) -> None:
        """Delete every object under the prefix (idempotent). Refuses a bucket or filesystem root."""
        ...

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create the object only if nothing is stored at ``uri`` yet, atomically: of two callers
        racing for the same ``uri`` exactly one gets ``True``; the other (and any later caller)
        gets ``False`` and the object is left as it was. ``s3://``: a conditional PutObject
        (``If-None-Match: *``); ``file://``: a hard link of a complete temporary file, which fails
        when the name exists (an exclusive create that never shows a half-written file)."""
        ...

    def delete_keys(self, prefix_uri: str, keys: Sequence[str]) -> None:
        """Delete exactly the listed objects (keys relative to the prefix, as :meth:`list` gives
        them) and nothing else; missing ones are ignored."""
        ...


def walk_files(local_dir: Path, exclude: Sequence[str] = ()) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of every regular file under ``local_dir``, sorted, honouring ``exclude``."""
    if not local_dir.is_dir():
        raise InvalidInputError(f"cannot upload {local_dir}: it is not a directory")
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(local_dir):
        rel_root = PurePosixPath(Path(root).relative_to(local_dir).as_posix())
        dirs[:] = [d for d in dirs if not _excluded(rel_root / d, exclude)]
        for name in files:
            rel = rel_root / name
            path = Path(root, name)
            if name.endswith(TMP_SUFFIX) or _excluded(rel, exclude) or not path.is_file():
                continue
            found.append((rel.as_posix(), path))
    yield from sorted(found)


def _excluded(rel: PurePosixPath, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(rel.as_posix(), pattern.strip("/")):
                return True
        elif fnmatch.fnmatchcase(rel.name, pattern):
            return True
    return False


def local_target(local_dir: Path, key: str, uri: str) -> Path:
    """Where object ``key`` (relative to a prefix) lands under ``local_dir``; refuses to escape it."""
    rel = PurePosixPath(key)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InvalidInputError(f"{uri}: object key {key!r} cannot be stored under {local_dir}")
    return local_dir.joinpath(*rel.parts)


def temp_path_for(path: Path) -> Path:
    """A hidden sibling of ``path`` to write before an atomic rename."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def atomic_write(
    path: Path, chunks: Iterator[bytes] | bytes, progress: ProgressCallback | None = None
) -> int:
    """Write ``path`` through a temporary sibling and a rename, so readers see the old or the new file.

    Returns the number of bytes written. The file is fsync'ed before the rename so a crash cannot
    leave a complete-looking name with missing data (checkpoint commits rely on this).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    # os.open with 0o666 lets the umask decide permissions, unlike tempfile's private 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                out.write(chunk)
                written += len(chunk)
                if progress is not None and chunk:
                    progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def atomic_copy(src: Path, dst: Path, progress: ProgressCallback | None = None) -> int:
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_write`); return the bytes copied."""
    with src.open("rb") as source:
        return atomic_write(dst, iter(lambda: source.read(_COPY_CHUNK), b""), progress)


def local_os_error(exc: OSError, uri: str, action: str) -> Exception:
    """Map a local filesystem error to the exit-code contract (missing or denied: exit code 3)."""
    detail = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return StorageAccessError(f"{uri}: cannot {action}: no such file or directory")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageAccessError(f"{uri}: cannot {action}: {detail}")
    if exc.errno == errno.EISDIR:
        return StorageAccessError(f"{uri}: cannot {action}: it is a directory (a prefix), not an object")
    return exc
