"""``s3://`` storage through boto3 and s3transfer.

All transfers of one call share a single s3transfer ``TransferManager``: its thread pool serves the
files of a prefix and the parts of each large file (multipart uploads, ranged GETs) together, so a
model of four big shards and a handful of JSON files keeps ``max_concurrency`` requests in flight.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from s3transfer.exceptions import RetriesExceededError
from s3transfer.subscribers import BaseSubscriber

from kubetune.errors import InvalidInputError, KubetuneError, StorageAccessError

from .base import (
    ObjectInfo,
    ObjectList,
    PathList,
    ProgressCallback,
    URIList,
    local_os_error,
    local_target,
    walk_files,
)
from .config import MiB, StorageConfig
from .retry import Backoff, call_with_backoff, describe
from .uri import StorageURI, StoreURIParser

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from s3transfer.futures import TransferFuture

log = logging.getLogger(__name__)

T = TypeVar("T")

_MISSING_CODES: Final = frozenset({"NoSuchBucket", "NoSuchKey", "NoSuchVersion", "404", "NotFound"})
_DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "403",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
        "InvalidObjectState",
    }
)
# The bucket lives in another region than the one requests are signed for.
_REGION_CODES: Final = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})
_PRECONDITION_CODES: Final = frozenset({"PreconditionFailed", "412"})
_DELETE_BATCH: Final = 1000  # DeleteObjects' limit


def make_s3_client(config: StorageConfig) -> S3Client:
    """A thread-safe boto3 S3 client for ``config`` (credentials from boto3's default chain)."""
    addressing = config.addressing_style
    if addressing == "auto" and config.endpoint is not None:
        # MinIO, Ceph and moto are addressed by IP or service name, where bucket subdomains don't resolve.
        addressing = "path"
    botocore_config = Config(
        region_name=config.region,
        retries={"mode": config.retry_mode, "max_attempts": config.max_attempts},
        # One pooled connection per transfer thread, plus a few for listings and small calls.
        max_pool_connections=config.max_concurrency + 4,
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        s3={"addressing_style": addressing},
        user_agent_extra="kubetune",
    )
    # A session per store (sessions are not thread-safe and cache credentials), but one loader for
    # all of them: parsing botocore's service models is most of the cost of creating a client.
    session = botocore.session.get_session()
    session.register_component("data_loader", _shared_loader())
    client: S3Client = session.create_client("s3", endpoint_url=config.endpoint, config=botocore_config)
    return client


@functools.cache
def _shared_loader() -> botocore.loaders.Loader:
    return botocore.loaders.create_loader()


@dataclass(eq=False)
class _Transfer:
    direction: Literal["upload", "download"]
    uri: StorageURI
    path: Path
    size: int | None = None
    transferred: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def what(self) -> str:
        return (
            f"uploading {self.path} to {self.uri}"
            if self.direction == "upload"
            else f"downloading {self.uri}"
        )


class _Subscriber(BaseSubscriber):
    def __init__(self, transfer: _Transfer, progress: ProgressCallback | None) -> None:
        self._transfer = transfer
        self._progress = progress

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        # The listing already told us the size: spare s3transfer a HeadObject per file.
        if self._transfer.size is not None and self._transfer.direction == "download":
            future.meta.provide_transfer_size(self._transfer.size)

    def on_progress(self, future: TransferFuture, bytes_transferred: int, **kwargs: Any) -> None:
        with self._transfer.lock:
            self._transfer.transferred += bytes_transferred
        if self._progress is not None:
            self._progress(bytes_transferred)


class S3Store:
    """:class:`~kubetune.storage.ObjectStore` for ``s3://`` URIs (any bucket reachable with one config)."""

    _uris = StoreURIParser(
        "s3", "S3Store", "an s3:// URI", "a prefix, not an object (expected s3://bucket/key)"
    )

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config if config is not None else StorageConfig.from_env()
        self._client = make_s3_client(self.config)
        self._backoff = Backoff.from_config(self.config)
        self._transfer_config = TransferConfig(
            multipart_threshold=self.config.multipart_threshold,
            multipart_chunksize=self.config.multipart_chunksize,
            max_concurrency=self.config.max_concurrency,
            io_chunksize=1 * MiB,
            preferred_transfer_client="classic",
        )

    def __repr__(self) -> str:
        return f"S3Store(endpoint={self.config.endpoint!r}, region={self.config.region!r})"

    # -- listing and small objects -------------------------------------------------------------

    def list(self, prefix_uri: str) -> ObjectList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        return self._call(lambda: self._list(prefix), f"listing {prefix}", prefix)

    def exists(self, uri: str) -> bool:
        target = self._uris.parse_object(uri)

        def head() -> bool:
            try:
                self._client.head_object(Bucket=target.bucket, Key=target.key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return False
                raise
            return True

        found = self._call(head, f"checking {target}", target)
        if not found:
            self._require_bucket(target)
        return found

    def read_bytes(self, uri: str) -> bytes:
        target = self._uris.parse_object(uri)

        def read() -> bytes:
            data: bytes = self._client.get_object(Bucket=target.bucket, Key=target.key)["Body"].read()
            return data

        return self._call(read, f"reading {target}", target)

    def write_bytes(self, uri: str, data: bytes) -> None:
        target = self._uris.parse_object(uri)
        self._call(
            lambda: self._client.put_object(Bucket=target.bucket, Key=target.key, Body=data),
            f"writing {target}",
            target,
        )

    def delete_prefix(self, prefix_uri: str) -> None:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        if not prefix.key:
            raise InvalidInputError(f"refusing to delete {prefix}: that is a whole bucket, not a prefix")

        def delete() -> None:
            keys = [prefix.key + info.key for info in self._list(prefix)]
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=prefix.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise _DeleteFailed(first.get("Code", ""), first.get("Message", ""), len(errors))

        self._call(delete, f"deleting {prefix}", prefix)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        target = self._uris.parse_object(uri)

        def create() -> bool:
            try:
                self._client.put_object(Bucket=target.bucket, Key=target.key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                # 412: the key exists. (409 ConditionalRequestConflict, a concurrent conditional
                # write in flight, is retried by _call like any other unknown error.)
                if _code(exc) in _PRECONDITION_CODES:
                    return False
                raise
            return True

        return self._call(create, f"creating {target}", target)

    def delete_keys(self, prefix_uri: str, keys: Sequence[str]) -> None:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        full = [prefix.join(key).key for key in keys]

        def delete() -> None:
            for start in range(0, len(full), _DELETE_BATCH):
                batch = full[start : start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=prefix.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise _DeleteFailed(first.get("Code", ""), first.get("Message", ""), len(errors))

        if full:
            self._call(delete, f"deleting {len(full)} objects under {prefix}", prefix)

    # -- files and prefixes --------------------------------------------------------------------

    def download_file(self, uri: str, path: str | os.PathLike[str]) -> Path:
        target = self._uris.parse_object(uri)
        local = Path(path)
        local.parent.mkdir(parents=True, exist_ok=True)
        self._transfer([_Transfer("download", target, local)], None)
        return local

    def upload_file(self, path: str | os.PathLike[str], uri: str) -> None:
        target = self._uris.parse_object(uri)
        local = Path(path)
        if not local.is_file():
            raise InvalidInputError(f"cannot upload {local} to {target}: it is not a file")
        self._transfer([_Transfer("upload", target, local)], None)

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
            self._require_bucket(prefix)
            raise StorageAccessError(f"{prefix}: no objects under this prefix (nothing to download)")
        root = Path(local_dir)
        transfers = [
            _Transfer("download", prefix.join(info.key), local_target(root, info.key, str(prefix)), info.size)
            for info in objects
        ]
        for transfer in transfers:
            transfer.path.parent.mkdir(parents=True, exist_ok=True)
        self._transfer(transfers, progress)
        log.info(
            "downloaded %d files (%d bytes) from %s", len(transfers), sum(o.size for o in objects), prefix
        )
        return [transfer.path for transfer in transfers]

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        prefix_uri: str,
        *,
        progress: ProgressCallback | None = None,
        exclude: Sequence[str] = (),
    ) -> URIList:
        prefix = self._uris.parse(prefix_uri).as_prefix()
        transfers = [
            _Transfer("upload", prefix.join(rel), path) for rel, path in walk_files(Path(local_dir), exclude)
        ]
        self._transfer(transfers, progress)
        log.info("uploaded %d files from %s to %s", len(transfers), local_dir, prefix)
        return [str(transfer.uri) for transfer in transfers]

    # -- internals -----------------------------------------------------------------------------

    def _transfer(self, transfers: Sequence[_Transfer], progress: ProgressCallback | None) -> None:
        """Run all transfers through one manager; retry the failed ones with backoff, whole files."""
        pending = list(transfers)
        attempt = 1
        while pending:
            failed: list[tuple[_Transfer, Exception]] = []
            with create_transfer_manager(self._client, self._transfer_config) as manager:
                futures = []
                for transfer in pending:
                    subscribers = [_Subscriber(transfer, progress)]
                    if transfer.direction == "upload":
                        future = manager.upload(
                            str(transfer.path), transfer.uri.bucket, transfer.uri.key, subscribers=subscribers
                        )
                    else:
                        future = manager.download(
                            transfer.uri.bucket, transfer.uri.key, str(transfer.path), subscribers=subscribers
                        )
                    futures.append((transfer, future))
                for transfer, future in futures:
                    try:
                        future.result()
                    except Exception as exc:
                        final = self._classify(exc, transfer.uri)
                        if final is exc:
                            raise
                        if final is not None:
                            # Raising inside the manager's block cancels the transfers still running.
                            raise final from exc
                        failed.append((transfer, exc))
            if not failed:
                return
            first_transfer, first_error = failed[0]
            if attempt >= self._backoff.attempts:
                raise self._backoff.exhausted(
                    f"{first_transfer.what}"
                    + (f" (and {len(failed) - 1} more files)" if len(failed) > 1 else ""),
                    first_error,
                ) from first_error
            for transfer, _ in failed:
                # A retried file starts over: take back the bytes it had reported.
                if progress is not None and transfer.transferred:
                    progress(-transfer.transferred)
                transfer.transferred = 0
            self._backoff.wait(
                attempt, f"{first_transfer.what} ({len(failed)} of {len(transfers)} files)", first_error
            )
            pending = [transfer for transfer, _ in failed]
            attempt += 1

    def _list(self, prefix: StorageURI) -> ObjectList:
        found: ObjectList = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix.key) :]
                # Zero-byte "folder" markers written by consoles are not files.
                if rel and not rel.endswith("/"):
                    found.append(ObjectInfo(rel, obj["Size"]))
        return sorted(found, key=lambda info: info.key)

    def _call(self, fn: Callable[[], T], what: str, uri: StorageURI) -> T:
        return call_with_backoff(
            fn, what=what, backoff=self._backoff, classify=lambda exc: self._classify(exc, uri)
        )

    def _classify(self, exc: Exception, uri: StorageURI) -> Exception | None:
        """``None`` for a transient failure, else the error to raise (see ``retry.Classifier``)."""
        if isinstance(exc, KubetuneError):
            return exc
        if isinstance(exc, ClientError | _DeleteFailed):
            code, message = (
                (_code(exc), _message(exc)) if isinstance(exc, ClientError) else (exc.code, exc.message)
            )
            if code == "NoSuchBucket":
                return StorageAccessError(f"{uri}: bucket {uri.bucket!r} does not exist{self._at()}")
            if code in _MISSING_CODES:
                # A HEAD answers a bare 404 for a missing bucket too; say which one it is.
                self._require_bucket(uri)
                return StorageAccessError(f"{uri}: no such object{self._at()}")
            if code in _DENIED_CODES:
                return StorageAccessError(
                    f"{uri}: access denied ({code}: {message}){self._at()}; check the S3 credentials "
                    "(spec.storage.secretRef) and the bucket policy"
                )
            if code in _REGION_CODES:
                return StorageAccessError(
                    f"{uri}: the bucket is in another region than {self.config.region or 'the default'!r} "
                    f"({code}: {message}); set spec.storage.region or AWS_REGION"
                )
            return None
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageAccessError(
                f"{uri}: no usable S3 credentials ({describe(exc)}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (spec.storage.secretRef) or a workload identity"
            )
        if isinstance(exc, ParamValidationError | NoRegionError):
            return InvalidInputError(f"{uri}: {describe(exc)}")
        if isinstance(exc, BotoCoreError | RetriesExceededError | ConnectionError | TimeoutError):
            return None
        if isinstance(exc, OSError):
            return local_os_error(exc, str(uri), "transfer")
        return exc

    def _require_bucket(self, uri: StorageURI) -> None:
        """Turn "nothing there" into "no such bucket" when that is the actual cause."""
        try:
            self._client.head_bucket(Bucket=uri.bucket)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise StorageAccessError(f"{uri}: bucket {uri.bucket!r} does not exist{self._at()}") from exc
            if _code(exc) in _DENIED_CODES:
                raise StorageAccessError(
                    f"{uri}: access to bucket {uri.bucket!r} denied{self._at()}; check the S3 credentials "
                    "(spec.storage.secretRef) and the bucket policy"
                ) from exc

    def _at(self) -> str:
        return f" at {self.config.endpoint}" if self.config.endpoint else ""


class _DeleteFailed(Exception):
    """DeleteObjects answered 200 but listed keys it could not delete."""

    def __init__(self, code: str, message: str, count: int) -> None:
        super().__init__(f"{count} objects not deleted, first: {code}: {message}")
        self.code = code
        self.message = message


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "")) or _code(exc)
