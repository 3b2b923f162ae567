"""``file://`` storage: local runs, shared volumes and tests.

Every write goes to a hidden temporary sibling that is fsync'ed and renamed into place, so a
concurrent reader (or a process killed mid-write) never sees a torn file, and listings skip the
temporaries. Copies of a prefix run on a thread pool: on network filesystems (NFS, FUSE mounts of
buckets) per-file latency, not bandwidth, dominates.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from kubetune.errors import InvalidInputError, StorageAccessError

from .base import (
    TMP_SUFFIX,
    ObjectInfo,
    ObjectList,
    PathList,
    ProgressCallback,
    URIList,
    atomic_copy,
    atomic_write,
    local_os_error,
    local_target,
    temp_path_for,
    walk_files,
)
from .config import StorageConfig
from .uri import StorageURI, StoreURIParser

T = TypeVar("T")


class FileStore:
    """:class:`~kubetune.storage.ObjectStore` for ``file://`` URIs."""

    _uris = StoreURIParser(
        "file", "FileStore", "a file:/// URI", "a directory, not a file (expected file:///path/to/file)"
    )

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config if config is not None else StorageConfig()

    def __repr__(self) -> str:
        return "FileStore()"

    def list(self, prefix_uri: str) -> ObjectList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        root = Path(prefix.local_path)
        if not root.is_dir():
            return []
        found: ObjectList = []
        try:
            for dirpath, _, files in os.walk(root, onerror=_raise):
                for name in files:
                    path = Path(dirpath, name)
                    if name.endswith(TMP_SUFFIX) or not path.is_file():
                        continue
                    found.append(ObjectInfo(path.relative_to(root).as_posix(), path.stat().st_size))
        except OSError as exc:
            raise local_os_error(exc, str(prefix), "list") from exc
        return sorted(found, key=lambda info: info.key)

    def exists(self, uri: str) -> bool:
        return Path(self._uris.parse_object(uri).local_path).is_file()

    def read_bytes(self, uri: str) -> bytes:
        target = self._uris.parse_object(uri)
        return _local(lambda: Path(target.local_path).read_bytes(), target, "read")

    def write_bytes(self, uri: str, data: bytes) -> None:
        target = self._uris.parse_object(uri)
        _local(lambda: atomic_write(Path(target.local_path), data), target, "write")

    def download_file(self, uri: str, path: str | os.PathLike[str]) -> Path:
        source = self._uris.parse_object(uri)
        local = Path(path)
        _local(lambda: atomic_copy(Path(source.local_path), local), source, "read")
        return local

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> None:
        target = self._uris.parse_object(uri)
        local = Path(path)
        if not local.is_file():
            raise InvalidInputError(f"cannot upload {local} to {target}: it is not a file")
        _local(lambda: atomic_copy(local, Path(target.local_path)), target, "write")

    def download_prefix(
        self,
        prefix_uri: str,
        local_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> PathList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        objects = self.list(str(prefix))
        if not objects:
            raise StorageAccessError(f"{prefix}: no files under this directory (nothing to download)")
        root = Path(local_dir)
        jobs = [
            (
                prefix.join(info.key),
                Path(prefix.local_path, info.key),
                local_target(root, info.key, str(prefix)),
            )
            for info in objects
        ]
        self._copy_all(jobs, progress)
        return [dest for _, _, dest in jobs]

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix_uri: str,
        *,
        progress: ProgressCallback | None = None,
        exclude: Sequence[str] = (),
    ) -> URIList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        jobs = [
            (prefix.join(rel), path, Path(prefix.join(rel).local_path))
            for rel, path in walk_files(Path(local_dir), exclude)
        ]
        self._copy_all(jobs, progress)
        return [str(uri) for uri, _, _ in jobs]

    def delete_prefix(self, prefix_uri: str) -> None:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        if not prefix.key:
            raise InvalidInputError(f"refusing to delete {prefix}: that is the filesystem root")
        try:
            shutil.rmtree(prefix.local_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise local_os_error(exc, str(prefix), "delete") from exc

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        target = self._uris.parse_object(uri)
        path = Path(target.local_path)

        def create() -> bool:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path_for(path)
            atomic_write(tmp, data)
            try:
                # link() fails with EEXIST when the name is taken: O_EXCL semantics, but the name
                # only ever appears with its whole content.
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True

        return _local(create, target, "create")

    def delete_keys(self, prefix_uri: str, keys: Sequence[str]) -> None:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        root = Path(prefix.local_path)
        for key in keys:
            path = local_target(root, key, str(prefix))
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise local_os_error(exc, str(prefix.join(key)), "delete") from exc
            _remove_empty_parents(path.parent, root)

    def _copy_all(
        self, jobs: Sequence[tuple[StorageURI, Path, Path]], progress: ProgressCallback | None
    ) -> None:
        """Copy ``(uri, source, destination)`` jobs concurrently; ``uri`` names failures."""
        if not jobs:
            return
        with ThreadPoolExecutor(max_workers=min(self.config.max_concurrency, len(jobs))) as pool:
            futures = [
                pool.submit(_local, partial(atomic_copy, source, dest, progress), uri, "copy")
                for uri, source, dest in jobs
            ]
            for future in futures:
                future.result()


def _local(fn: Callable[[], T], uri: StorageURI, action: str) -> T:
    try:
        return fn()
    except OSError as exc:
        raise local_os_error(exc, str(uri), action) from exc


def _remove_empty_parents(directory: Path, root: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``root`` while they are empty."""
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _raise(exc: OSError) -> None:
    raise exc
