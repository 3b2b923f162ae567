"""Small helpers every runtime entry point shares: the exit-code contract, the termination
message, storage settings and the scratch directory.

The operator decides whether to retry a failed pod from its exit code alone (0 ok, 2 invalid
input, 3 storage, anything else retriable) and shows the one-line reason the runtime wrote to
``/dev/termination-log``. :func:`run_main` is what turns exceptions into both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from kubetune.api.spec import AddressingStyle
from kubetune.errors import NON_RETRIABLE_EXIT_CODES, TERMINATION_LOG, KubetuneError
from kubetune.run.plan import RunPlan
from kubetune.run.workloads import ENV_SCRATCH_DIR, ENV_TERMINATION_LOG
from kubetune.storage import StorageConfig

log = logging.getLogger("kubetune.trainer")
# The kubelet reads at most 4096 bytes of the termination message.
_TERMINATION_MESSAGE_MAX: Final = 4096
_EXIT_INTERRUPTED: Final = 130


def configure_logging(level: int = logging.INFO) -> None:
    """One readable line per record on stderr (what ``kubectl logs`` shows); idempotent."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )


def one_line(message: str, limit: int = _TERMINATION_MESSAGE_MAX) -> str:
    """``message`` collapsed to one line that fits the kubelet's termination message limit."""
    text = " ".join(message.split())
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", errors="ignore") + "..."


def write_termination_message(message: str) -> bool:
    """Write the one-line reason Kubernetes copies into the container's terminated state.

    Only where the file can be written: the kubelet creates ``/dev/termination-log`` in pods, and
    outside them (``KUBETUNE_TERMINATION_LOG`` unset) there is nothing to write to. Returns whether
    it was written.
    """
    # The override is for local mode and tests, where /dev is not writable.
    override = os.environ.get(ENV_TERMINATION_LOG)
    path = Path(override or TERMINATION_LOG)
    if override is None and not (path.exists() and os.access(path, os.W_OK)):
        return False
    try:
        path.write_text(one_line(message) + "\n", encoding="utf-8")
    except OSError as e:
        log.debug("cannot write the termination message to %s: %s", path, e)
        return False
    return True


def run_main(fn: Callable[[], int]) -> int:
    """Run an entry point under the exit-code contract and return the process exit code.

    :class:`~kubetune.errors.KubetuneError` subclasses map to their ``exit_code``. Invalid input
    (2) and storage errors (3) are the user's to fix, so they are logged as one clear line without
    a traceback; anything unexpected is logged with its traceback and exits 1 (retriable).
    """
    configure_logging()
    try:
        return fn()
    except KubetuneError as e:
        reason = f"{e.reason}: {e}"
        if e.exit_code in NON_RETRIABLE_EXIT_CODES:
            log.error("%s", reason)
        else:
            log.exception("%s", reason)
        write_termination_message(reason)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        write_termination_message("Interrupted")
        return _EXIT_INTERRUPTED
    except Exception as e:
        log.exception("unexpected error")
        write_termination_message(f"{type(e).__name__}: {e}")
        return 1


def storage_config(plan: RunPlan) -> StorageConfig:
    """Storage settings from the plan's ``spec.storage`` over the standard AWS environment."""
    config = StorageConfig.from_env(endpoint=plan.storage.endpoint, region=plan.storage.region)
    # "auto" in the spec means "not chosen": keep what the environment says.
    style = plan.storage.addressing_style
    if style == AddressingStyle.path:
        config = dataclasses.replace(config, addressing_style="path")
    elif style == AddressingStyle.virtual:
        config = dataclasses.replace(config, addressing_style="virtual")
    return config


def parse_runtime_args(argv: list[str], *, command: str, doc: str | None) -> argparse.Namespace:
    """Parse ``--plan`` and ``--scratch-dir``, the arguments the launcher gives every runtime."""
    parser = argparse.ArgumentParser(
        prog=f"python -m kubetune.trainer {command}", description=doc.split("\n")[0] if doc else None
    )
    parser.add_argument(
        "--plan", required=True, type=Path, help="run plan JSON (mounted from the job's ConfigMap)"
    )
    parser.add_argument(
        "--scratch-dir",
        type=Path,
        default=None,
        help="node-local scratch space (default: $KUBETUNE_SCRATCH_DIR or /tmp)",
    )
    return parser.parse_args(argv)


def scratch_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where a runtime may write large temporary files: ``--scratch-dir``, else
    ``KUBETUNE_SCRATCH_DIR``, else the system temporary directory (pods mount an emptyDir there,
    since their root filesystem is read-only)."""
    chosen = explicit or os.environ.get(ENV_SCRATCH_DIR) or tempfile.gettempdir()
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path
