"""Each runtime process's own output, kept: a copy of everything it writes to stdout and stderr,
uploaded to ``<output>/logs/attempt-<N>/`` (:mod:`kubetune.run.logs`) when it ends, whether it
succeeded or failed.

The copy is taken at the file-descriptor level, so what libraries, DeepSpeed's C++ code and
subprocesses print is in it too; every byte still goes on to the original stdout or stderr, so
``kubectl logs`` and local mode's log files see exactly what they saw before. On disk the copy is
bounded (two halves of at most :data:`~kubetune.run.logs.MAX_LOG_BYTES`, the older one dropped
when the newer fills), and what is uploaded is bounded again and redacted of credential values.

Uploading never fails the run and never writes where the job may not: it goes through the job's
claim on its output (:func:`kubetune.ownership.claim_output`), so a prefix of another job's gets
nothing, and is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from kubetune.run import logs
from kubetune.run.workloads import ENV_ATTEMPT, ENV_PLAN

log = logging.getLogger("kubetune.trainer.logs")
_CHUNK: Final = 65536
# How long the end of a run waits for the copy to drain (a subprocess that inherited stdout may
# keep the pipe open past it).
_DRAIN_SECONDS: Final = 5.0
_PID_SEPARATOR: Final = "-"
_KILLED_NOTE: Final = (
    "\n[kubetune] the process ended without keeping its log (killed); kept by its launcher\n"
)


class BoundedFile:
    """An append-only file of at most ``limit`` newest bytes, kept as two halves."""

    def __init__(self, path: Path, limit: int = logs.MAX_LOG_BYTES, *, existing: bool = False) -> None:
        """A new, empty copy at ``path``; with ``existing``, the copy a process that is gone left there."""
        self.path = path
        self.older = path.with_name(path.name + ".1")
        self.half = max(1, limit // 2)
        self.limit = limit
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab" if existing else "wb")
        self._size = path.stat().st_size if existing else 0
        self._dropped = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._size + len(data) > self.half and self._size > 0:
                self._file.close()
                if self.older.exists():
                    self._dropped += self.older.stat().st_size
                os.replace(self.path, self.older)
                self._file = self.path.open("wb")
                self._size = 0
            self._file.write(data)
            self._file.flush()
            self._size += len(data)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.older.unlink(missing_ok=True)

    def contents(self) -> bytes:
        """What is kept, bounded to ``limit`` (saying so when anything was dropped)."""
        with self._lock:
            if not self._file.closed:
                self._file.flush()
            older = self.older.read_bytes() if self.older.exists() else b""
            data = older + self.path.read_bytes()
        kept = logs.bounded(data, self.limit)
        if self._dropped and not kept.startswith(logs.TRUNCATED_MARKER.encode()):
            marker = f"{logs.TRUNCATED_MARKER} the first {self._dropped} bytes were dropped\n"
            kept = marker.encode() + kept
        return kept


class _Tee:
    """fd ``target`` (1 or 2) rerouted through a pipe: each chunk goes to the original and to the sink."""

    def __init__(self, target: int, sink: BoundedFile) -> None:
        self.target = target
        self.original = os.dup(target)
        read, write = os.pipe()
        os.dup2(write, target)
        os.close(write)
        self._read = read
        self._sink = sink
        self._thread = threading.Thread(target=self._pump, name=f"tee-fd{target}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self._read, _CHUNK)
            except OSError:
                return
            if not chunk:
                return
            # Nobody reading the original any more is no reason to stop keeping the copy.
            with contextlib.suppress(OSError):
                os.write(self.original, chunk)
            self._sink.write(chunk)

    def restore(self) -> None:
        os.dup2(self.original, self.target)  # closes the pipe's last write end held by this process
        self._thread.join(_DRAIN_SECONDS)
        if not self._thread.is_alive():
            os.close(self._read)
        os.close(self.original)


@contextmanager
def tee_output(path: Path, limit: int = logs.MAX_LOG_BYTES) -> Iterator[BoundedFile]:
    """Copy this process's stdout and stderr into ``path`` (bounded) while they still go where
    they went."""
    sys.stdout.flush()
    sys.stderr.flush()
    sink = BoundedFile(path, limit)
    tees = [_Tee(1, sink), _Tee(2, sink)]
    try:
        yield sink
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for tee in tees:
            tee.restore()
        sink.close()


def capture_dir() -> Path:
    """Where a process's copy lives while it runs: node-local scratch, shared by the processes of
    one pod, so the launcher finds the copies of workers that were killed."""
    from kubetune.trainer.runtime import scratch_root

    return scratch_root() / "process-logs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def keep_leftovers(plan_path: Path) -> list[str]:
    """Upload the copies of processes that died without uploading their own (a SIGKILL: the
    kernel's OOM killer, a node's eviction) and remove them; the launcher calls this when its
    workers failed. Returns the URIs written."""
    folder = capture_dir()
    if not folder.is_dir():
        return []
    written = []
    for path in sorted(folder.iterdir()):
        pid, sep, name = path.name.partition(_PID_SEPARATOR)
        if not sep or not pid.isdigit() or name.endswith(".1") or _alive(int(pid)):
            continue
        sink = BoundedFile(path, existing=True)
        uri = upload(plan_path, name, sink.contents() + _KILLED_NOTE.encode())
        sink.remove()
        if uri is not None:
            written.append(uri)
    return written


def attempt_from_env() -> int:
    raw = os.environ.get(ENV_ATTEMPT, "0")
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def rank_from_env() -> int | None:
    """The global rank under torchrun, else ``None``."""
    raw = os.environ.get("RANK")
    return int(raw) if raw is not None and raw.isdigit() else None


def upload(plan_path: Path, name: str, data: bytes) -> str | None:
    """Upload one process's kept log to its attempt's folder; returns the URI, or ``None`` when
    it could not be (logged, never raised: a log is never a reason for a run to fail)."""
    from kubetune.ownership import claim_output, plan_inputs
    from kubetune.run.plan import RunPlan
    from kubetune.storage import open_store
    from kubetune.trainer.outputs import output_owner
    from kubetune.trainer.runtime import storage_config

    try:
        plan = RunPlan.from_file(plan_path)
        store = open_store(plan.output_uri, storage_config(plan))
        # The same claim every writer makes first: a prefix that is not this job's gets nothing.
        claim_output(store, plan.output_uri, output_owner(plan), plan_inputs(plan))
        uri = f"{logs.attempt_logs_uri(plan.output_uri, attempt_from_env())}/{name}"
        store.write_bytes(uri, logs.redact(data, logs.secret_values(os.environ)))
    except Exception as e:
        log.warning("could not keep this process's log (%s): %s", name, e)
        return None
    log.debug("kept this process's log at %s", uri)
    return uri


def plan_argument(argv: Sequence[str]) -> str | None:
    """The ``--plan`` a runtime was given (``--plan P`` or ``--plan=P``), else ``KUBETUNE_PLAN``."""
    for i, arg in enumerate(argv):
        if arg == "--plan" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--plan="):
            return arg.removeprefix("--plan=")
    return os.environ.get(ENV_PLAN)


@contextmanager
def kept_logs(command: str, argv: Sequence[str]) -> Iterator[None]:
    """Around a runtime command: tee its output, upload it when the command ends (also on failure).

    Only where a plan says where the output is; without one (``--help``, a bad command line) the
    command runs untouched and keeps nothing.
    """
    plan = plan_argument(argv)
    if not plan or not Path(plan).is_file():
        yield
        return
    name = logs.process_log_name(command, rank_from_env())
    path = capture_dir() / f"{os.getpid()}{_PID_SEPARATOR}{name}"
    sink: BoundedFile | None = None
    try:
        with tee_output(path) as sink:
            yield
    finally:
        # After the output is restored: the upload's own warnings go to the pod's log only.
        if sink is not None:
            upload(Path(plan), name, sink.contents())
            sink.remove()
