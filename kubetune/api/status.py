"""Status types, written by the operator (and by rank 0 for ``progress``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from kubetune.api.base import KubeModel


class Phase(StrEnum):
    pending = "Pending"
    waiting = "Waiting"
    validating = "Validating"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"

    @property
    def finished(self) -> bool:
        return self in (Phase.succeeded, Phase.failed)


class ConditionType(StrEnum):
    """Condition types, following Kubernetes API conventions (positive polarity)."""

    validated = "Validated"  # input checked by the validation Job
    running = "Running"  # the training gang is running
    complete = "Complete"  # terminal success
    failed = "Failed"  # terminal failure
    suspended = "Suspended"
    serving_ready = "ServingReady"
    # False while a pod of the current workload cannot be placed (reason Unschedulable).
    scheduled = "PodsScheduled"
    # The last attempt ended and the gang was replaced; the reason says why, the message whether
    # the restart counts against maxRestarts.
    restarted = "Restarted"


class Condition(KubeModel):
    """One observation of the job's state (metav1.Condition)."""

    type: str = Field(description="Condition type, e.g. Complete, Failed, Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern="^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024, description="CamelCase reason."
    )
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="Generation the condition was set for.")


class Progress(KubeModel):
    """Training progress, patched by rank 0 every few seconds."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(None, ge=0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Recent training loss.")
    eval_loss: float | None = Field(None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(None, description="Current learning rate.")
    metrics: dict[str, float] | None = Field(None, description="Latest evaluation metrics.")
    samples_per_second: float | None = Field(None, ge=0, description="Training throughput.")
    percent: int | None = Field(None, ge=0, le=100, description="Percent of steps done.")
    eta: str | None = Field(None, description="Estimated time to completion, e.g. 1h2m3s.")
    updated_at: str | None = Field(None, description="When progress was last reported (RFC 3339).")


class CheckpointStatus(KubeModel):
    """The newest committed checkpoint."""

    latest_step: int | None = Field(None, ge=0, description="Step of the newest committed checkpoint.")
    latest_uri: str | None = Field(None, description="URI of the newest committed checkpoint.")


class Artifacts(KubeModel):
    """Where the results are."""

    model_uri: str | None = Field(None, description="The full model (merged, for LoRA with mergeAdapter).")
    adapter_uri: str | None = Field(None, description="The LoRA adapter.")
    metrics_uri: str | None = Field(None, description="metrics.json.")
    logs_uri: str | None = Field(None, description="TensorBoard event files.")
    report_uri: str | None = Field(None, description="compression_report.json (CompressJob).")


class ServingStatus(KubeModel):
    """The serving Deployment."""

    deployment: str | None = Field(None, description="Deployment name.")
    service: str | None = Field(None, description="Service name.")
    url: str | None = Field(None, description="In-cluster base URL of the OpenAI-compatible API.")
    ready: bool | None = Field(None, description="Whether at least one replica is ready.")
    ready_replicas: int | None = Field(None, ge=0, description="Ready replicas.")


class TrackingStatus(KubeModel):
    """The MLflow run of this job, written by rank 0 (the operator neither reads nor writes it)."""

    experiment_id: str | None = Field(None, description="MLflow experiment id.")
    run_id: str | None = Field(None, description="MLflow run id.")
    model_version: str | None = Field(
        None, description="Version of spec.tracking.mlflow.registeredModel registered on success."
    )
    degraded: bool | None = Field(
        None, description="True when the tracking server could not be reached and tracking was switched off."
    )
    message: str | None = Field(None, description="Why tracking is degraded.")


class ProcessLogsStatus(KubeModel):
    """Where the processes' own logs are kept after the pods are gone (``kubetune logs`` reads them)."""

    attempt: int | None = Field(None, ge=0, description="The newest attempt (0 first; validation is in 0).")
    uri: str | None = Field(
        None,
        description=(
            "<output>/logs/attempt-<N> of that attempt: validate.log, rank-<R>.log per process of a gang, "
            "compress.log; each file keeps the newest 8 MiB, written when its process ends."
        ),
    )


