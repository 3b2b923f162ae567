"""The one rule for tracking failures: a tracking server that is down never fails training.

Each call to the server is retried a few times with a short backoff when the failure may pass
(no connection, a timeout, HTTP 5xx or 429); a refusal (any other 4xx: bad credentials, a name the
server rejects) is not retried. After the first call that still fails, tracking is off for the
rest of the run: one warning in the log, and ``on_degraded`` learns why, so the job's status can
say so. Training never waits on a dead server for more than one call's retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

ATTEMPTS: Final = 3
BACKOFF_S: Final = 0.5  # then 1 s: a restarting server gets a moment, a dead one costs ~2 s
MAX_MESSAGE: Final = 300
_RETRIABLE_STATUS: Final = frozenset({429})


def retriable(error: BaseException) -> bool:
    """Whether ``error`` may pass: MLflow reports a refused connection or timeout as a 500
    (INTERNAL_ERROR) of its own, the server its overload as 5xx or 429; a 4xx is a refusal."""
    status = getattr(error, "get_http_status_code", None)
    if callable(status):
        code = status()
        return isinstance(code, int) and (code >= 500 or code in _RETRIABLE_STATUS)
    return isinstance(error, OSError | TimeoutError | ConnectionError) or "requests" in type(error).__module__


def describe(error: BaseException) -> str:
    """One line, bounded: MLflow's messages hold the URL (never credentials: the API refuses
    them in the URI, and the client sends them as headers) and sometimes a whole traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


class Guard:
    """Runs calls to the tracking server under the rule above; ``failure`` says why it is off."""

    def __init__(
        self,
        on_degraded: Callable[[str], None],
        *,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._on_degraded = on_degraded
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._sleep = sleep
        self.failure: str | None = None

    @property
    def active(self) -> bool:
        return self.failure is None

    def call(self, what: str, action: Callable[[], T]) -> T | None:
        """``action()``, or None once tracking is off (also when this call turned it off)."""
        if self.failure is not None:
            return None
        for attempt in range(1, self._attempts + 1):
            try:
                return action()
            except Exception as e:  # whatever the client raises, training goes on
                if attempt < self._attempts and retriable(e):
                    log.debug("MLflow: %s failed (attempt %d), retrying: %s", what, attempt, describe(e))
                    self._sleep(self._backoff_s * 2 ** (attempt - 1))
                    continue
                self._degrade(f"{what} failed: {describe(e)}")
                return None
        return None  # unreachable: the last attempt returns or degrades

    def _degrade(self, message: str) -> None:
        self.failure = message
        log.warning("MLflow tracking is off for the rest of this run (training goes on): %s", message)
        try:
            self._on_degraded(message)
        except Exception as e:  # reporting is best effort as well
            log.warning("cannot report the tracking degradation: %s", describe(e))
