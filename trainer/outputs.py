"""What a fine-tuning run leaves under ``<output>/``.

- ``model/``: a Hugging Face directory (safetensors, config, tokenizer) that
  ``AutoModel*.from_pretrained`` and vLLM load; for LoRA with ``mergeAdapter`` the adapter merged
  into the base weights. ZeRO-3 shards are gathered first.
- ``adapter/``: the LoRA adapter (peft format) plus the tokenizer.
- ``metrics.json``: final train loss, eval loss and perplexity (causal LM) or accuracy and
  macro-F1 (classification).
- ``logs/``: TensorBoard event files.
- ``run.json``: the run record (job, plan, package versions, phase timings, resume point). It is
  written when a run starts and again when it succeeds.
- ``_OWNER.json``: the job's claim on the prefix, made before anything else is written
  (:func:`guard_output`, :mod:`kubetune.ownership`).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import psutil
from transformers import TrainerCallback

from kubetune.api.spec import TaskType
from kubetune.ownership import OutputConflictError, Owner, claim_output, plan_inputs, republish
from kubetune.run.plan import RunPlan
from kubetune.storage import ObjectStore
from kubetune.trainer.checkpoint import describe_job, job_identity, same_job

if TYPE_CHECKING:
    from transformers import (
        PreTrainedTokenizerBase,
        Trainer,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

log = logging.getLogger(__name__)

# Files the Trainer writes next to a model that are of no use to anyone loading it.
_NOT_ARTIFACTS: Final = ("training_args.bin",)
_VERSIONED_PACKAGES: Final = (
    "kubetune",
    "torch",
    "deepspeed",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "tokenizers",
    "safetensors",
)
# exp() of a larger loss overflows a double; JSON has no infinity.
_MAX_LOG_PERPLEXITY: Final = 700.0


# --- the output prefix belongs to one job --------------------------------------------------------


def output_owner(plan: RunPlan) -> Owner:
    """The claim a run's job makes on its output prefix."""
    return Owner(kind=plan.job.kind, namespace=plan.job.namespace, name=plan.job.name, uid=plan.job.uid)


def guard_output(store: ObjectStore, plan: RunPlan) -> dict[str, Any] | None:
    """Claim the output prefix for this job (:func:`kubetune.ownership.claim_output`) before
    anything is written: refuses (exit code 2, reason ``OutputConflict``) a prefix claimed by or
    overlapping another job's, one holding files this job did not write, and an output inside the
    job's model or dataset.

    Returns the previous run record of this same job (a restart), or ``None`` for a fresh prefix.
    """
    claim_output(store, plan.output_uri, output_owner(plan), plan_inputs(plan))
    record_uri = plan.artifacts.run_record_uri
    if not store.exists(record_uri):
        return None
    try:
        previous = json.loads(store.read_bytes(record_uri))
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise OutputConflictError(
            f"{record_uri} exists but is not a kubetune run record ({e}): refusing to write outputs "
            "over it; choose another output.uri"
        ) from e
    if not same_job(previous.get("job"), plan.job):
        status = previous.get("status", "unknown")
        raise OutputConflictError(
            f"{plan.output_uri} holds the outputs of job {describe_job(previous.get('job'))} (status "
            f"{status}), not of {describe_job(job_identity(plan.job))}: kubetune never overwrites another "
            "job's artifacts; choose another output.uri or delete that prefix"
        )
    return previous


# --- the run record ------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds spent per phase, in the order they happened."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 3)


class StartupClock(TrainerCallback):
    """Seconds from this process's start to each start-up milestone: where time to first step goes
    (imports and process group, base model download, loading, DeepSpeed engine, first step)."""

    def __init__(self) -> None:
        self.process_started = psutil.Process().create_time()
        self.marks: dict[str, float] = {}

    @property
    def started_at(self) -> str:
        return datetime.fromtimestamp(self.process_started, UTC).isoformat(timespec="milliseconds")

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, round(time.time() - self.process_started, 3))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer has built the DeepSpeed engine (and loaded a resumed checkpoint) by now.
        self.mark("engine_ready")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.mark("first_step")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def artifact_uris(plan: RunPlan) -> dict[str, str | None]:
    """The run record's ``artifacts``: every URI a fine-tuning run writes."""
    artifacts = plan.artifacts
    return {
        "model": artifacts.model_uri,
        "adapter": artifacts.adapter_uri,
        "metrics": artifacts.metrics_uri,
        "logs": artifacts.logs_uri,
        "checkpoints": artifacts.checkpoints_uri,
    }


