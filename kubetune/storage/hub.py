"""``hf://`` storage: read-only access to Hugging Face Hub repositories (base models, datasets).

huggingface_hub is imported lazily: it ships with transformers in the trainer image, and the
operator, which only parses hf:// URIs, must not need it. Files are fetched into the Hub cache
(``HF_HOME``/``HF_HUB_CACHE``, or ``cache_dir``) and hard-linked into the target directory where the
filesystem allows, so a model is stored once on the pod's scratch volume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from kubetune.errors import InvalidInputError, StorageAccessError

from .base import (
    ObjectInfo,
    ObjectList,
    PathList,
    ProgressCallback,
    URIList,
    atomic_copy,
    local_target,
    temp_path_for,
)
from .config import StorageConfig
from .retry import Backoff, call_with_backoff, describe
from .uri import StorageURI, StoreURIParser

T = TypeVar("T")


class HubStore:
    """:class:`~kubetune.storage.ObjectStore` for ``hf://`` URIs; every write raises InvalidInputError.

    ``local_files_only`` serves only what the cache already holds (air-gapped clusters with a
    pre-populated cache volume); ``HF_HUB_OFFLINE=1`` has the same effect. ``HF_TOKEN`` authenticates
    for private and gated repositories.
    """

    _uris = StoreURIParser(
        "hf", "HubStore", "an hf:// URI", "a repository or folder, not a file (expected hf://org/name/file)"
    )

    def __init__(
        self,
        config: StorageConfig | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
    ) -> None:
        self.config = config if config is not None else StorageConfig()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.local_files_only = local_files_only
        self._backoff = Backoff.from_config(self.config)

    def __repr__(self) -> str:
        return f"HubStore(cache_dir={self.cache_dir!r}, local_files_only={self.local_files_only})"

    def list(self, prefix_uri: str) -> ObjectList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        if self._offline():
            snapshot = self._snapshot(prefix)
            return _walk(snapshot / prefix.key) if snapshot is not None else []

        def fetch() -> ObjectList:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import EntryNotFoundError
            from huggingface_hub.hf_api import RepoFile

            try:
                entries = list(
                    HfApi().list_repo_tree(
                        prefix.repo_id,
                        path_in_repo=prefix.key.rstrip("/") or None,
                        recursive=True,
                        revision=prefix.revision,
                        repo_type=prefix.repo_type,
                    )
                )
            except EntryNotFoundError:
                return []
            found = [
                ObjectInfo(entry.path[len(prefix.key) :], entry.size)
                for entry in entries
                if isinstance(entry, RepoFile)
            ]
            return sorted(found, key=lambda info: info.key)

        return self._call(fetch, f"listing {prefix}", prefix)

    def exists(self, uri: str) -> bool:
        """Whether the file exists (a missing repository or revision also answers ``False``)."""
        target = self._uris.parse_object(uri)
        if self._offline():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(
                target.repo_id,
                target.key,
                cache_dir=self.cache_dir,
                revision=target.revision,
                repo_type=target.repo_type,
            )
            return isinstance(cached, str)

        def check() -> bool:
            from huggingface_hub import HfApi

            return HfApi().file_exists(
                target.repo_id, target.key, repo_type=target.repo_type, revision=target.revision
            )

        return self._call(check, f"checking {target}", target)

    def read_bytes(self, uri: str) -> bytes:
        return self._download(self._uris.parse_object(uri)).read_bytes()

    def download_file(self, uri: str, path: str | os.PathLike[str]) -> Path:
        local = Path(path)
        _link_or_copy(self._download(self._uris.parse_object(uri)), local)
        return local

    def download_prefix(
        self,
        prefix_uri: str,
        local_dir: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
    ) -> PathList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        snapshot = self._snapshot(prefix)
        objects = _walk(snapshot / prefix.key) if snapshot is not None else []
        if snapshot is None or not objects:
            raise StorageAccessError(
                f"{prefix}: no files under this path of the repository (nothing to download)"
            )
        root = Path(local_dir)
        paths = []
        for info in objects:
            dest = local_target(root, info.key, str(prefix))
            _link_or_copy(snapshot / prefix.key / info.key, dest)
            if progress is not None:
                progress(info.size)
            paths.append(dest)
        return paths

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise self._read_only(uri)

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> None:
        raise self._read_only(uri)

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix_uri: str,
        *,
        progress: ProgressCallback | None = None,
        exclude: Sequence[str] = (),
    ) -> URIList:
        raise self._read_only(prefix_uri)

    def delete_prefix(self, prefix_uri: str) -> None:
        raise self._read_only(prefix_uri)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        raise self._read_only(uri)

    def delete_keys(self, prefix_uri: str, keys: Sequence[str]) -> None:
        raise self._read_only(prefix_uri)

    # -- internals -----------------------------------------------------------------------------

    def _snapshot(self, prefix: StorageURI) -> Path | None:
        """The cached snapshot holding every file under ``prefix`` (``None``: the path is empty)."""
        from huggingface_hub import snapshot_download

        def fetch() -> Path:
            return Path(
                snapshot_download(
                    prefix.repo_id,
                    repo_type=prefix.repo_type,
                    revision=prefix.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=self.local_files_only,
                    # fnmatch's "*" crosses "/", so this takes the whole subtree.
                    allow_patterns=[f"{prefix.key}*"] if prefix.key else None,
                    max_workers=self.config.max_concurrency,
                )
            )

        snapshot = self._call(fetch, f"downloading {prefix}", prefix)
        return snapshot if (snapshot / prefix.key).is_dir() else None

    def _download(self, target: StorageURI) -> Path:
        from huggingface_hub import hf_hub_download

        def fetch() -> Path:
            return Path(
                hf_hub_download(
                    target.repo_id,
                    target.key,
                    repo_type=target.repo_type,
                    revision=target.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=self.local_files_only,
                )
            )

        return self._call(fetch, f"downloading {target}", target)

    def _offline(self) -> bool:
        from huggingface_hub import constants

        return self.local_files_only or constants.is_offline_mode()

    def _call(self, fn: Callable[[], T], what: str, uri: StorageURI) -> T:
        return call_with_backoff(
            fn, what=what, backoff=self._backoff, classify=lambda exc: self._classify(exc, uri)
        )

    def _classify(self, exc: Exception, uri: StorageURI) -> Exception | None:
        """``None`` for a transient failure, else the error to raise (see ``retry.Classifier``)."""
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        if isinstance(exc, RepositoryNotFoundError):
            return StorageAccessError(
                f"{uri}: repository {uri.repo_id!r} not found or not accessible "
                "(private and gated repositories need HF_TOKEN)"
            )
        if isinstance(exc, RevisionNotFoundError):
            return StorageAccessError(f"{uri}: revision {uri.revision!r} not found in {uri.repo_id!r}")
        if isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled):
            if self._offline():
                return StorageAccessError(
                    f"{uri}: not in the local Hub cache and downloads are off (offline mode)"
                )
            return None  # the Hub was unreachable: a network problem, worth retrying
        if isinstance(exc, EntryNotFoundError):
            return StorageAccessError(f"{uri}: no such file in {uri.repo_id!r}")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status == 429 or status >= 500:
                return None
            return StorageAccessError(f"{uri}: the Hub refused the request ({describe(exc)})")
        if isinstance(exc, ConnectionError | TimeoutError) or _is_transport_error(exc):
            return None
        return exc

    def _read_only(self, uri: str) -> InvalidInputError:
        return InvalidInputError(
            f"{uri}: hf:// URIs are read-only (the Hub is a source of base models and data); "
            "write outputs to an s3:// or file:// URI"
        )


def _walk(root: Path) -> ObjectList:
    if not root.is_dir():
        return []
    found = [
        ObjectInfo(path.relative_to(root).as_posix(), path.stat().st_size)
        for path in root.rglob("*")
        if path.is_file() and ".cache" not in path.relative_to(root).parts
    ]
    return sorted(found, key=lambda info: info.key)


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link a cached file into place (no second copy on disk), copying across filesystems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        os.link(source.resolve(), tmp)
    except OSError:
        atomic_copy(source, dest)
        return
    os.replace(tmp, dest)


def _is_transport_error(exc: Exception) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        return False
    return isinstance(exc, httpx.TransportError)