class UsageStatus(KubeModel):
    """What the run used and how well, written by rank 0 at its end (also in metrics.json's usage)."""

    wall_seconds: dict[str, float] | None = Field(
        None, description="Seconds per phase of the run (download, load, train, evaluate, save, upload, ...)."
    )
    wall_seconds_total: float | None = Field(
        None, ge=0, description="Seconds from the process's start to the end."
    )
    gpu_hours_requested: float | None = Field(None, ge=0, description="GPUs requested x pods x wall time.")
    cpu_core_hours_requested: float | None = Field(
        None, ge=0, description="CPU cores requested x pods x wall time (absent without a cpu request)."
    )
    tokens_per_second: float | None = Field(
        None, ge=0, description="Training input tokens per second, all ranks."
    )
    model_flops_utilization: float | None = Field(
        None, ge=0, description="6 x parameters x tokens/s over the GPUs' peak FLOP/s (known devices only)."
    )
    note: str | None = Field(None, description="Why a figure is absent.")


class JobStatusBase(KubeModel):
    """Status fields shared by both kinds."""

    phase: Phase | None = Field(None, description="Lifecycle phase.")
    message: str | None = Field(None, description="One-line summary of the current state.")
    conditions: list[Condition] | None = Field(
        None,
        description="Observations of the job's state, one per type.",
        # One entry per type, so server-side apply merges conditions by type.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="Spec generation the status reflects.")
    start_time: str | None = Field(None, description="When the workload first started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job finished (RFC 3339).")
    restarts: int | None = Field(None, ge=0, description="Gang restarts after retriable failures.")
    disruptions: int | None = Field(
        None,
        ge=0,
        description="Of the restarts, those after an eviction or preemption (not counted against maxRestarts).",
    )
    active_job: str | None = Field(None, description="Name of the current batch/v1 Job.")
    progress: Progress | None = Field(None, description="Training progress.")
    checkpoints: CheckpointStatus | None = Field(None, description="Newest committed checkpoint.")
    artifacts: Artifacts | None = Field(None, description="Result locations.")
    serving: ServingStatus | None = Field(None, description="Serving Deployment state.")
    tracking: TrackingStatus | None = Field(
        None, description="Experiment tracking (MLflow run, degradation)."
    )
    logs: ProcessLogsStatus | None = Field(None, description="Where each attempt's process logs are kept.")
    usage: UsageStatus | None = Field(None, description="Resource use and efficiency of the run.")


class FineTuneResults(KubeModel):
    """Headline figures of metrics.json, written by rank 0 when training ends."""

    eval_loss: float | None = Field(None, description="Evaluation loss of the written model.")
    accuracy: float | None = Field(None, description="Evaluation accuracy (sequence-classification).")
    f1_macro: float | None = Field(None, description="Evaluation macro-F1 (sequence-classification).")
    best_step: int | None = Field(
        None, ge=0, description="Step of the best evaluation, whose weights were written (earlyStopping)."
    )
    best_metric: float | None = Field(None, description="The earlyStopping metric at that step.")
    metric: str | None = Field(None, description="The metric earlyStopping watched.")
    stop_reason: Literal["EarlyStopped", "MaxStepsReached"] | None = Field(
        None,
        description="Why training stopped (earlyStopping): EarlyStopped when the metric stopped "
        "improving, MaxStepsReached when the planned steps or epochs ran out first.",
    )


class FineTuneJobStatus(JobStatusBase):
    """Observed state of a FineTuneJob."""

    results: FineTuneResults | None = Field(None, description="Headline results of the trained model.")


class CompressionResults(KubeModel):
    """Headline figures of compression_report.json."""

    original_size_bytes: int | None = Field(None, ge=0, description="Model size on disk before.")
    compressed_size_bytes: int | None = Field(None, ge=0, description="Model size on disk after.")
    size_ratio: float | None = Field(None, ge=0, description="original / compressed size.")
    original_parameters: int | None = Field(None, ge=0, description="Parameter count before.")
    compressed_parameters: int | None = Field(None, ge=0, description="Parameter count after.")
    metrics_before: dict[str, float] | None = Field(None, description="Quality of the original model.")
    metrics_after: dict[str, float] | None = Field(None, description="Quality of the compressed model.")


class CompressJobStatus(JobStatusBase):
    """Observed state of a CompressJob."""

    source_model_uri: str | None = Field(None, description="The model that was compressed.")
    results: CompressionResults | None = Field(None, description="Size and quality before and after.")
