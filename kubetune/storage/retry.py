"""Bounded exponential backoff around whole operations.

botocore already retries single requests (throttling, 5xx, connection errors). This outer loop
covers what it does not: a multipart upload that lost a part after botocore gave up, a download
whose stream was cut after s3transfer's own attempts, a listing interrupted mid-pagination. It
restarts the whole file or call, waits with full jitter (so many pods hitting one throttled bucket
spread out), and after the last attempt raises :class:`~kubetune.errors.RetriableError`, which ends
the process with a retriable exit code so the operator can restart the gang.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kubetune.errors import KubetuneError, RetriableError

from .config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

Classifier = Callable[[Exception], Exception | None]
"""Returns ``None`` for a transient failure (retry it), else the error to raise: a translated
:class:`~kubetune.errors.KubetuneError` for a permanent failure, or the exception itself for one that
is not about storage at all (a programming error), which is re-raised unchanged."""


@dataclass(frozen=True)
class Backoff:
    attempts: int
    base_s: float
    max_s: float

    @classmethod
    def from_config(cls, config: StorageConfig) -> Backoff:
        return cls(config.backoff_attempts, config.backoff_base_s, config.backoff_max_s)

    def delay(self, attempt: int) -> float:
        """Full-jitter delay after failed attempt number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.max_s, self.base_s * 2 ** (attempt - 1)))

    def wait(self, attempt: int, what: str, error: BaseException) -> None:
        delay = self.delay(attempt)
        log.warning(
            "%s failed (attempt %d of %d): %s; retrying in %.1fs",
            what,
            attempt,
            self.attempts,
            describe(error),
            delay,
        )
        time.sleep(delay)

    def exhausted(self, what: str, error: BaseException) -> RetriableError:
        return RetriableError(f"{what} failed after {self.attempts} attempts: {describe(error)}")


def call_with_backoff(fn: Callable[[], T], *, what: str, backoff: Backoff, classify: Classifier) -> T:
    """Call ``fn`` until it succeeds, a permanent error occurs or the attempts run out.

    ``what`` names the operation and its URI; it starts every message this raises or logs.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except KubetuneError:
            raise
        except Exception as exc:
            final = classify(exc)
            if final is exc:
                raise
            if final is not None:
                raise final from exc
            if attempt >= backoff.attempts:
                raise backoff.exhausted(what, exc) from exc
            backoff.wait(attempt, what, exc)
            attempt += 1


def describe(error: BaseException) -> str:
    """A one-line description of an error for messages (never includes request headers or keys)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
