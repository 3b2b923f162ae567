"""What a job logs to MLflow, as pure functions of the run plan and what the runtime resolved.

Nothing here talks to a server, so every rule about names, limits and values is testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Final

from kubetune.run.artifacts import RunArtifacts, compress_artifacts, finetune_artifacts
from kubetune.run.plan import RunPlan

# MLflow's limits (mlflow.utils.validation): longer params are refused, not truncated, so they are
# shortened here; a batch takes at most 100 params or tags and 1000 metrics.
MAX_PARAM_LENGTH: Final = 6000
MAX_TAG_LENGTH: Final = 8000
MAX_KEY_LENGTH: Final = 250
PARAMS_PER_BATCH: Final = 100
METRICS_PER_BATCH: Final = 1000

TAG_PREFIX: Final = "kubetune.io/"
UID_TAG: Final = TAG_PREFIX + "uid"
PLAN_ARTIFACT: Final = "kubetune/plan.json"
REPORT_ARTIFACT: Final = "kubetune/compression_report.json"


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a.b", 1)``; lists stay whole values (``["q_proj", "v_proj"]``)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, value


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def run_params(plan: RunPlan, resolved: Mapping[str, Any]) -> dict[str, str]:
    """The run's settings as MLflow params: the plan's (spec names, defaults applied) and what
    only the runtime knows (``resolved``: precision, accelerator, the completed DeepSpeed config)
    under ``runtime.``. Every key is a dotted path, so params of different jobs line up."""
    sections: dict[str, Any] = {
        "kind": plan.kind,
        "model": {"uri": plan.model_uri},
        "task": plan.task.model_dump(mode="json", by_alias=True, exclude_none=True),
        "dataset": plan.dataset.model_dump(mode="json", by_alias=True, exclude_none=True),
        "world": plan.world.model_dump(mode="json", by_alias=True),
        "runtime": dict(resolved),
    }
    for name, model in (
        ("method", plan.method),
        ("hyperparameters", plan.hyperparameters),
        ("checkpoint", plan.checkpoint),
        ("compression", plan.compression),
    ):
        if model is not None:
            sections[name] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return {key[:MAX_KEY_LENGTH]: _param_value(value) for key, value in flatten(sections)}


def artifacts(plan: RunPlan) -> RunArtifacts:
    """What the run writes to object storage (the one rule in :mod:`kubetune.run.artifacts`)."""
    if plan.kind == "compress":
        return compress_artifacts(output_uri=plan.output_uri)
    return finetune_artifacts(output_uri=plan.output_uri, base_model_uri=plan.model_uri, method=plan.method)


def artifact_tags(written: RunArtifacts) -> dict[str, str]:
    """Where the results are: MLflow records the object-storage URIs, it never holds the weights."""
    uris = {
        "model": written.model_uri,
        "adapter": written.adapter_uri,
        "report": written.report_uri,
        "metrics": None if written.report_uri else written.metrics_uri,
        "logs": None if written.report_uri else written.logs_uri,
        "checkpoints": None if written.report_uri else written.checkpoints_uri,
        "runRecord": written.run_record_uri,
        "output": written.output_uri,
    }
    return {f"{TAG_PREFIX}artifacts.{name}": uri for name, uri in uris.items() if uri is not None}


def job_tags(plan: RunPlan) -> dict[str, str]:
    """The job a run belongs to; the uid tag finds the run again after a gang restart."""
    job = plan.job
    tags = {
        TAG_PREFIX + "kind": job.kind,
        TAG_PREFIX + "namespace": job.namespace,
        TAG_PREFIX + "name": job.name,
    }
    if job.uid:
        tags[UID_TAG] = job.uid
    return tags


def run_tags(plan: RunPlan) -> dict[str, str]:
    tags = {**job_tags(plan), **artifact_tags(artifacts(plan))}
    return {key: value[:MAX_TAG_LENGTH] for key, value in tags.items()}


def registered_source(plan: RunPlan) -> str:
    """What a model version points at: the full model, or for LoRA that keeps only its adapter,
    the adapter (the version's tags name the base model it applies to)."""
    written = artifacts(plan)
    source = written.model_uri or written.adapter_uri
    assert source is not None, "every run writes a model or an adapter"
    return source


def numeric_metrics(logs: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a Trainer log entry (MLflow takes no strings and no NaN in JSON)."""
    out: dict[str, float] = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number):
            out[str(key)[:MAX_KEY_LENGTH]] = number
    return out


def compression_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """A CompressJob's headline figures (``status.results`` wire form) as metrics:
    ``sizeRatio``, ``originalSizeBytes``..., ``metricsBefore.perplexity``, ``metricsAfter.perplexity``."""
    return numeric_metrics(dict(flatten(results)))


def version_tags(plan: RunPlan, results: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags of a registered model version: the job (uid included) and, for a CompressJob, the
    compression report's headline figures, so the registry alone can compare versions."""
    tags = dict(job_tags(plan))
    written = artifacts(plan)
    if written.model_uri is None:
        tags[TAG_PREFIX + "baseModel"] = plan.model_uri
    for key, value in compression_metrics(results or {}).items():
        tags[f"{TAG_PREFIX}compression.{key}"] = repr(value) if not value.is_integer() else str(int(value))
    return tags
