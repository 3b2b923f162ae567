"""What this fine-tuning run used, measured at its end on rank 0 (:mod:`kubetune.run.usage` does
the arithmetic): ``metrics.json``'s ``usage`` block and ``status.usage``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kubetune.run.plan import RunPlan
from kubetune.run.usage import usage_block

if TYPE_CHECKING:
    from transformers import Trainer


def count_parameters(model: Any) -> int:
    """All parameters of the model, also under ZeRO-3 (whose partitioned tensors are empty
    locally and carry their full size as ``ds_numel``)."""
    return int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))


def device_name(accelerator: str) -> str | None:
    if accelerator != "cuda":
        return None
    import torch

    return str(torch.cuda.get_device_name())


def tokens_this_session(trainer: Trainer) -> int | None:
    """Input tokens (padding excluded) this process's session trained on, all ranks together:
    what the Trainer counts with ``include_num_input_tokens_seen``, less what a resumed
    checkpoint had already counted; ``None`` where it does not count (DPO's paired inputs)."""
    if trainer.args.include_num_input_tokens_seen in ("no", False):
        return None
    seen = int(trainer.state.num_input_tokens_seen or 0)
    return seen - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)


def measure(
    plan: RunPlan,
    trainer: Trainer,
    *,
    phases_s: dict[str, float],
    train_seconds: float,
    process_started: float,
    accelerator: str,
) -> dict[str, Any]:
    """The usage block of this run, from the process's start until now."""
    return usage_block(
        phases_s=phases_s,
        wall_seconds=time.time() - process_started,
        pods=plan.world.workers,
        gpus_per_pod=plan.world.gpus_per_worker,
        cpus_per_pod=plan.world.cpus_per_worker,
        tokens=tokens_this_session(trainer),
        train_seconds=train_seconds,
        parameters=count_parameters(trainer.model),
        device_name=device_name(accelerator),
        # Measured by kubetune's MeasuredTrainer (trl's DPOTrainer does not measure it).
        padding_share=getattr(trainer, "padding_share", None),
    )


def measure_compression(
    plan: RunPlan, *, phases_s: dict[str, float], parameters: int, accelerator: str
) -> dict[str, Any]:
    """The usage block of a compression (no training tokens: no rate, no MFU), from the process's
    start until now."""
    import psutil

    return usage_block(
        phases_s=phases_s,
        wall_seconds=time.time() - psutil.Process().create_time(),
        pods=plan.world.workers,
        gpus_per_pod=plan.world.gpus_per_worker,
        cpus_per_pod=plan.world.cpus_per_worker,
        tokens=None,
        train_seconds=0.0,
        parameters=parameters,
        device_name=device_name(accelerator),
    )


def status_usage(block: dict[str, Any]) -> dict[str, Any]:
    """``status.usage`` (wire form) from the usage block."""
    from kubetune.api.status import UsageStatus

    wire: dict[str, Any] = UsageStatus(
        wall_seconds=block.get("wall_seconds"),
        wall_seconds_total=block.get("wall_seconds_total"),
        gpu_hours_requested=block.get("gpu_hours_requested"),
        cpu_core_hours_requested=block.get("cpu_core_hours_requested"),
        tokens_per_second=block.get("tokens_per_second"),
        model_flops_utilization=block.get("mfu"),
        note=block.get("mfu_note"),
    ).to_wire()
    return wire
