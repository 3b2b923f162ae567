"""The run plan: the contract between the operator (or local mode) and the runtimes.

The operator renders a plan from a job's spec into a ConfigMap; every runtime process reads it
from a file. Plans are pure data with no secrets: credentials reach pods only as environment
variables from the user's Secret. Everything here is a pure function of the spec.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.resources import (
    Calibration,
    CompressJob,
    Distillation,
    FineTuneJob,
    KubetuneResource,
    Pruning,
    Quantization,
)
from kubetune.api.spec import (
    AddressingStyle,
    Checkpointing,
    Dataset,
    DeepSpeed,
    Hyperparameters,
    Method,
    MlflowTarget,
    Task,
)

PLAN_VERSION = 1

# Layout of everything a run writes under spec.output.uri.
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.json"
RUN_RECORD_FILE = "run.json"
REPORT_FILE = "compression_report.json"
COMMIT_MARKER = "_COMMITTED.json"


class PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobRef(PlanModel):
    """The custom resource this plan was rendered from (rank 0 reports progress to it)."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str | None = None


class StoragePlan(PlanModel):
    """How runtimes reach object storage. Credentials come from the environment, never from here."""

    endpoint: str | None = None
    region: str | None = None
    addressing_style: AddressingStyle = AddressingStyle.auto


class WorldPlan(PlanModel):
    """The process gang: workers (pods / torchrun nodes) x processes per worker."""

    workers: int = Field(1, ge=1)
    processes_per_worker: int = Field(1, ge=1)
    gpus_per_worker: int = Field(0, ge=0)

    @property
    def size(self) -> int:
        return self.workers * self.processes_per_worker


class CompressionPlan(PlanModel):
    distillation: Distillation | None = None
    pruning: Pruning | None = None
    quantization: Quantization | None = None
    calibration: Calibration


class RunPlan(PlanModel):
    """Everything a runtime needs to run one job, resolved from the spec."""

    plan_version: Literal[1] = 1
    kind: Literal["finetune", "compress"]
    job: JobRef
    model_uri: str
    output_uri: str
    task: Task
    dataset: Dataset
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    deepspeed_config: dict[str, Any] | None = None
    checkpoint: Checkpointing | None = None
    compression: CompressionPlan | None = None
    storage: StoragePlan
    world: WorldPlan
    tracking: MlflowTarget | None = None  # where rank 0 logs the run; never credentials

    def output(self, *parts: str) -> str:
        """URI of an artifact under the output prefix, e.g. ``plan.output(MODEL_DIR)``."""
        return "/".join([self.output_uri.rstrip("/"), *(p.strip("/") for p in parts)])

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    @classmethod
    def from_file(cls, path: str | Path) -> RunPlan:
        return cls.model_validate_json(Path(path).read_text())


def render_deepspeed_config(deepspeed: DeepSpeed, hyperparameters: Hyperparameters) -> dict[str, Any]:
    """The DeepSpeed config for a job: ZeRO settings and batch geometry from the spec, with the
    user's extra ``config`` merged over it. Precision is left for the runtime to decide because
    only the runtime knows whether the hardware has bf16."""
    zero: dict[str, Any] = {"stage": deepspeed.zero_stage}
    if deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if deepspeed.zero_stage == 3:
        # Gather the sharded weights on save so <output>/model is a plain, loadable checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
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
    return deep_merge(config, deepspeed.config or {})


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _job_ref(job: KubetuneResource, namespace: str) -> JobRef:
    return JobRef(
        api_version=job.api_version,
        kind=type(job).kind_name,
        namespace=job.metadata.namespace or namespace,
        name=job.metadata.name or "unnamed",
        uid=job.metadata.uid,
    )


def _storage_plan(job: FineTuneJob | CompressJob, default_endpoint: str | None) -> StoragePlan:
    storage = job.spec.storage
    return StoragePlan(
        endpoint=storage.endpoint or default_endpoint,
        region=storage.region,
        addressing_style=storage.addressing_style,
    )


def _tracking(job: FineTuneJob | CompressJob, namespace: str) -> MlflowTarget | None:
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    ref = _job_ref(job, namespace)
    return mlflow.target(ref.namespace, ref.name) if mlflow else None


def _world(job: FineTuneJob | CompressJob) -> WorldPlan:
    resources = job.spec.resources
    return WorldPlan(
        workers=resources.workers,
        processes_per_worker=resources.processes,
        gpus_per_worker=resources.gpus_per_worker,
    )


def plan_finetune(
    job: FineTuneJob, *, namespace: str = "default", default_endpoint: str | None = None
) -> RunPlan:
    """The run plan of a FineTuneJob."""
    spec = job.spec
    return RunPlan(
        kind="finetune",
        job=_job_ref(job, namespace),
        model_uri=spec.model.uri,
        output_uri=spec.output.uri,
        task=spec.task,
        dataset=spec.dataset,
        method=spec.method,
        hyperparameters=spec.hyperparameters,
        deepspeed_config=render_deepspeed_config(spec.deepspeed, spec.hyperparameters),
        checkpoint=spec.checkpoint,
        storage=_storage_plan(job, default_endpoint),
        world=_world(job),
        tracking=_tracking(job, namespace),
    )


def plan_compress(
    job: CompressJob, *, model_uri: str, namespace: str = "default", default_endpoint: str | None = None
) -> RunPlan:
    """The run plan of a CompressJob. ``model_uri`` is ``spec.model.uri`` or, for
    ``fromFineTuneJob``, the upstream job's model artifact (resolved by the caller)."""
    spec = job.spec
    distillation = spec.distillation
    # Only distillation trains; quantization and pruning run in one process.
    world = (
        _world(job) if distillation is not None else WorldPlan(gpus_per_worker=spec.resources.gpus_per_worker)
    )
    return RunPlan(
        kind="compress",
        job=_job_ref(job, namespace),
        model_uri=model_uri,
        output_uri=spec.output.uri,
        task=spec.task,
        dataset=spec.dataset,
        hyperparameters=distillation.hyperparameters if distillation else None,
        deepspeed_config=(
            render_deepspeed_config(distillation.deepspeed, distillation.hyperparameters)
            if distillation
            else None
        ),
        checkpoint=distillation.checkpoint if distillation else None,
        compression=CompressionPlan(
            distillation=distillation,
            pruning=spec.pruning,
            quantization=spec.quantization,
            calibration=spec.calibration,
        ),
        storage=_storage_plan(job, default_endpoint),
        world=world,
        tracking=_tracking(job, namespace),
    )


def finetune_model_uri(job: FineTuneJob) -> str:
    """Where a FineTuneJob's full model lands (the merged model for LoRA with mergeAdapter), which
    is what a CompressJob with ``fromFineTuneJob`` compresses and what serving loads."""
    return "/".join([job.spec.output.uri.rstrip("/"), MODEL_DIR])


def dumps_plan(plan: RunPlan) -> str:
    """Canonical JSON of a plan, stable across runs so rendered ConfigMaps do not churn."""
    return json.dumps(json.loads(plan.to_json()), indent=2, sort_keys=True)
