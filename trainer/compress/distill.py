"""Knowledge distillation: a smaller student learns from the teacher's output distribution.

The student is a model given by URI, or derived from the teacher by keeping every k-th layer
(layers 0, k, 2k, ...) and initialising it from the teacher's weights (embeddings, kept layers,
final norm and head are copied; DistilBERT's recipe).

Training is the fine-tuning machinery (:mod:`kubetune.trainer.training`,
:mod:`kubetune.trainer.checkpoint`): the transformers Trainer with DeepSpeed switched on by
configuration, torchrun gangs, ``<output>/checkpoints/step-N`` committed with ``_COMMITTED.json``
and resumed from after a restart, progress reported to the job's status. Only the loss differs,
in the trl manner, by overriding ``compute_loss``:

    loss = kdWeight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kdWeight) * CE

over every token that carries a label (causal LM: next-token distributions; classifiers: the
class distribution). The T^2 factor keeps the KD gradients' scale independent of T (Hinton et
al.). Evaluation reports the student's own cross-entropy, so ``eval_loss`` stays a perplexity.

The teacher is loaded on every rank, whole, in eval mode and before the Trainer's arguments exist:
with ZeRO-3 those switch on ``deepspeed.zero.Init``, which would partition the frozen teacher
across ranks that run it independently.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api.spec import TaskType
from kubetune.errors import InvalidInputError
from kubetune.run.plan import RunPlan
from kubetune.storage import ObjectStore, open_store
from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.runtime import storage_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from kubetune.run.deepspeed import Accelerator
    from kubetune.trainer.outputs import Timings
    from kubetune.trainer.training import Distributed

log = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)


# --- the student ---------------------------------------------------------------------------------


def _layer_list(model: torch.nn.Module, count: int) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, list) of the model's stack of ``count`` transformer blocks."""
    import torch

    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise InvalidInputError(
            f"cannot tell which module list holds the teacher's {count} layers (candidates: {names}); "
            "give the student by distillation.student.uri instead of layerStride"
        )
    name, layers = found[0]
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    assert isinstance(layers, torch.nn.ModuleList)
    return parent, attribute, layers


def kept_layers(count: int, stride: int) -> list[int]:
    """Every ``stride``-th layer, starting with the first."""
    return list(range(0, count, stride))


def derive_student(teacher_dir: Path, stride: int, task: TaskType, out_dir: Path) -> list[int]:
    """Write a student that keeps every ``stride``-th layer of the teacher (with its weights) to
    ``out_dir``, tokenizer included; returns the kept layer indices."""
    import torch

    from kubetune.trainer.compress.evaluate import load_for_task

    teacher = load_for_task(teacher_dir, task, dtype="auto", device="cpu", what="the teacher")
    config = teacher.config
    count = int(getattr(config, "num_hidden_layers", 0) or 0)
    keep = kept_layers(count, stride)
    if count < 2 or len(keep) == count:
        raise InvalidInputError(
            f"distillation.student.layerStride {stride} keeps all {count} layers of the teacher; "
            "the teacher needs at least 2 layers, and the stride must be at most the layer count"
        )
    parent, attribute, layers = _layer_list(teacher, count)
    student_layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(student_layers):
        # Attention modules index the KV cache by their layer number.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", new_index)  # noqa: B010 (not a declared attribute)
    setattr(parent, attribute, student_layers)
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == count:
        config.layer_types = [layer_types[i] for i in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(out_dir)
    copy_tokenizer(teacher_dir, out_dir)
    log.info("derived a student with layers %s of the teacher's %d", keep, count)
    return keep


def copy_tokenizer(source: Path, dest: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def check_compatible(teacher: Any, student: Any, student_uri: str, task: TaskType) -> None:
    """The KD loss compares the two output distributions entry by entry."""
    if task == TaskType.sequence_classification:
        t, s, what = teacher.config.num_labels, student.config.num_labels, "classes"
    else:
        t = teacher.get_output_embeddings().weight.shape[0]
        s = student.get_output_embeddings().weight.shape[0]
        what = "vocabulary entries"
    if t != s:
        raise InvalidInputError(
            f"the student {student_uri} has {s} {what} but the teacher has {t}; a student must share the "
            "teacher's tokenizer (or label set) for its outputs to be compared"
        )


# --- the loss ------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    causal: bool,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the scored positions."""
    import torch.nn.functional as F

    if causal:
        # Position i predicts token i+1; score exactly the positions whose next token has a label.
        scored = labels[:, 1:] != IGNORE_INDEX
        student = student_logits[:, :-1][scored]
        teacher = teacher_logits[:, :-1][scored]
    else:
        student, teacher = student_logits, teacher_logits
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _trainer_class() -> type:
    """The Trainer subclass, built on first use so importing this module stays cheap."""
    import torch
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        """The transformers Trainer with the KD loss; everything else (DeepSpeed, schedules,
        accumulation, checkpoints, resume) is the Trainer's."""

        def __init__(
            self,
            *args: Any,
            teacher: torch.nn.Module,
            temperature: float,
            kd_weight: float,
            causal: bool,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device)
            self.temperature = temperature
            self.kd_weight = kd_weight
            self.causal = causal
            # The loss is a per-batch mean, so the Trainer must scale it for gradient accumulation.
            self.model_accepts_loss_kwargs = False

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: torch.Tensor | int | None = None,
        ) -> Any:
            outputs = model(**inputs)
            hard = outputs.loss
            if not model.training:
                return (hard, outputs) if return_outputs else hard
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            soft = distillation_loss(
                outputs.logits,
                teacher_logits,
                inputs["labels"],
                temperature=self.temperature,
                causal=self.causal,
            )
            loss = self.kd_weight * soft + (1.0 - self.kd_weight) * hard
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


# --- the run -------------------------------------------------------------------------------------


@dataclass
class DistillationResult:
    student_dir: Path
    student: str
    """The student's origin, in words (URI, or the kept teacher layers)."""
    global_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    resumed_from: dict[str, Any] | None = None
    checkpoints_committed: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "global_step": self.global_step,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "resumed_from": self.resumed_from,
            "checkpoints_committed": self.checkpoints_committed,
        }


