"""A new user's first screen: `kubetune quickstart-data` then `kubetune run` of the quickstart show
kubetune's own lines only, not the libraries' import-time warnings and progress bars.

Run on a pseudo-terminal, as a user runs them, so progress bars and colours render as they would.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

QUICKSTART = Path(__file__).parents[2] / "manifests" / "examples" / "quickstart.yaml"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
# The formats other tools print in: glog-style (torch's C++ and Python loggers), DeepSpeed's
# logger, Python's warnings module, tqdm bars, tracebacks, setuptools' banners.
FOREIGN = {
    "glog/torch logger": re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d"),
    "DeepSpeed logger": re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING|ERROR)\]"),
    "Python warning": re.compile(r"\b\w*(Warning|Deprecation)\b: "),
    "tqdm bar": re.compile(r"\d+%\|.*\| \d+/\d+ \["),
    "traceback": re.compile(r"^Traceback \(most recent call last\)"),
    "setuptools banner": re.compile(r"^\s*!!\s*$|\*{20,}"),
}


def on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin, stdout and stderr; its exit code and screen."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm-256color"}
    env.pop("DS_ACCELERATOR", None)
    process = subprocess.Popen(
        argv, cwd=cwd, stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    code = process.wait(timeout=60)
    return code, b"".join(chunks).decode(errors="replace")


def foreign_lines(screen: str) -> list[tuple[str, str]]:
    lines = [ANSI.sub("", piece) for line in screen.splitlines() for piece in line.split("\r")]
    return [(kind, line) for line in lines for kind, pattern in FOREIGN.items() if pattern.search(line)]


def test_the_pattern_list_recognises_what_the_libraries_print() -> None:
    screen = "\n".join(
        [
            "W1202 19:25:17.922000 26766 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum",
            "[2026-12-02 19:25:18,095] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator",
            "Writing model shards: 100%|██████████| 1/1 [00:00<00:00, 552.03it/s]",
            "/x/y.py:1: FutureWarning: `foo` is deprecated",
            "✓ model and data valid (8.0s)",
            "training ━━━━━ step 100/100 loss 0.4955 eval 5.487 174.7 samples/s",
        ]
    )

    assert [kind for kind, _ in foreign_lines(screen)] == [
        "glog/torch logger",
        "DeepSpeed logger",
        "tqdm bar",
        "Python warning",
    ]


def test_the_quickstart_shows_only_kubetunes_own_lines(tmp_path: Path) -> None:
    root = tmp_path / "quickstart"
    manifest = tmp_path / "quickstart.yaml"
    manifest.write_text(QUICKSTART.read_text().replace("/tmp/kubetune-quickstart", str(root)))
    kubetune = [sys.executable, "-m", "kubetune.cli"]

    code, data_screen = on_a_terminal([*kubetune, "quickstart-data", "--root", str(root)], tmp_path)
    assert code == 0, data_screen
    code, run_screen = on_a_terminal(
        [*kubetune, "run", str(manifest), "--workdir", str(tmp_path / "runs"), "--exit-after-serve-check"],
        tmp_path,
    )

    assert code == 0, run_screen
    assert "answer:" in run_screen
    assert foreign_lines(data_screen) == []
    assert foreign_lines(run_screen) == []
