"""The DeepSpeed configuration of a run, decided here once.

:func:`config_from_spec` resolves everything the spec decides (ZeRO stage and offloading, batch
geometry, gradient clipping, gathering ZeRO-3 shards on save) into the run plan, with the user's
extra ``deepspeed.config`` merged over it. Only what the hardware decides is left for the runtime,
which applies it through :func:`config_for_hardware`: the precision (bf16 exists on some GPUs only) and
what CPU offloading needs on a node with or without a CUDA device.
"""

from __future__ import annotations

import copy
from typing import Any, Final, Literal

from kubetune.api.spec import DeepSpeed, Hyperparameters, Precision

Accelerator = Literal["cuda", "cpu"]

_OFFLOADS: Final = ("offload_optimizer", "offload_param")
_OFFLOAD_DEVICES: Final = ("cpu", "nvme")
# The Trainer's AdamW settings ("auto": taken from the hyperparameters) for DeepSpeed's CPU Adam.
_ADAM_DEFAULTS: Final = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}


def config_from_spec(deepspeed: DeepSpeed, hyperparameters: Hyperparameters) -> dict[str, Any]:
    """The DeepSpeed config a run plan carries: ZeRO settings and batch geometry from the spec,
    the user's extra ``config`` merged over them. Precision is the runtime's (:func:`config_for_hardware`)."""
    zero: dict[str, Any] = {"stage": deepspeed.zero_stage}
    if deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if deepspeed.zero_stage >= 2:
        zero["overlap_comm"] = False
        zero["contiguous_gradients"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hyperparameters.per_device_batch_size,
        "gradient_accumulation_steps": hyperparameters.gradient_accumulation_steps,
        "gradient_clipping": hyperparameters.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(config, deepspeed.config or {})
    merged_zero = merged.get("zero_optimization")
    if isinstance(merged_zero, dict) and merged_zero.get("stage") == 3:
        # <output>/model must be a plain, loadable checkpoint: gather the shards when saving,
        # whatever stage the extra config chose.
        merged_zero["stage3_gather_16bit_weights_on_model_save"] = True
    return merged


def config_for_hardware(
    config: dict[str, Any], *, precision: Precision, accelerator: Accelerator
) -> dict[str, Any]:
    """A plan's DeepSpeed config completed with what only the node knows: the resolved
    ``precision`` and, with CPU offloading, the optimizer that fits the accelerator."""
    resolved = copy.deepcopy(config)
    zero = resolved.setdefault("zero_optimization", {"stage": 0})
    # Extra keys the user set (loss scaling, ...) stay; "enabled" follows the resolved precision.
    resolved["bf16"] = {**resolved.get("bf16", {}), "enabled": precision == Precision.bf16}
    resolved["fp16"] = {**resolved.get("fp16", {}), "enabled": precision == Precision.fp16}
    if offloads(zero):
        if accelerator == "cpu":
            # On a CPU-only node the states already live in host memory (nothing to pin for a
            # device copy), and DeepSpeed's CPU Adam would be compiled at start-up (minutes): the
            # Trainer's torch AdamW steps instead.
            resolved["zero_force_ds_cpu_optimizer"] = False
            for key in _OFFLOADS:
                if isinstance(zero.get(key), dict):
                    zero[key].pop("pin_memory", None)
        else:
            resolved.setdefault("optimizer", {"type": "AdamW", "params": dict(_ADAM_DEFAULTS)})
    return resolved


def offloads(zero: dict[str, Any]) -> bool:
    """Whether a ``zero_optimization`` section keeps optimizer states or parameters off the GPU."""
    return any(
        isinstance(zero.get(key), dict) and zero[key].get("device", "none") in _OFFLOAD_DEVICES
        for key in _OFFLOADS
    )


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
