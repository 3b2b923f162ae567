"""Stops a local run's process group when ``kubetune run`` dies, however it dies.

``python -m kubetune.local.watchdog PGID`` is started by :func:`kubetune.local.processes.start`
next to every process it launches, with the write end of a pipe kept by ``kubetune run`` as its
stdin. The kernel closes that pipe when ``kubetune run`` exits for any reason, SIGKILL included;
the watchdog then sends SIGTERM to the process group (the launcher and the trainers torchrun
started, which a parent-death signal on the launcher alone cannot reach), SIGKILL after a grace
period, and waits until the group is empty. It inherits the run directory's lock
(:func:`kubetune.local.processes.lock_run_dir`), so a rerun is refused until no survivor is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Final

GRACE_SECONDS: Final = 10.0
GONE_TIMEOUT_SECONDS: Final = 60.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the group, SIGKILL it after ``grace`` seconds, then wait for it to be empty."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    pgid = int(argv[0])
    # Ctrl-C in the terminal must not end the watchdog before the run has stopped its children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocks until kubetune run closes the pipe: on purpose (it is done) or by dying.
    sys.stdin.buffer.read()
    stop_group(pgid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
