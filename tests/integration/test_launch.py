"""``kubetune.trainer launch`` is torchrun that keeps the runtimes' exit-code contract: plain
torchrun exits 1 whenever a worker fails, which would make invalid input look retriable."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.trainer.launch import gang_exit_code

WORKER = """
import os, sys, time
rank = int(os.environ["RANK"])
if rank == 1:
    sys.exit(int(sys.argv[1]))
time.sleep(60)  # the healthy peer is stopped by torchrun when rank 1 fails
"""


@pytest.mark.unit
@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], 0),
        ([2, 1], 2),  # a peer that died because rank 0 left does not hide invalid input
        ([1, 3], 3),
        ([3, 2], 2),
        ([-9, 0], 1),  # SIGKILL: retriable
        ([137], 137),
    ],
)
def test_the_gang_exit_code_prefers_the_contract_codes(codes: list[int], expected: int) -> None:
    assert gang_exit_code(codes) == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.integration
@pytest.mark.parametrize("worker_code", [2, 3, 1])
def test_a_worker_exit_code_reaches_the_pod(tmp_path: Path, worker_code: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [sys.executable, "-m", "kubetune.trainer", "launch", "--nproc_per_node=2"]
    argv += [f"--master_port={free_port()}", str(script), str(worker_code)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == worker_code, result.stderr[-2000:]
