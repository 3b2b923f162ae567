"""The run plan: the contract between the operator (or local mode) and the runtimes.

The operator renders a plan from a job's spec into a ConfigMap; local mode writes the same JSON
to a file; every runtime process reads it with :meth:`RunPlan.from_file`. Plans are pure data with
no secrets: credentials reach pods only as environment variables from the user's Secret.
Everything here is a pure function of the spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    Hyperparameters,
    Method,
    MlflowTarget,
    Task,
)
from kubetune.errors import InvalidInputError, describe_validation_error
from kubetune.run.artifacts import RunArtifacts, compress_artifacts, finetune_artifacts, join_uri
from kubetune.run.deepspeed import config_from_spec
from kubetune.run.usage import cpu_cores

# The node label naming a node's GPU (NVIDIA GPU feature discovery), read by the memory plan.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

# Problems of an invalid plan named in the one-line reason (the termination message is short).
_PROBLEMS_SHOWN = 10
# The opt-out of the validation step's memory check (kubetune.run.memory), for experts who know
# better than the estimate: "true" on a FineTuneJob runs it even when the plan says it will not fit.
SKIP_MEMORY_CHECK_ANNOTATION = "kubetune.io/skip-memory-check"


class PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobRef(PlanModel):
    """The custom resource this plan was rendered from (rank 0 reports progress to it)."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str | None = None


class SweepRef(PlanModel):
    """The FineTuneSweep a trial belongs to (its controller owner), for tracking the trial as a
    child of the sweep's run: its identity and what the sweep searches."""

    name: str
    uid: str
    search: dict[str, Any] = Field(default_factory=dict)
    """The sweep's parameters, objective, algorithm and maxTrials (wire form)."""


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
    # The CPU cores each worker requests (None: no request), for the requested core-hours.
    cpus_per_worker: float | None = Field(None, ge=0)
    # The container memory limit of each worker (a quantity, None: no limit) and the GPU product
    # its node selector names (nvidia.com/gpu.product), for the memory plan's check.
    memory_limit: str | None = None
    gpu_product: str | None = None

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
    sweep: SweepRef | None = None  # the sweep of a trial (tracked as a child of the sweep's run)
    skip_memory_check: bool | None = None  # the job's SKIP_MEMORY_CHECK_ANNOTATION is "true"

    def output(self, *parts: str) -> str:
        """URI of a file under the output prefix, e.g. ``plan.output(METRICS_FILE)``."""
        return join_uri(self.output_uri, *parts)

    @property
    def artifacts(self) -> RunArtifacts:
        """What this run writes and what is served from it (:mod:`kubetune.run.artifacts`)."""
        if self.kind == "compress":
            return compress_artifacts(output_uri=self.output_uri)
        return finetune_artifacts(
            output_uri=self.output_uri, base_model_uri=self.model_uri, method=self.method
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    @classmethod
    def from_file(cls, path: str | Path) -> RunPlan:
        """The plan in ``path``. An unreadable or invalid file raises
        :class:`~kubetune.errors.InvalidInputError` (exit code 2) with a one-line reason."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"cannot read the run plan {path}: {e.strerror or e}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            problems = describe_validation_error(e, limit=_PROBLEMS_SHOWN, empty="plan")
            raise InvalidInputError(f"the run plan {path} is invalid: {problems}") from None


def _job_ref(job: KubetuneResource, namespace: str) -> JobRef:
    return JobRef(
        api_version=job.api_version,
        kind=type(job).kind_name,
        namespace=job.metadata.namespace or namespace,
        name=job.metadata.name or "unnamed",
        uid=job.metadata.uid,
    )


def storage_plan(job: FineTuneJob | CompressJob, default_endpoint: str | None) -> StoragePlan:
    storage = job.spec.storage
    return StoragePlan(
        endpoint=storage.endpoint or default_endpoint,
        region=storage.region,
        addressing_style=storage.addressing_style,
    )


SWEEP_SEARCH_ANNOTATION = "kubetune.io/sweep-search"
"""On a trial: its sweep's search space (JSON), which the trial's MLflow parent run records."""


def _sweep_ref(job: FineTuneJob | CompressJob) -> SweepRef | None:
    """The FineTuneSweep that controls ``job`` (a trial), from its owner references."""
    owners = (job.metadata.model_extra or {}).get("ownerReferences") or []
    for owner in owners:
        if isinstance(owner, dict) and owner.get("kind") == "FineTuneSweep" and owner.get("uid"):
            raw = (job.metadata.annotations or {}).get(SWEEP_SEARCH_ANNOTATION)
            try:
                search = json.loads(raw) if raw else {}
            except ValueError:
                search = {}
            return SweepRef(
                name=str(owner.get("name")),
                uid=str(owner["uid"]),
                search=search if isinstance(search, dict) else {},
            )
    return None


def _tracking(job: FineTuneJob | CompressJob, namespace: str) -> MlflowTarget | None:
    mlflow = job.spec.tracking.mlflow if job.spec.tracking else None
    ref = _job_ref(job, namespace)
    # The trials of a sweep share one experiment, the sweep's, as their runs share one parent.
    sweep = _sweep_ref(job)
    return mlflow.target(ref.namespace, sweep.name if sweep else ref.name) if mlflow else None


def _world(job: FineTuneJob | CompressJob) -> WorldPlan:
    resources = job.spec.resources
    return WorldPlan(
        workers=resources.workers,
        processes_per_worker=resources.processes,
        gpus_per_worker=resources.gpus_per_worker,
        cpus_per_worker=cpu_cores((resources.requests or {}).get("cpu")),
        memory_limit=(resources.limits or {}).get("memory"),
        gpu_product=(resources.node_selector or {}).get(GPU_PRODUCT_LABEL),
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
        deepspeed_config=config_from_spec(spec.deepspeed, spec.hyperparameters),
        checkpoint=spec.checkpoint,
        storage=storage_plan(job, default_endpoint),
        world=_world(job),
        tracking=_tracking(job, namespace),
        sweep=_sweep_ref(job),
        skip_memory_check=(job.metadata.annotations or {}).get(SKIP_MEMORY_CHECK_ANNOTATION) == "true"
        or None,
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
            config_from_spec(distillation.deepspeed, distillation.hyperparameters) if distillation else None
        ),
        checkpoint=distillation.checkpoint if distillation else None,
        compression=CompressionPlan(
            distillation=distillation,
            pruning=spec.pruning,
            quantization=spec.quantization,
            calibration=spec.calibration,
        ),
        storage=storage_plan(job, default_endpoint),
        world=world,
        tracking=_tracking(job, namespace),
    )


def dumps_plan(plan: RunPlan) -> str:
    """Canonical JSON of a plan, stable across runs so rendered ConfigMaps do not churn."""
    return json.dumps(json.loads(plan.to_json()), indent=2, sort_keys=True)
