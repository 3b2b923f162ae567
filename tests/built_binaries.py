"""The binaries `make testbin` builds (tests/testbin/build.sh, tests/testbin/helm.sh), for tests
outside the cluster tier. A missing one fails the test, naming the command: `make test` always
builds them first, so a skip would only hide a broken build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def built_binary(name: str, script: str) -> Path:
    printed = subprocess.run(
        [
            "bash",
            str(ROOT / "tests" / "testbin" / script),
            "--print-path" if name == "helm" else "--print-dir",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = Path(printed) if name == "helm" else Path(printed) / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make testbin` (tests/testbin/{script})", pytrace=False)
    return path