def _prepare_student(plan: RunPlan, teacher_dir: Path, scratch: Path, dist: Distributed) -> tuple[Path, str]:
    from kubetune.trainer import training

    distillation = plan.compression.distillation if plan.compression else None
    assert distillation is not None
    student_dir = scratch / "student-initial"
    with training.local_main_first(dist):
        if dist.is_local_main:
            if student_dir.exists():
                shutil.rmtree(student_dir)
            if distillation.student.uri is not None:
                uri = distillation.student.uri
                open_store(uri, storage_config(plan)).download_prefix(uri, student_dir)
                if not (student_dir / "config.json").is_file():
                    raise InvalidInputError(
                        f"distillation.student.uri {uri} holds no config.json: not a model directory"
                    )
                copy_missing_tokenizer(teacher_dir, student_dir)
            else:
                assert distillation.student.layer_stride is not None
                derive_student(teacher_dir, distillation.student.layer_stride, plan.task.type, student_dir)
    return student_dir, _student_origin(plan)


def _student_origin(plan: RunPlan) -> str:
    distillation = plan.compression.distillation if plan.compression else None
    assert distillation is not None
    if distillation.student.uri is not None:
        return str(distillation.student.uri)
    stride = distillation.student.layer_stride
    return f"every {stride}th layer of the teacher (layerStride {stride})"


def training_finished(checkpoint_dir: Path) -> bool:
    """Whether a Trainer checkpoint was written at the last step of its run."""
    import json

    try:
        state = json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    max_steps = int(state.get("max_steps") or 0)
    return max_steps > 0 and int(state.get("global_step") or 0) >= max_steps


