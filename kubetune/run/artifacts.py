"""What a job writes, what is served from it and what a downstream job consumes: decided here once.

The operator's status, the serving Deployment, ``kubetune render``, local mode and the runtime's
run record all ask this module; none of them re-derives "is the LoRA adapter merged".
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.resources import CompressJob, FineTuneJob
from kubetune.api.spec import Method, MethodType
from kubetune.api.status import Artifacts as ArtifactsStatus

# Layout of everything a run writes under spec.output.uri.
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.json"
RUN_RECORD_FILE = "run.json"
REPORT_FILE = "compression_report.json"
COMMIT_MARKER = "_COMMITTED.json"


def join_uri(prefix: str, *parts: str) -> str:
    """``prefix/part/...`` with exactly one slash between the pieces."""
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def writes_full_model(method: Method | None) -> bool:
    """Whether a fine-tuning run writes ``<output>/model``: full fine-tuning always does, LoRA
    unless ``mergeAdapter: false`` keeps only the adapter. No method means a CompressJob's
    distillation student, which is a full model."""
    return method is None or method.type == MethodType.full or method.merges


def trains_adapter(method: Method | None) -> bool:
    return method is not None and method.type == MethodType.lora


@dataclass(frozen=True)
class ServedModel:
    """What a serving process loads: a full model, optionally with an unmerged LoRA adapter."""

    model_uri: str
    adapter_uri: str | None = None


@dataclass(frozen=True)
class RunArtifacts:
    """Every URI a run writes under its output prefix, and what is served from them."""

    output_uri: str
    served: ServedModel
    model_uri: str | None = None
    adapter_uri: str | None = None
    report_uri: str | None = None

    @property
    def metrics_uri(self) -> str:
        return join_uri(self.output_uri, METRICS_FILE)

    @property
    def logs_uri(self) -> str:
        return join_uri(self.output_uri, LOGS_DIR)

    @property
    def checkpoints_uri(self) -> str:
        return join_uri(self.output_uri, CHECKPOINTS_DIR)

    @property
    def run_record_uri(self) -> str:
        return join_uri(self.output_uri, RUN_RECORD_FILE)

    def status(self) -> ArtifactsStatus:
        """The job's ``status.artifacts``."""
        return ArtifactsStatus(
            model_uri=self.model_uri,
            adapter_uri=self.adapter_uri,
            metrics_uri=None if self.report_uri else self.metrics_uri,
            logs_uri=None if self.report_uri else self.logs_uri,
            report_uri=self.report_uri,
        )


def finetune_artifacts(*, output_uri: str, base_model_uri: str, method: Method | None) -> RunArtifacts:
    """The artifacts of a fine-tuning run (also a distillation, whose ``method`` is None)."""
    model = join_uri(output_uri, MODEL_DIR) if writes_full_model(method) else None
    adapter = join_uri(output_uri, ADAPTER_DIR) if trains_adapter(method) else None
    # An unmerged LoRA run has no full model of its own: serve the base with the adapter.
    served = ServedModel(model) if model is not None else ServedModel(base_model_uri, adapter)
    return RunArtifacts(output_uri=output_uri, served=served, model_uri=model, adapter_uri=adapter)


def compress_artifacts(*, output_uri: str) -> RunArtifacts:
    model = join_uri(output_uri, MODEL_DIR)
    return RunArtifacts(
        output_uri=output_uri,
        served=ServedModel(model),
        model_uri=model,
        report_uri=join_uri(output_uri, REPORT_FILE),
    )


def artifacts_of(job: FineTuneJob | CompressJob) -> RunArtifacts:
    if isinstance(job, CompressJob):
        return compress_artifacts(output_uri=job.spec.output.uri)
    return finetune_artifacts(
        output_uri=job.spec.output.uri, base_model_uri=str(job.spec.model.uri), method=job.spec.method
    )


class AdapterOnlyUpstream(ValueError):
    """A CompressJob's ``fromFineTuneJob`` names a LoRA run that keeps only its adapter."""


def compressible_model_uri(upstream: FineTuneJob) -> str:
    """The model a CompressJob with ``model.fromFineTuneJob: <upstream>`` compresses.

    Raises :class:`AdapterOnlyUpstream` (its message names both fixes) when the upstream run
    writes no full model."""
    model = artifacts_of(upstream).model_uri
    if model is None:
        raise AdapterOnlyUpstream(
            f"FineTuneJob {upstream.metadata.name} wrote only a LoRA adapter (method.mergeAdapter: false); "
            "compression needs a full model: set mergeAdapter to true there, or set model.uri here"
        )
    return model
