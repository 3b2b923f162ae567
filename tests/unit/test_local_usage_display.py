"""Local mode's summary shows metrics.json's usage block as readable rows."""

from __future__ import annotations

import pytest

from kubetune.local.display import usage_rows
from kubetune.run.usage import MFU_UNKNOWN_DEVICE, usage_block

pytestmark = pytest.mark.unit


def test_a_gpu_runs_usage_reads_as_times_hours_throughput_and_mfu() -> None:
    block = usage_block(
        phases_s={"train": 90.0, "save": 5.0},
        wall_seconds=120.0,
        pods=1,
        gpus_per_pod=2,
        cpus_per_pod=8,
        tokens=90_000,
        train_seconds=90.0,
        parameters=10**8,
        device_name="NVIDIA A100-SXM4-80GB",
    )
    assert usage_rows(block) == {
        "time.train": "90.0s",
        "time.save": "5.0s",
        "time (process)": "120.0s",
        "GPU-hours requested": "0.0667",
        "CPU core-hours requested": "0.2667",
        "tokens/s": "1000.0",
        "MFU": "0.1%",
    }


def test_an_unknown_device_says_why_there_is_no_mfu() -> None:
    block = usage_block(
        phases_s={"train": 1.0},
        wall_seconds=2.0,
        pods=1,
        gpus_per_pod=1,
        cpus_per_pod=None,
        tokens=10,
        train_seconds=1.0,
        parameters=1,
        device_name="Mystery",
    )
    rows = usage_rows(block)
    assert rows["MFU"] == MFU_UNKNOWN_DEVICE
    assert "CPU core-hours requested" not in rows
