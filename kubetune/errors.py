"""The runtimes' exit-code contract, shared by the runtimes (which raise) and the operator
(which reads exit codes and decides whether to retry).

0: success. 2: invalid input (spec, data, model files) — never retried. 3: storage access denied
or object missing — never retried. Anything else: retriable (node loss, OOM, preemption...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pydantic import ValidationError

EXIT_OK: Final = 0
EXIT_INVALID_INPUT: Final = 2
EXIT_STORAGE: Final = 3
NON_RETRIABLE_EXIT_CODES: Final = (EXIT_INVALID_INPUT, EXIT_STORAGE)

# Where the runtime writes its one-line reason; Kubernetes copies it into the container's
# terminated state (terminationMessagePath), which is how the operator learns why a pod failed.
TERMINATION_LOG: Final = "/dev/termination-log"


class KubetuneError(Exception):
    """Base class for errors with a defined exit code."""

    exit_code: int = 1
    reason: str = "Error"


class InvalidInputError(KubetuneError):
    """The spec, the data or the model is unusable as given; retrying cannot help."""

    exit_code = EXIT_INVALID_INPUT
    reason = "InvalidInput"


class StorageAccessError(KubetuneError):
    """An object is missing or access to it is denied; retrying cannot help."""

    exit_code = EXIT_STORAGE
    reason = "StorageError"


class RetriableError(KubetuneError):
    """A transient failure (network, throttling, lost peer); the operator may restart the gang."""

    exit_code = 1
    reason = "TransientError"


def describe_validation_error(
    error: ValidationError,
    *,
    limit: int | None = None,
    where: Callable[[tuple[int | str, ...]], str] | None = None,
    empty: str = "(root)",
) -> str:
    """One line for a pydantic ValidationError: ``field.path: message; ...``, the first ``limit``
    problems. ``where`` turns an error's location into the name a user knows (an environment
    variable, a camelCase field path); by default the dotted location."""
    items = error.errors()
    shown = items if limit is None else items[:limit]
    parts = []
    for item in shown:
        loc = tuple(item["loc"])
        name = where(loc) if where is not None else ".".join(str(p) for p in loc)
        parts.append(f"{name or empty}: {item['msg']}")
    if len(shown) < len(items):
        parts.append(f"and {len(items) - len(shown)} more")
    return "; ".join(parts)