def write_json(store: ObjectStore, uri: str, data: dict[str, Any]) -> None:
    store.write_bytes(uri, (json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def write_run_record(store: ObjectStore, plan: RunPlan, record: dict[str, Any]) -> None:
    """Write ``run.json``: ``record`` plus the job, the plan and the package versions."""
    full = {
        "job": job_identity(plan.job),
        "kind": plan.job.kind,
        "plan": json.loads(plan.to_json()),
        "versions": package_versions(),
        "artifacts": artifact_uris(plan),
        **record,
    }
    write_json(store, plan.artifacts.run_record_uri, full)


# --- metrics -------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def final_metrics(
    plan: RunPlan, log_history: list[dict[str, Any]], eval_metrics: dict[str, Any], global_step: int
) -> dict[str, Any]:
    """``metrics.json``: the last logged train loss (the loss the model ends with; the Trainer's
    run average would only cover the steps since the last restart), and the final evaluation."""
    train_losses = [entry["loss"] for entry in log_history if "loss" in entry]
    epochs = [entry["epoch"] for entry in log_history if "epoch" in entry]
    metrics: dict[str, Any] = {
        "task": plan.task.type.value,
        "global_step": global_step,
        "epoch": _finite(epochs[-1]) if epochs else None,
        "train_loss": _finite(train_losses[-1]) if train_losses else None,
    }
    eval_loss = _finite(eval_metrics.get("eval_loss"))
    metrics["eval_loss"] = eval_loss
    if plan.method is not None and plan.method.dpo_settings is not None:
        # A DPO loss is no language-model loss: no perplexity, the held-out reward metrics instead.
        metrics["objective"] = plan.method.objective.value
        for key in sorted(k for k in eval_metrics if k.startswith("eval_rewards/")):
            metrics[key] = _finite(eval_metrics[key])
    elif plan.task.type == TaskType.causal_lm:
        metrics["perplexity"] = (
            math.exp(eval_loss) if eval_loss is not None and eval_loss < _MAX_LOG_PERPLEXITY else None
        )
    else:
        metrics["accuracy"] = _finite(eval_metrics.get("eval_accuracy"))
        metrics["f1_macro"] = _finite(eval_metrics.get("eval_f1_macro"))
    for key in ("eval_runtime", "eval_samples_per_second"):
        if key in eval_metrics:
            metrics[key] = _finite(eval_metrics[key])
    return metrics


def status_results(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's headline figures under the names of the FineTuneJob's ``status.results``."""
    stopping = metrics.get("early_stopping") or {}
    results = {
        "evalLoss": metrics.get("eval_loss"),
        "accuracy": metrics.get("accuracy"),
        "f1Macro": metrics.get("f1_macro"),
        "bestStep": stopping.get("best_step"),
        "bestMetric": _finite(stopping.get("best_metric")),
        "metric": stopping.get("metric"),
        "stopReason": stopping.get("stop_reason"),
    }
    return {key: value for key, value in results.items() if value is not None}


# --- the trained model ---------------------------------------------------------------------------


def save_trained(trainer: Trainer, local_dir: Path) -> None:
    """Write the trained weights (an adapter for LoRA) with the tokenizer to ``local_dir`` on rank
    0. Every rank must call it: under ZeRO-3 the shards are gathered collectively."""
    trainer.save_model(str(local_dir))
    for name in _NOT_ARTIFACTS:
        (local_dir / name).unlink(missing_ok=True)


def merge_adapter(
    plan: RunPlan, base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """Fold the adapter into the base weights: a plain model with no peft dependency at load time.

    The base is loaded in its own dtype, so the merged model has the base model's size.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over and only this process merges: with ZeRO-3's loading hook still installed,
    # from_pretrained would partition the base across ranks that are no longer listening.
    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    if plan.task.type == TaskType.sequence_classification:
        kwargs: dict[str, Any] = {"num_labels": plan.task.num_labels}
        if plan.task.labels:
            kwargs["id2label"] = dict(enumerate(plan.task.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(plan.task.labels)}
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype="auto", **kwargs)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def publish_model(
    store: ObjectStore,
    plan: RunPlan,
    *,
    trained_dir: Path,
    base_dir: Path,
    work_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, str]:
    """Upload the model (and adapter) written by :func:`save_trained`; rank 0 only.

    A previous attempt of the same job may have left files under other names (shard counts change
    with the dtype): they are deleted after the new files are uploaded, never before
    (:func:`kubetune.ownership.republish`)."""
    uploaded: dict[str, str] = {}
    artifacts = plan.artifacts
    if artifacts.adapter_uri is not None:
        # What was trained is the adapter; the model, when the run writes one, is it merged.
        _replace_prefix(store, plan, trained_dir, artifacts.adapter_uri)
        uploaded["adapter"] = artifacts.adapter_uri
        if artifacts.model_uri is not None:
            merged = merge_adapter(plan, base_dir, trained_dir, work_dir / "merged", tokenizer)
            _replace_prefix(store, plan, merged, artifacts.model_uri)
            uploaded["model"] = artifacts.model_uri
    elif artifacts.model_uri is not None:
        _replace_prefix(store, plan, trained_dir, artifacts.model_uri)
        uploaded["model"] = artifacts.model_uri
    for name, uri in uploaded.items():
        log.info("wrote the %s to %s", name, uri)
    return uploaded


def _replace_prefix(store: ObjectStore, plan: RunPlan, local_dir: Path, uri: str) -> None:
    republish(store, output_owner(plan), plan.output_uri, local_dir, uri, exclude=_NOT_ARTIFACTS)


def upload_logs(store: ObjectStore, plan: RunPlan, logs_dir: Path) -> None:
    """TensorBoard event files to ``<output>/logs`` (each run writes files of its own names, so a
    resumed run adds to the earlier ones)."""
    if logs_dir.is_dir() and any(p.is_file() for p in logs_dir.rglob("*")):
        store.upload_dir(logs_dir, plan.artifacts.logs_uri)
