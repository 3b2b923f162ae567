"""How to reach object storage: endpoint, region, concurrency, multipart sizes and retry policy.

Credentials are deliberately absent: boto3's default chain reads them (environment variables
projected from ``spec.storage.secretRef``, IRSA web identity, instance profiles), so they never pass
through kubetune's own objects, logs or run plans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

from kubetune.errors import InvalidInputError

AddressingStyle = Literal["auto", "path", "virtual"]
RetryMode = Literal["standard", "adaptive"]

MiB: Final = 1024 * 1024
# S3 rejects parts smaller than 5 MiB (except the last) and larger than 5 GiB.
MIN_PART_SIZE: Final = 5 * MiB
MAX_PART_SIZE: Final = 5 * 1024 * MiB


@dataclass(frozen=True)
class StorageConfig:
    """Settings for :func:`kubetune.storage.open_store`. Build it with :meth:`from_env`."""

    endpoint: str | None = None
    """S3 endpoint URL for MinIO/Ceph/R2 (``http(s)://host:port``); ``None`` means AWS."""
    region: str | None = None
    """Signing region; ``None`` lets botocore decide (``us-east-1`` for S3 without configuration)."""
    addressing_style: AddressingStyle = "auto"
    """``auto`` uses path-style requests with a custom endpoint (what MinIO-like servers expect)."""
    max_concurrency: int = 16
    """Parallel requests per transfer call, shared between files and the parts of large files."""
    multipart_threshold: int = 16 * MiB
    """Files at least this large are transferred in parts (multipart upload, ranged GETs)."""
    multipart_chunksize: int = 16 * MiB
    """Size of each part of a multipart transfer.

    16 MiB is within the 8-16 MiB S3 recommends for parts and byte ranges; larger parts cost
    servers that buffer each part more (a moto server spent ~40 % more CPU per uploaded byte with
    32 MiB parts than with 16, bench/bench_storage.py), smaller ones mean more requests."""
    retry_mode: RetryMode = "standard"
    """botocore's per-request retry mode; ``adaptive`` adds client-side rate limiting."""
    max_attempts: int = 5
    """botocore's attempts per request (throttling, 5xx, connection errors)."""
    backoff_attempts: int = 4
    """kubetune's attempts per whole-file operation, around botocore's own retries."""
    backoff_base_s: float = 1.0
    """First backoff delay; it doubles per attempt, with full jitter."""
    backoff_max_s: float = 30.0
    """Upper bound of one backoff delay."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise InvalidInputError(
                f"storage endpoint {self.endpoint!r} must be an http:// or https:// URL, "
                "e.g. http://minio.storage:9000"
            )
        _check_choice("storage addressing_style", self.addressing_style, get_args(AddressingStyle))
        _check_choice("storage retry_mode", self.retry_mode, get_args(RetryMode))
        for name in ("max_concurrency", "max_attempts", "backoff_attempts"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"storage {name} must be at least 1, got {getattr(self, name)}")
        for name in ("multipart_threshold", "multipart_chunksize"):
            value = getattr(self, name)
            if not MIN_PART_SIZE <= value <= MAX_PART_SIZE:
                raise InvalidInputError(
                    f"storage {name} must be between 5 MiB and 5 GiB (S3 part size limits), got {value} bytes"
                )
        for name in ("backoff_base_s", "backoff_max_s", "connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"storage {name} must not be negative, got {getattr(self, name)}")

    @classmethod
    def from_env(
        cls,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> StorageConfig:
        """Settings from the standard AWS environment variables; explicit arguments win.

        ``endpoint`` and ``region`` are the run plan's ``spec.storage`` values; ``None`` (not set in
        the plan) falls back to ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, and to
        ``AWS_REGION``, then ``AWS_DEFAULT_REGION``. ``AWS_RETRY_MODE`` and ``AWS_MAX_ATTEMPTS`` are
        botocore's own variables; ``KUBETUNE_S3_ADDRESSING_STYLE`` and ``KUBETUNE_S3_MAX_CONCURRENCY``
        tune what has no AWS variable. Change anything else with :func:`dataclasses.replace`.
        """
        env = os.environ if environ is None else environ

        def first(*names: str) -> str | None:
            for name in names:
                value = env.get(name, "").strip()
                if value:
                    return value
            return None

        addressing_style = (first("KUBETUNE_S3_ADDRESSING_STYLE") or cls.addressing_style).lower()
        _check_choice("KUBETUNE_S3_ADDRESSING_STYLE", addressing_style, get_args(AddressingStyle))
        retry_mode = (first("AWS_RETRY_MODE") or cls.retry_mode).lower()
        _check_choice("AWS_RETRY_MODE", retry_mode, get_args(RetryMode))
        return cls(
            endpoint=endpoint or first("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            region=region or first("AWS_REGION", "AWS_DEFAULT_REGION"),
            addressing_style=cast(AddressingStyle, addressing_style),
            retry_mode=cast(RetryMode, retry_mode),
            max_attempts=_int_from(first("AWS_MAX_ATTEMPTS"), "AWS_MAX_ATTEMPTS", cls.max_attempts),
            max_concurrency=_int_from(
                first("KUBETUNE_S3_MAX_CONCURRENCY"), "KUBETUNE_S3_MAX_CONCURRENCY", cls.max_concurrency
            ),
        )


def _int_from(value: str | None, variable: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInputError(f"environment variable {variable}={value!r} is not an integer") from None


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"{name} {value!r} is not one of {', '.join(allowed)}")
