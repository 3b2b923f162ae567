"""The usage arithmetic: requested resource-hours, tokens per second, model FLOPs utilisation
from a table of device peaks (unknown devices get none, and say so)."""

from __future__ import annotations

import pytest

from kubetune.run.usage import (
    MFU_NO_RATE,
    MFU_UNKNOWN_DEVICE,
    cpu_cores,
    model_flops_utilisation,
    peak_flops,
    resource_hours,
    tokens_per_second,
    usage_block,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("per_pod", "pods", "seconds", "hours"),
    [(8, 2, 1800, 8.0), (0, 4, 3600, 0.0), (2.5, 1, 7200, 5.0), (1, 3, 0, 0.0)],
)
def test_requested_hours_are_requests_times_pods_times_wall_time(
    per_pod: float, pods: int, seconds: float, hours: float
) -> None:
    assert resource_hours(per_pod, pods, seconds) == pytest.approx(hours)


def test_negative_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        resource_hours(-1, 1, 1)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L4", 121e12),
        ("Some Future Accelerator", None),
        (None, None),
    ],
)
def test_peak_flops_come_from_the_table_by_device_name(name: str | None, peak: float | None) -> None:
    assert peak_flops(name) == peak


def test_mfu_is_six_flops_per_parameter_per_token_over_the_devices_peak() -> None:
    # 1e9 parameters at 10,000 tokens/s on 2 devices of 100 TFLOP/s: 6e13 / 2e14.
    assert model_flops_utilisation(10**9, 10_000, 2, 100e12) == pytest.approx(0.3)


def test_tokens_per_second_needs_time() -> None:
    assert tokens_per_second(1000, 4) == 250
    assert tokens_per_second(1000, 0) is None


def test_a_gpu_run_on_a_known_device_reports_mfu() -> None:
    block = usage_block(
        phases_s={"download": 60, "train": 3000, "save": 500},
        wall_seconds=3600,
        pods=2,
        gpus_per_pod=4,
        cpus_per_pod=16,
        tokens=3.0e7,
        train_seconds=3000,
        parameters=7 * 10**9,
        device_name="NVIDIA H100 80GB HBM3",
    )

    assert block["wall_seconds"] == {"download": 60, "train": 3000, "save": 500}
    assert block["wall_seconds_total"] == 3600
    assert block["gpu_hours_requested"] == pytest.approx(8.0)
    assert block["cpu_core_hours_requested"] == pytest.approx(32.0)
    assert block["tokens_per_second"] == pytest.approx(10_000)
    assert block["mfu"] == pytest.approx(6 * 7e9 * 1e4 / (8 * 989e12))


def test_an_unknown_device_gets_no_mfu_and_says_why() -> None:
    block = usage_block(
        phases_s={"train": 10},
        wall_seconds=12,
        pods=1,
        gpus_per_pod=1,
        cpus_per_pod=None,
        tokens=100,
        train_seconds=10,
        parameters=10,
        device_name="Mystery GPU",
    )
    assert block["mfu"] is None
    assert block["mfu_note"] == MFU_UNKNOWN_DEVICE
    assert block["cpu_core_hours_requested"] is None


def test_a_cpu_run_has_no_gpu_hours_and_no_mfu() -> None:
    block = usage_block(
        phases_s={"train": 10},
        wall_seconds=12,
        pods=2,
        gpus_per_pod=0,
        cpus_per_pod=2,
        tokens=100,
        train_seconds=10,
        parameters=10,
        device_name=None,
    )
    assert block["gpu_hours_requested"] == 0
    assert "mfu" not in block


@pytest.mark.parametrize(
    ("quantity", "cores"), [(4, 4.0), ("500m", 0.5), ("1.5", 1.5), ("2k", None), (-1, None), (None, None)]
)
def test_cpu_requests_are_read_as_cores(quantity: str | int | None, cores: float | None) -> None:
    assert cpu_cores(quantity) == cores


def test_a_run_whose_tokens_were_not_counted_has_no_rate_and_no_mfu() -> None:
    block = usage_block(
        phases_s={"train": 10},
        wall_seconds=12,
        pods=1,
        gpus_per_pod=1,
        cpus_per_pod=None,
        tokens=None,
        train_seconds=10,
        parameters=10,
        device_name="NVIDIA H200",
    )
    assert block["tokens_per_second"] is None
    assert block["mfu"] is None
    assert block["mfu_note"] == MFU_NO_RATE
