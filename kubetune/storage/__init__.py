"""Object storage for models, data, checkpoints and outputs: ``s3://``, ``file://`` and ``hf://``.

Everything takes full URIs, so callers never branch on the scheme::

    store = open_store(plan.model_uri, StorageConfig.from_env(endpoint=plan.storage.endpoint))
    store.download_prefix(plan.model_uri, workdir / "model")

Missing objects and denied access raise :class:`~kubetune.errors.StorageAccessError` (exit code 3),
malformed URIs and writes to ``hf://`` raise :class:`~kubetune.errors.InvalidInputError` (exit code 2),
and transient failures that outlast the retries raise :class:`~kubetune.errors.RetriableError`.
This package never imports torch.
"""

from __future__ import annotations

from .base import ObjectInfo, ObjectStore, ProgressCallback
from .config import StorageConfig
from .filesystem import FileStore
from .hub import HubStore
from .s3 import S3Store
from .uri import SCHEMES, Scheme, StorageURI, StorageURIError, parse_uri

__all__ = [
    "SCHEMES",
    "FileStore",
    "HubStore",
    "ObjectInfo",
    "ObjectStore",
    "ProgressCallback",
    "S3Store",
    "Scheme",
    "StorageConfig",
    "StorageURI",
    "StorageURIError",
    "open_store",
    "parse_uri",
]


def open_store(uri: str, config: StorageConfig | None = None) -> ObjectStore:
    """The store for ``uri``'s scheme. ``config`` defaults to :meth:`StorageConfig.from_env`.

    A store serves every URI of its scheme (any bucket, any path), so one store per scheme is enough;
    S3 stores hold a connection pool, so reuse them rather than opening one per call.
    """
    scheme = parse_uri(uri).scheme
    if config is None:
        config = StorageConfig.from_env()
    if scheme == "s3":
        return S3Store(config)
    if scheme == "file":
        return FileStore(config)
    return HubStore(config)
