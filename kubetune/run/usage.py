"""What a run used and how well: the arithmetic behind ``metrics.json``'s ``usage`` block.

Pure functions, no torch: the runtime passes in what it measured (wall seconds, tokens,
parameters, its device's name).

- Requested resource-hours are requests x wall time x pods: what the job held, used or not.
- Model FLOPs utilisation (MFU, as in PaLM's appendix B) is ``6 x parameters x tokens/s`` over
  ``devices x peak FLOP/s``: 6 FLOPs per parameter per token for a forward and backward pass,
  attention's own FLOPs left out. The peak is the device's dense bf16/fp16 tensor throughput from
  :data:`PEAK_FLOPS`; a device not in the table gets no MFU (and the block says so), never a guess.
"""

from __future__ import annotations

from typing import Any, Final

SECONDS_PER_HOUR: Final = 3600.0
FLOPS_PER_PARAMETER_PER_TOKEN: Final = 6
# Dense (no sparsity) bf16 tensor-core peak FLOP/s, from the vendors' data sheets, keyed by a
# substring of torch.cuda.get_device_name(); the more specific names first.
PEAK_FLOPS: Final[tuple[tuple[str, float], ...]] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
)
MFU_UNKNOWN_DEVICE: Final = "no peak FLOP/s known for this device: model FLOPs utilisation omitted"
MFU_NO_RATE: Final = "no tokens per second measured: model FLOPs utilisation omitted"


def cpu_cores(quantity: str | int | float | None) -> float | None:
    """CPU cores of a Kubernetes quantity (``4``, ``"500m"``, ``"1.5"``); ``None`` for no request
    or a form no one uses for CPU (``"2k"``) or a negative one: the core-hours are then omitted,
    not guessed."""
    if quantity is None:
        return None
    text = str(quantity)
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    # A negative request is refused where children are rendered, with the field's name.
    return cores if cores >= 0 else None


def peak_flops(device_name: str | None) -> float | None:
    """The device's peak FLOP/s from :data:`PEAK_FLOPS`, or ``None`` when it is not listed."""
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_FLOPS if key in device_name), None)


def resource_hours(per_pod: float, pods: int, wall_seconds: float) -> float:
    """Requested resource-hours: ``per_pod`` units (GPUs, CPU cores) held by ``pods`` pods for
    ``wall_seconds``."""
    if per_pod < 0 or pods < 0 or wall_seconds < 0:
        raise ValueError(f"requests, pods and time must not be negative: {per_pod}, {pods}, {wall_seconds}")
    return per_pod * pods * wall_seconds / SECONDS_PER_HOUR


def tokens_per_second(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and tokens >= 0 else None


def model_flops_utilisation(
    parameters: int, tokens_per_s: float, devices: int, peak_per_device: float
) -> float:
    """MFU in [0, 1] (more only if the peak is wrong): achieved model FLOP/s over the devices' peak."""
    if devices <= 0 or peak_per_device <= 0:
        raise ValueError(f"devices and peak FLOP/s must be positive: {devices}, {peak_per_device}")
    return FLOPS_PER_PARAMETER_PER_TOKEN * parameters * tokens_per_s / (devices * peak_per_device)


def usage_block(
    *,
    phases_s: dict[str, float],
    wall_seconds: float,
    pods: int,
    gpus_per_pod: int,
    cpus_per_pod: float | None,
    tokens: float | None,
    train_seconds: float,
    parameters: int,
    device_name: str | None,
    padding_share: float | None = None,
) -> dict[str, Any]:
    """``metrics.json``'s ``usage``: wall time per phase and of the whole process
    (``wall_seconds``), the GPU- and CPU core-hours the pods requested for it, tokens per second
    of training (and the padding share of its batches, where measured) and, on GPUs with a
    known peak, MFU."""
    wall = wall_seconds
    block: dict[str, Any] = {
        "wall_seconds": {name: round(seconds, 3) for name, seconds in phases_s.items()},
        "wall_seconds_total": round(wall, 3),
        "pods": pods,
        "gpu_hours_requested": round(resource_hours(gpus_per_pod, pods, wall), 6),
        "cpu_core_hours_requested": (
            round(resource_hours(cpus_per_pod, pods, wall), 6) if cpus_per_pod is not None else None
        ),
        "train_tokens": int(tokens) if tokens is not None else None,
        "tokens_per_second": tokens_per_second(tokens, train_seconds) if tokens is not None else None,
        "parameters": parameters,
    }
    if padding_share is not None:
        # Share of the training batches' token slots that were padding (0 when packed).
        block["padding_share"] = padding_share
    rate = block["tokens_per_second"]
    if gpus_per_pod > 0:
        block["device"] = device_name
        peak = peak_flops(device_name)
        if peak is None or rate is None:
            block["mfu"] = None
            block["mfu_note"] = MFU_UNKNOWN_DEVICE if peak is None else MFU_NO_RATE
        else:
            block["peak_flops_per_device"] = peak
            block["mfu"] = model_flops_utilisation(parameters, rate, pods * gpus_per_pod, peak)
    return block
