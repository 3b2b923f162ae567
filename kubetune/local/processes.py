"""Running a gang of local processes the way a Job runs its pods: all start, the first failure
stops the rest, Ctrl-C stops everyone cleanly, and nothing outlives ``kubetune run``.

In a pod the container's processes die together; on a laptop nothing guarantees it. So every
process started here

- gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): the kernel sends it SIGTERM when
  ``kubetune run`` dies, even by SIGKILL;
- runs in a process group of its own (torchrun's trainers share it) watched by a small watchdog
  (:mod:`kubetune.local.watchdog`) that stops the whole group when ``kubetune run``'s end of a
  pipe closes -- the parent-death signal reaches only direct children, not the trainers torchrun
  starts;
- and the run directory is locked (:func:`lock_run_dir`, ``flock``) by ``kubetune run`` and, through
  an inherited descriptor, by the watchdogs, so a second ``kubetune run`` of the same job is
  refused while anything of the first is still alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.local.launcher import ProcessSpec

GRACE_SECONDS = 15.0
PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
LOCK_FILE: Final = "lock"


class RunDirLocked(RuntimeError):
    """Another ``kubetune run`` (or what is left of a killed one) is using the run directory."""


# The run directory's lock, held for the whole run; the watchdogs inherit it (see the module doc).
# One per thread: a sweep runs its parallel trials in threads, each holding its own run's lock.
_held = threading.local()


def _held_lock() -> int | None:
    fd: int | None = getattr(_held, "fd", None)
    return fd


def _die_with_parent() -> None:
    """``preexec_fn``: in the child between fork and exec, ask the kernel for SIGTERM when the
    parent dies. (Strictly: when the thread that forked it exits; processes are started from the
    main thread of ``kubetune run``, which lives as long as the run.) Linux only; elsewhere the
    watchdog alone stops the group."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def lock_run_dir(run_dir: Path) -> int:
    """Take the run directory's exclusive lock (``flock`` on ``<run_dir>/lock``) for this thread
    until :func:`unlock_run_dir`, or raise :class:`RunDirLocked` naming the holder. Returns the
    descriptor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = path.read_text().strip() or "unknown"
        raise RunDirLocked(
            f"{run_dir} is in use by another kubetune run (pid {holder}), or by the processes of a killed "
            "one that are still being stopped: two runs of one job would race each other's checkpoints. "
            "Wait for it to finish (or stop it) and run the command again"
        ) from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    if _held_lock() is not None:
        unlock_run_dir()
    _held.fd = fd
    return fd


def unlock_run_dir() -> None:
    fd = _held_lock()
    if fd is not None:
        os.close(fd)
        _held.fd = None


@dataclass
class RunningProcess:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes]
    log_path: Path
    watchdog: subprocess.Popen[bytes] | None = None

    def release(self) -> None:
        """The process has been stopped (or ended): retire its watchdog without it acting."""
        if self.watchdog is None:
            return
        self.watchdog.kill()
        self.watchdog.wait()
        if self.watchdog.stdin is not None:
            self.watchdog.stdin.close()
        self.watchdog = None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start(spec: ProcessSpec, log_dir: Path) -> RunningProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = {**os.environ, **spec.env}
    # Only the main thread: the parent-death signal follows the thread that forks (see above).
    preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
    with log_path.open("ab") as log:
        # A session of its own, so that stopping it also stops torchrun's children.
        popen = subprocess.Popen(
            spec.argv,
            env=env,
            cwd=spec.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,  # one prctl call: nothing that could deadlock after fork
        )
    return RunningProcess(spec, popen, log_path, _watch(popen.pid, log_path))


def _watch(pgid: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the watchdog of process group ``pgid`` (see :mod:`kubetune.local.watchdog`)."""
    fd = _held_lock()
    keep = (fd,) if fd is not None else ()
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune.local.watchdog", str(pgid)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=keep,
        )


def stop(processes: list[RunningProcess], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every process group, then SIGKILL what is still alive after ``grace`` seconds."""
    alive = [p for p in processes if p.popen.poll() is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in alive:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()
    for proc in processes:
        proc.release()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, delivered as an interrupt so that the same cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP stop the run as Ctrl-C does.

    Python's default for them ends the process at once, and the trainers and the server -- each in
    a session of its own (see :func:`start`), so that a terminal's Ctrl-C reaches only us -- would
    keep running, holding CPUs and the port. Must be entered from the main thread.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class GangResult:
    exit_code: int
    failed: RunningProcess | None


def run_gang(
    specs: list[ProcessSpec], log_dir: Path, *, on_tick: Callable[[], None], tick_seconds: float = 0.5
) -> GangResult:
    """Start all processes, call ``on_tick`` while they run, and return when all succeeded or
    the first one failed (the others are then stopped, as a Job with backoffLimit 0 would)."""
    processes = [start(spec, log_dir) for spec in specs]
    try:
        while True:
            on_tick()
            codes = [p.popen.poll() for p in processes]
            failed = next((p for p, c in zip(processes, codes, strict=True) if c not in (None, 0)), None)
            if failed is not None:
                stop(processes)
                on_tick()
                return GangResult(failed.popen.returncode, failed)
            if all(c == 0 for c in codes):
                stop(processes)  # all ended: this only retires their watchdogs
                on_tick()
                return GangResult(0, None)
            time.sleep(tick_seconds)
    except BaseException:
        stop(processes)
        raise


@contextlib.contextmanager
def background(spec: ProcessSpec, log_dir: Path) -> Iterator[RunningProcess]:
    """A long-running process (the server) stopped when the block exits."""
    proc = start(spec, log_dir)
    try:
        yield proc
    finally:
        stop([proc])
