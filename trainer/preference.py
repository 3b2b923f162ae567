"""Preference tuning (``method.objective: dpo``) on trl's DPOTrainer, inside the fine-tuning recipe.

trl owns the loss, the reference forward passes and the batching of pairs; kubetune configures it
from the same plan as supervised fine-tuning: the Trainer's arguments from the hyperparameters
(:func:`~kubetune.trainer.training.training_arguments`, with ``DPOConfig`` as the class), the
DeepSpeed config of :mod:`kubetune.run.deepspeed`, and the same callbacks (progress, checkpoint
commits, tracking). What DPO adds is decided here:

- the **reference**: with LoRA trl switches the adapters off to get the frozen base, so no second
  model is loaded (:func:`reference_source` answers ``None``); with full fine-tuning a frozen copy
  of the base, or the model of ``dpo.referenceModel.uri``, is loaded after the training arguments
  exist, so under ZeRO-3 it is partitioned like the policy and trl wraps it in an inference engine;
- the **DPO settings**: beta and the loss type, ``maxSeqLength`` as trl's ``max_length``.

Import this module only after :func:`~kubetune.trainer.training.select_accelerator` has run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.spec import DpoSettings, MethodType, Precision
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan
from kubetune.trainer import training

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

log = logging.getLogger(__name__)


def dpo_settings(plan: RunPlan) -> DpoSettings | None:
    """The run's DPO settings (their defaults when the spec gives none); None for supervised runs."""
    return plan.method.dpo_settings if plan.method is not None else None


def reference_source(plan: RunPlan) -> str | None:
    """Where the reference model comes from: ``dpo.referenceModel.uri``, the base model's URI for
    full fine-tuning (a frozen copy), or None with LoRA (trl disables the adapters instead)."""
    settings = dpo_settings(plan)
    if settings is None:
        return None
    if settings.reference_model is not None:
        return str(settings.reference_model.uri)
    if plan.method is not None and plan.method.type == MethodType.lora:
        return None
    return plan.model_uri


def dpo_arguments(
    plan: RunPlan,
    *,
    output_dir: Path,
    precision: Precision,
    ds_config: dict[str, Any],
    has_eval: bool,
    max_length: int,
) -> DPOConfig:
    """trl's ``DPOConfig``: the Trainer's arguments of any run, plus DPO's own."""
    from trl.trainer.dpo_config import DPOConfig

    settings = dpo_settings(plan)
    assert settings is not None, "only dpo runs have DPO arguments"
    # A pod has no route to the Hub: trl's start-up ping would only wait for a timeout.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    arguments = training.training_arguments(
        plan,
        output_dir=output_dir,
        precision=precision,
        ds_config=ds_config,
        has_eval=has_eval,
        arguments_class=DPOConfig,
        overrides={
            "beta": settings.beta,
            "loss_type": [settings.loss_type.value],
            "max_length": max_length,
            # Pairs carry no labels; evaluation reports trl's DPO metrics from its own loss pass,
            # so the Trainer must not ask for logits (trl would run a second forward for them).
            "label_names": [],
            "prediction_loss_only": True,
        },
    )
    assert isinstance(arguments, DPOConfig)
    return arguments


def load_reference(model_dir: Path, source_uri: str, precision: Precision) -> torch.nn.Module:
    """The frozen reference model. Load it after the training arguments: under ZeRO-3 their
    DeepSpeed config makes ``from_pretrained`` partition it across the ranks."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=training.torch_dtype(precision))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(f"method.dpo.referenceModel {source_uri}: cannot load it: {e}") from e
    model.requires_grad_(False)
    reference: torch.nn.Module = model.train(False)  # evaluation mode: no dropout
    return reference


def dpo_trainer(
    plan: RunPlan,
    *,
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    args: TrainingArguments,
    train: datasets.Dataset,
    evaluation: datasets.Dataset | None,
    tokenizer: PreTrainedTokenizerBase,
    callbacks: Sequence[TrainerCallback],
) -> DPOTrainer:
    """trl's DPOTrainer over the plan's pairs. ``model`` is the bare base: with LoRA trl adds the
    adapters (peft settings from ``method.lora``) and keeps the base as the reference."""
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    assert isinstance(args, DPOConfig), "dpo_arguments() makes the arguments of a DPO run"
    lora = plan.method is not None and plan.method.type == MethodType.lora
    peft_config = training.lora_config(plan, model) if lora else None  # type: ignore[arg-type]
    return DPOTrainer(
        model=model,  # type: ignore[arg-type]
        ref_model=reference,  # type: ignore[arg-type]
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
