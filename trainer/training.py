"""Building blocks of the fine-tuning recipe: the process group, precision, the DeepSpeed config,
the Trainer's arguments, the model (full or LoRA) and the evaluation metrics.

Why the transformers Trainer with its DeepSpeed integration rather than a lean DeepSpeed loop: it
already does what a loop would re-implement (LR schedules, gradient accumulation, evaluation,
logging to TensorBoard, saving and *resuming* optimizer, scheduler, RNG and data position), and
DeepSpeed is switched on by configuration alone. kubetune only adds what is its own: the
object-storage checkpoint protocol and the outputs, both as callbacks and plain functions
around ``trainer.train()``.

Nothing here touches object storage; :mod:`kubetune.trainer.finetune` composes these pieces.
Import this module only after :func:`select_accelerator` has run, because DeepSpeed picks its
accelerator once, on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubetune.api.spec import LRScheduler, MethodType, Precision, TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.deepspeed import Accelerator, config_for_hardware
from kubetune.run.plan import RunPlan
from kubetune.run.workloads import ENV_DS_ACCELERATOR

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import EvalPrediction, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

log = logging.getLogger(__name__)

# torchrun's variables; a process started without torchrun gets a one-process world with these.
_STANDALONE_ENV: Final = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
# DeepSpeed's shared-memory all-reduce only speeds up *inference* collectives on CPU
# (TorchBackend.inference_all_reduce), which training never calls, yet building it compiles a
# C++ extension for a minute or more in every fresh container.
_SHM_COMM_OP: Final = "deepspeed_shm_comm"


# --- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in the gang (torchrun's view, one node per pod)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    accelerator: Accelerator

    @property
    def is_main(self) -> bool:
        """The one process that writes shared outputs (model, metrics, commit markers)."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """One process per node: it moves the node's files to and from object storage."""
        return self.local_rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def select_accelerator() -> Accelerator:
    """``cuda`` when a GPU is visible and DeepSpeed was not told otherwise, else ``cpu`` (and then
    ``DS_ACCELERATOR=cpu``, so DeepSpeed never probes for GPUs). Call before importing DeepSpeed."""
    import torch

    if torch.cuda.is_available() and os.environ.get(ENV_DS_ACCELERATOR, "cuda") == "cuda":
        return "cuda"
    os.environ[ENV_DS_ACCELERATOR] = "cpu"
    return "cpu"


def standalone_defaults() -> None:
    """Let ``python -m kubetune.trainer finetune`` run without torchrun as a world of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for name in _STANDALONE_ENV:
        os.environ.setdefault(name, "1" if name.endswith("WORLD_SIZE") else "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(accelerator: Accelerator) -> Distributed:
    """Join the process group through DeepSpeed and make accelerate use that exact state.

    The backend is explicit: NCCL on GPUs, gloo on CPU (DeepSpeed's CPU accelerator would pick
    oneCCL when its bindings happen to be installed). accelerate is told it runs DeepSpeed before
    it looks at devices: left alone it sees no GPU, concludes "one process" and every rank then
    trains on the same batches and writes the same files (see TrainingArguments' use of
    ``accelerator_config.use_configured_state`` in :func:`training_arguments`).
    """
    import deepspeed.ops
    import torch
    from accelerate import PartialState

    standalone_defaults()
    env = os.environ
    local_rank = int(env["LOCAL_RANK"])
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
        # The module caches this dict on purpose so edits persist (deepspeed/ops/__init__.py).
        deepspeed.ops.__compatible_ops__[_SHM_COMM_OP] = False
    previous = env.get("ACCELERATE_USE_DEEPSPEED")
    env["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend=backend)
    finally:
        if previous is None:
            del env["ACCELERATE_USE_DEEPSPEED"]
        else:
            env["ACCELERATE_USE_DEEPSPEED"] = previous
    dist = Distributed(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=local_rank,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        node_rank=int(env.get("GROUP_RANK", "0")),
        accelerator=accelerator,
    )
    log.info(
        "process %d of %d (node %d, local rank %d) on %s with %s",
        dist.rank,
        dist.world_size,
        dist.node_rank,
        dist.local_rank,
        accelerator,
        backend,
    )
    return dist


def shutdown_distributed() -> None:
    """Leave the process group so the interpreter exits without gloo/NCCL aborting at teardown."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    import torch
    import torch.distributed

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            # NCCL barriers run on a device; name it rather than let NCCL guess.
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    import torch.distributed

    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def local_main_first(dist: Distributed) -> Iterator[None]:
    """The node's first process does the work in the block (a download), the others wait for it."""
    if not dist.is_local_main:
        barrier()
    yield
    if dist.is_local_main:
        barrier()


# --- precision and DeepSpeed ---------------------------------------------------------------------