def export_checkpoint_model(checkpoint_dir: Path, out_dir: Path) -> None:
    """The Hugging Face model files of a Trainer checkpoint (weights, config), without optimizer
    states, DeepSpeed shards or RNG states."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for path in checkpoint_dir.iterdir():
        if path.is_file() and (
            path.name in ("config.json", "generation_config.json")
            or (path.name.endswith(".safetensors") or path.name == "model.safetensors.index.json")
        ):
            shutil.copy2(path, out_dir / path.name)
    if not (out_dir / "config.json").is_file() or not any(out_dir.glob("*.safetensors")):
        raise InvalidInputError(
            f"the checkpoint in {checkpoint_dir} holds no model weights to take the student from"
        )


def restore_dtype(student_dir: Path, teacher_dir: Path, task: TaskType) -> None:
    """Store the trained student in the teacher's dtype: training on CPU runs in fp32, and a
    distilled model must not come out larger per parameter than the model it replaces."""
    import json

    from kubetune.trainer.compress.evaluate import load_for_task

    def stored(model_dir: Path) -> str | None:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        value = config.get("dtype") or config.get("torch_dtype")
        return str(value) if value else None

    wanted = stored(teacher_dir)
    if wanted is None or wanted == stored(student_dir):
        return
    student = load_for_task(student_dir, task, dtype=wanted, device="cpu", what="the trained student")
    for path in student_dir.glob("*.safetensors"):
        path.unlink()
    student.save_pretrained(student_dir)
    log.info("stored the student in the teacher's dtype %s", wanted)


def copy_missing_tokenizer(teacher_dir: Path, student_dir: Path) -> None:
    """The student is trained on the teacher's tokens; ship the teacher's tokenizer with it."""
    if not any((student_dir / name).is_file() for name in _TOKENIZER_FILES):
        copy_tokenizer(teacher_dir, student_dir)


def distill(
    plan: RunPlan,
    *,
    teacher_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    scratch: Path,
    dist: Distributed,
    accelerator: Accelerator,
    store: ObjectStore,
    clock: Timings,
) -> DistillationResult:
    """Train the student on every rank; returns where rank 0 wrote the trained student."""
    from transformers import PrinterCallback

    from kubetune.trainer import checkpoint, training
    from kubetune.trainer.data.collation import make_collator, pad_token_id, prepare_datasets
    from kubetune.trainer.progress import ProgressCallback, make_reporter

    compression = plan.compression
    assert compression is not None
    assert compression.distillation is not None
    assert plan.hyperparameters is not None
    distillation = compression.distillation
    hp = plan.hyperparameters
    trainer_dir = scratch / "distill-trainer"
    student_dir = scratch / "student-trained"
    resume = checkpoint.prepare_resume(store, plan, dist, trainer_dir)
    if resume is not None and training_finished(resume.local_dir):
        # A restart after the last step was committed (the pod died while compressing or
        # uploading): the checkpoint already holds the trained student. The Trainer would train one
        # step past max_steps when resumed from its final checkpoint.
        log.info("checkpoint step %d ends the training: taking the student from it", resume.step)
        origin = _student_origin(plan)
        if dist.is_main:
            export_checkpoint_model(resume.local_dir, student_dir)
            restore_dtype(student_dir, teacher_dir, plan.task.type)
            tokenizer.save_pretrained(student_dir)
        training.barrier()
        return DistillationResult(
            student_dir=student_dir,
            student=origin,
            global_step=resume.step,
            resumed_from={"step": resume.step, "uri": resume.uri},
        )
    with clock.phase("distill_setup"):
        student_initial, origin = _prepare_student(plan, teacher_dir, scratch, dist)
        precision = training.resolve_precision(hp.precision, accelerator)
        ds_config = training.deepspeed_config(plan, precision, accelerator)
        data = prepare_datasets(plan, tokenizer, scratch / f"distill-data-{dist.local_rank}")
        pad = pad_token_id(tokenizer)
        teacher = training.load_model(plan, teacher_dir, precision=precision, pad_token_id=pad)
        teacher.eval()
        teacher.requires_grad_(False)
        args = training.training_arguments(
            plan,
            output_dir=trainer_dir,
            precision=precision,
            ds_config=ds_config,
            has_eval=data.eval is not None,
        )
        student_uri = distillation.student.uri or plan.model_uri
        student_plan = plan.model_copy(update={"model_uri": student_uri})
        student = training.load_model(student_plan, student_initial, precision=precision, pad_token_id=pad)
        check_compatible(teacher, student, student_uri, plan.task.type)
    reporter = make_reporter(plan, dist.rank)
    publisher = checkpoint.CheckpointPublisher(
        store,
        plan,
        dist,
        keep_last=plan.checkpoint.keep_last if plan.checkpoint else 2,
        after_commit=reporter.report_checkpoint,
    )
    compute_metrics, preprocess_logits = training.metric_functions(plan)
    trainer = _trainer_class()(
        model=student,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(tokenizer, plan),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits,
        callbacks=[ProgressCallback(reporter), publisher],
        teacher=teacher,
        temperature=distillation.temperature,
        kd_weight=distillation.kd_weight,
        causal=plan.task.type == TaskType.causal_lm,
    )
    trainer.remove_callback(PrinterCallback)
    try:
        with clock.phase("distill"):
            trainer.train(resume_from_checkpoint=str(resume.local_dir) if resume else None)
            evaluation = trainer.evaluate() if data.eval is not None else {}
        with clock.phase("distill_save"):
            from kubetune.trainer.outputs import save_trained

            save_trained(trainer, student_dir)
            if dist.is_main:
                restore_dtype(student_dir, teacher_dir, plan.task.type)
                tokenizer.save_pretrained(student_dir)
            training.barrier()
    finally:
        reporter.close()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return DistillationResult(
        student_dir=student_dir,
        student=origin,
        global_step=trainer.state.global_step,
        train_loss=float(losses[-1]) if losses else None,
        eval_loss=float(evaluation["eval_loss"]) if "eval_loss" in evaluation else None,
        resumed_from={"step": resume.step, "uri": resume.uri} if resume else None,
        checkpoints_committed=list(publisher.stats.committed),
    )
