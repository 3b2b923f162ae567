"""The torch-free core stays torch-free: the operator image and `kubetune validate` never pay
for (or need) the trainer stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "peft", "llmcompressor", "kopf", "boto3")


@pytest.mark.parametrize(
    "module",
    [
        "kubetune.api",
        "kubetune.api.crd",
        "kubetune.api.validation",
        "kubetune.run.plan",
        "kubetune.run.workloads",
        "kubetune.cli",
    ],
)
def test_core_module_imports_nothing_heavy(module: str) -> None:
    # A fresh interpreter: this test process has long imported everything.
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=ROOT
    )
    assert result.stdout.strip() == ""


def test_validate_command_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from kubetune.cli import main\n"
        "assert main(['validate', '--quiet', 'manifests/examples/quickstart.yaml']) == 0\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=ROOT
    )
    assert result.stdout.strip() == ""