def resolve_precision(requested: Precision, accelerator: Accelerator) -> Precision:
    """``auto`` becomes bf16 on GPUs that have it, fp16 on older GPUs and fp32 on CPU.

    Half precision on CPU is refused rather than silently changed: DeepSpeed's CPU path trains in
    fp32, and a user who asked for bf16 should learn that instead of reading fp32 numbers.
    """
    import torch

    if accelerator == "cpu":
        if requested in (Precision.auto, Precision.fp32):
            return Precision.fp32
        raise InvalidInputError(
            f"hyperparameters.precision is {requested.value}, which needs a GPU, but this process has "
            "none (training on CPU runs in fp32): set precision to auto or fp32, or request "
            "resources.gpusPerWorker"
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == Precision.auto:
        return Precision.bf16 if bf16_ok else Precision.fp16
    if requested == Precision.bf16 and not bf16_ok:
        raise InvalidInputError(
            f"hyperparameters.precision is bf16, but {torch.cuda.get_device_name()} has no bf16 "
            "support: use fp16, fp32 or auto"
        )
    return requested


def torch_dtype(precision: Precision) -> torch.dtype:
    import torch

    return {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(precision, torch.float32)


def deepspeed_config(plan: RunPlan, precision: Precision, accelerator: Accelerator) -> dict[str, Any]:
    """The plan's DeepSpeed config (resolved from the spec, :mod:`kubetune.run.deepspeed`) with
    what this node decides: the precision and what CPU offloading needs on this accelerator."""
    if plan.deepspeed_config is None:
        raise InvalidInputError(f"the {plan.kind} plan has no DeepSpeed config, so it cannot train")
    return config_for_hardware(plan.deepspeed_config, precision=precision, accelerator=accelerator)


def check_cpu_adam(accelerator: Accelerator) -> None:
    """Build (or load) DeepSpeed's CPU Adam up front, so a node that cannot compile it fails with
    a clear message instead of a compiler trace from deep inside ``deepspeed.initialize``."""
    if accelerator != "cuda":
        return
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        raise InvalidInputError(
            "deepspeed.offloadOptimizer/offloadParams need DeepSpeed's CPU Adam, a C++ extension that "
            "cannot be built on this node (no C++ compiler or CUDA toolkit headers in the image); "
            "turn offloading off or use an image with build tools"
        )
    started = time.monotonic()
    try:
        builder.load(verbose=False)
    except Exception as e:
        raise InvalidInputError(
            f"deepspeed.offloadOptimizer/offloadParams need DeepSpeed's CPU Adam, and compiling it "
            f"failed on this node: {e}; turn offloading off or use an image with build tools"
        ) from e
    log.info(
        "DeepSpeed's CPU Adam for offloading is ready (%.1fs to build or load)", time.monotonic() - started
    )


# --- Trainer arguments ---------------------------------------------------------------------------


def training_arguments(
    plan: RunPlan,
    *,
    output_dir: Path,
    precision: Precision,
    ds_config: dict[str, Any],
    has_eval: bool,
    arguments_class: type[TrainingArguments] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainingArguments:
    """The Trainer's arguments, one for one from the plan's hyperparameters.

    Create them before loading the model: with ZeRO-3 they switch on ``deepspeed.zero.Init`` so
    ``from_pretrained`` loads each rank's shard only. A trainer with arguments of its own (trl's
    ``DPOConfig``) passes its ``arguments_class`` and the ``overrides`` it sets on top.
    """
    import torch
    from transformers import TrainingArguments

    from kubetune.trainer.robustness import neftune_alpha

    hp = plan.hyperparameters
    assert hp is not None, "finetune plans carry hyperparameters"
    every = plan.checkpoint.every_steps if plan.checkpoint else 100
    if hp.eval_every_steps is not None:
        eval_strategy, eval_steps = "steps", hp.eval_every_steps
    else:
        eval_strategy, eval_steps = "epoch", None
    arguments: dict[str, Any] = dict(
        output_dir=str(output_dir),
        # One line per argument: the plan is the single source of every knob.
        num_train_epochs=float(hp.epochs or 1.0),
        max_steps=hp.max_steps or -1,  # -1: derive from epochs
        per_device_train_batch_size=hp.per_device_batch_size,
        per_device_eval_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=_SCHEDULERS[hp.lr_scheduler],
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=precision == Precision.bf16,
        fp16=precision == Precision.fp16,
        gradient_checkpointing=hp.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and ZeRO-3.
        gradient_checkpointing_kwargs={"use_reentrant": False} if hp.gradient_checkpointing else None,
        logging_steps=hp.logging_every_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy if has_eval else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=None,  # the CheckpointPublisher rotates committed checkpoints in storage
        report_to=["tensorboard"],
        deepspeed=ds_config,
        # Use the PartialState init_distributed() created (DeepSpeed with an explicit backend).
        accelerator_config={"use_configured_state": True},
        label_names=["labels"],
        remove_unused_columns=False,  # our datasets hold exactly the model's inputs
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned memory only helps host-to-GPU copies
        disable_tqdm=True,
        log_level="warning",  # kubetune logs progress itself (ProgressCallback)
        log_level_replica="error",
        ddp_timeout=_DDP_TIMEOUT_S,
        # NEFTune noise on the input embeddings in training mode only (hyperparameters.robustness).
        neftune_noise_alpha=neftune_alpha(plan),
    )
    if hp.early_stopping is not None:
        if not has_eval:
            raise InvalidInputError(
                "hyperparameters.earlyStopping needs evaluation data, and this run has none: set "
                "dataset.eval or dataset.evalFraction"
            )
        from kubetune.trainer.early_stopping import argument_overrides

        arguments.update(argument_overrides(plan, eval_strategy=eval_strategy, eval_steps=eval_steps))
    arguments.update(overrides or {})
    try:
        return (arguments_class or TrainingArguments)(**arguments)
    except ValueError as e:
        raise InvalidInputError(f"the DeepSpeed config disagrees with the hyperparameters: {e}") from e


_SCHEDULERS: Final = {
    LRScheduler.linear: "linear",
    LRScheduler.cosine: "cosine",
    LRScheduler.constant: "constant",
    LRScheduler.constant_with_warmup: "constant_with_warmup",
}
# Collectives wait this long for a slow peer; checkpoint uploads of large models happen between them.
_DDP_TIMEOUT_S: Final = 2 * 3600


# --- model ---------------------------------------------------------------------------------------


def load_tokenizer(model_dir: Path, model_uri: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInputError(f"model {model_uri}: cannot load its tokenizer: {e}") from e
    return tokenizer


def load_model(
    plan: RunPlan,
    model_dir: Path,
    *,
    precision: Precision,
    pad_token_id: int | None,
    adapters: bool = True,
) -> torch.nn.Module:
    """The base model with the task's head, wrapped with LoRA adapters for ``method: lora`` unless
    ``adapters`` is false (trl's DPOTrainer adds them itself, so it can switch them off to
    compute the reference).

    The seed is set first so a new classification head and the adapters start identically on
    every rank and in every restart.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    hp = plan.hyperparameters
    assert hp is not None, "finetune plans carry hyperparameters"
    set_seed(hp.seed)
    dtype = torch_dtype(precision)
    try:
        if plan.task.type == TaskType.sequence_classification:
            kwargs: dict[str, Any] = {"num_labels": plan.task.num_labels}
            if plan.task.labels:
                kwargs["id2label"] = dict(enumerate(plan.task.labels))
                kwargs["label2id"] = {name: i for i, name in enumerate(plan.task.labels)}
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, **kwargs)
            # Classifiers pool the last non-padding token, so they must know the padding id.
            if model.config.pad_token_id is None and pad_token_id is not None:
                model.config.pad_token_id = pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InvalidInputError(
            f"model {plan.model_uri}: cannot load it for {plan.task.type.value}: {e}"
        ) from e
    if adapters and plan.method is not None and plan.method.type == MethodType.lora:
        from peft import get_peft_model

        adapted = get_peft_model(model, lora_config(plan, model))
        trainable, total = adapted.get_nb_trainable_parameters()
        log.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
        return adapted
    base: torch.nn.Module = model
    return base


def lora_config(plan: RunPlan, model: PreTrainedModel) -> LoraConfig:
    """peft settings from ``method.lora``; a classifier's head is trained in full (modules_to_save)."""
    from peft import LoraConfig
    from peft import TaskType as PeftTaskType

    assert plan.method is not None
    settings = plan.method.lora
    r, alpha, dropout = (settings.r, settings.alpha, settings.dropout) if settings else (8, 16, 0.05)
    targets: list[str] | str = list(settings.target_modules) if settings else ["all-linear"]
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's keyword: every linear layer except the output head
    classification = plan.task.type == TaskType.sequence_classification
    heads = [name for name in ("classifier", "score") if classification and hasattr(model, name)]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=heads or None,
        task_type=PeftTaskType.SEQ_CLS if classification else PeftTaskType.CAUSAL_LM,
    )


# --- metrics -------------------------------------------------------------------------------------


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 (every class weighs the same, however rare)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    predicted = np.asarray(prediction.predictions).reshape(-1)
    labels = np.asarray(prediction.label_ids).reshape(-1)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def predicted_classes(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax of each row, so evaluation never gathers full logits across ranks."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def metric_functions(
    plan: RunPlan,
) -> tuple[
    Callable[[EvalPrediction], dict[str, float]] | None,
    Callable[[Any, Any], Any] | None,
]:
    """``(compute_metrics, preprocess_logits_for_metrics)`` for the Trainer: classification
    reports accuracy and macro-F1; a causal LM's eval loss (and perplexity, added when writing
    metrics.json) needs no predictions at all."""
    if plan.task.type == TaskType.sequence_classification:
        return classification_metrics, predicted_classes
    return None, None
