"""Where each attempt's process logs are kept, and what is kept of them: the layout the runtimes
write, local mode mirrors and ``kubetune logs`` reads.

``<output>/logs/attempt-<N>/`` holds one file per process of attempt N: ``validate.log``,
``rank-<R>.log`` for each process of a gang (``rank-0.log`` ... in global rank order) and
``compress.log`` for a compression that runs in one process. A file keeps at most
:data:`MAX_LOG_BYTES`: the newest part (where a failure is), after one line saying how much was
dropped. Values of secret-looking environment variables never reach a kept log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from kubetune.run.artifacts import LOGS_DIR, join_uri

ATTEMPT_DIR_PREFIX: Final = "attempt-"
VALIDATE_LOG: Final = "validate.log"
COMPRESS_LOG: Final = "compress.log"
# Enough for the start-up, a long tail of progress lines and any traceback; an object per file.
MAX_LOG_BYTES: Final = 8 * 1024 * 1024
TRUNCATED_MARKER: Final = "[kubetune] log truncated:"
REDACTED: Final = "[redacted]"
# Environment variable names whose values are credentials (AWS_SECRET_ACCESS_KEY, HF_TOKEN,
# MLFLOW_TRACKING_PASSWORD, KUBETUNE_SERVE_API_KEY, ...).
_SECRET_NAME: Final = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# Shorter values would redact ordinary words and digits.
_MIN_SECRET_LENGTH: Final = 6
_ATTEMPT_DIR: Final = re.compile(rf"^{ATTEMPT_DIR_PREFIX}(\d+)$")


def attempt_logs_uri(output_uri: str, attempt: int) -> str:
    """``<output>/logs/attempt-<N>``: the logs of one attempt."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    return join_uri(output_uri, LOGS_DIR, f"{ATTEMPT_DIR_PREFIX}{attempt}")


def rank_log(rank: int) -> str:
    return f"rank-{rank}.log"


def process_log_name(command: str, rank: int | None) -> str:
    """The file name of one process's log: ``validate.log``, ``rank-<R>.log`` for a process of a
    torchrun gang (``rank`` is its global rank), ``compress.log`` for a one-process compression."""
    if command == "validate":
        return VALIDATE_LOG
    if rank is not None:
        return rank_log(rank)
    if command == "compress":
        return COMPRESS_LOG
    return f"{command}.log"


def attempts_in(names: Iterable[str]) -> list[int]:
    """The attempt numbers among the entry names (or keys) under ``<output>/logs``, ascending."""
    found = set()
    for name in names:
        first = name.strip("/").split("/", 1)[0]
        match = _ATTEMPT_DIR.match(first)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)


def bounded(data: bytes, limit: int = MAX_LOG_BYTES) -> bytes:
    """``data`` if it fits in ``limit`` bytes, else its newest part (from a line start where one
    is near) after a line saying how many bytes were dropped."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, not {limit}")
    if len(data) <= limit:
        return data
    tail = data[len(data) - limit :]
    newline = tail.find(b"\n")
    if 0 <= newline < len(tail) // 2:
        tail = tail[newline + 1 :]
    dropped = len(data) - len(tail)
    marker = f"{TRUNCATED_MARKER} the first {dropped} bytes were dropped, the newest {len(tail)} kept\n"
    return marker.encode() + tail


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of the environment's credential variables, longest first (so a secret that
    contains another is redacted whole)."""
    values = {v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(data: bytes, secrets: Iterable[str]) -> bytes:
    """``data`` with every occurrence of each secret replaced by :data:`REDACTED`."""
    for secret in secrets:
        data = data.replace(secret.encode(), REDACTED.encode())
    return data
