"""Local mode's process handling: a terminated ``kubetune run`` leaves no trainer or server behind.

The children run in sessions of their own (a terminal's Ctrl-C reaches only ``kubetune run``, which
stops them in order), so nothing but ``kubetune run`` itself can stop them; these tests send it
the signals a process manager, ``timeout`` or a closed terminal would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# A stand-in for `kubetune run`: a gang of two long "trainers" (as run_gang starts them) while a
# "server" runs in the background, all inside stop_on_termination, as kubetune.local.cli does.
DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from kubetune.local import processes
    from kubetune.local.launcher import ProcessSpec

    work = Path(sys.argv[1])
    def sleeper(name):
        code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
        return ProcessSpec(name, [sys.executable, "-c", code, str(work / f"{name}.pid")])

    try:
        with processes.stop_on_termination():
            with processes.background(sleeper("server"), work / "logs"):
                processes.run_gang([sleeper("worker-0"), sleeper("worker-1")], work / "logs", on_tick=lambda: None)
    except processes.Terminated as exc:
        sys.exit(128 + exc.signum)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose here; its parent (the driver) has exited.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_run_stops_its_trainers_and_its_server(tmp_path: Path, signum: signal.Signals) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)])
    try:
        names = ("server", "worker-0", "worker-1")
        pid_files = [tmp_path / f"{name}.pid" for name in names]
        wait_for(lambda: all(f.exists() and f.read_text() for f in pid_files), 60, "all three children")
        children = [int(f.read_text()) for f in pid_files]
        assert all(alive(pid) for pid in children)

        driver.send_signal(signum)
        assert driver.wait(timeout=60) == 128 + signum
        wait_for(lambda: not any(alive(pid) for pid in children), 30, "the children to stop")
    finally:
        if driver.poll() is None:
            driver.kill()


# A `kubetune run` stand-in whose "launchers" each start a "trainer" of their own, as torchrun
# does: the trainers are grandchildren, out of reach of a parent-death signal on the launcher.
KILLED_DRIVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from kubetune.local import processes
    from kubetune.local.launcher import ProcessSpec

    work = Path(sys.argv[1])
    processes.lock_run_dir(work / "run")
    def launcher(name):
        code = (
            "import os, subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}'); time.sleep(600)"
        )
        return ProcessSpec(name, [sys.executable, "-c", code, str(work / f"{name}.pid")])

    processes.run_gang([launcher("worker-0"), launcher("worker-1")], work / "logs", on_tick=lambda: None)
    """
)


def test_a_sigkilled_run_leaves_no_launcher_or_trainer_and_frees_its_run_dir(tmp_path: Path) -> None:
    from kubetune.local.processes import RunDirLocked, lock_run_dir, unlock_run_dir

    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(tmp_path)])
    try:
        pid_files = [tmp_path / f"worker-{i}.pid" for i in range(2)]
        wait_for(lambda: all(f.exists() and f.read_text() for f in pid_files), 60, "both launchers")
        pids = [int(pid) for f in pid_files for pid in f.read_text().split()]
        assert all(alive(pid) for pid in pids)
        with pytest.raises(RunDirLocked, match=r"in use by another kubetune run \(pid \d+\)"):
            lock_run_dir(tmp_path / "run")

        driver.kill()  # SIGKILL: no handler runs, nothing is stopped by kubetune run itself
        driver.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in pids), 60, "launchers and trainers to die")

        def free() -> bool:
            try:
                lock_run_dir(tmp_path / "run")
            except RunDirLocked:
                return False
            return True

        wait_for(free, 60, "the run directory's lock to be released")
        unlock_run_dir()
    finally:
        if driver.poll() is None:
            driver.kill()
