"""Running a gang of local processes the way a Job runs its pods: all start, the first failure
stops the rest, Ctrl-C stops everyone cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kubetune.local.launcher import ProcessSpec

GRACE_SECONDS = 15.0


@dataclass
class RunningProcess:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes]
    log_path: Path

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
    with log_path.open("ab") as log:
        # A session of its own, so that stopping it also stops torchrun's children.
        popen = subprocess.Popen(
            spec.argv, env=env, cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RunningProcess(spec, popen, log_path)


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
