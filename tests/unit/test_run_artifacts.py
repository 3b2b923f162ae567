"""The artifact rule, decided once: what a job writes, what is served, what a CompressJob compresses."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import KINDS, CompressJob, FineTuneJob
from kubetune.run.artifacts import AdapterOnlyUpstream, artifacts_of, compressible_model_uri

pytestmark = pytest.mark.unit


def finetune(method: dict[str, Any] | None) -> FineTuneJob:
    spec: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "format": "text"},
        "hyperparameters": {"epochs": 1},
        "output": {"uri": "s3://runs/job/"},
    }
    if method is not None:
        spec["method"] = method
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "up"},
        "spec": spec,
    }
    job = KINDS["FineTuneJob"].model_validate(doc)
    assert isinstance(job, FineTuneJob)
    return job


@pytest.mark.parametrize(
    ("method", "model", "adapter", "served"),
    [
        ({"type": "full"}, "s3://runs/job/model", None, ("s3://runs/job/model", None)),
        (None, "s3://runs/job/model", "s3://runs/job/adapter", ("s3://runs/job/model", None)),
        (
            {"type": "lora", "mergeAdapter": True},
            "s3://runs/job/model",
            "s3://runs/job/adapter",
            ("s3://runs/job/model", None),
        ),
        (
            {"type": "lora", "mergeAdapter": False},
            None,
            "s3://runs/job/adapter",
            ("s3://models/base", "s3://runs/job/adapter"),
        ),
    ],
    ids=["full", "lora-default-merges", "lora-merged", "lora-adapter-only"],
)
def test_a_finetune_job_writes_and_serves(
    method: dict[str, Any] | None, model: str | None, adapter: str | None, served: tuple[str, str | None]
) -> None:
    artifacts = artifacts_of(finetune(method))

    assert (artifacts.model_uri, artifacts.adapter_uri) == (model, adapter)
    assert (artifacts.served.model_uri, artifacts.served.adapter_uri) == served
    status = artifacts.status().model_dump(by_alias=True, exclude_none=True)
    assert status == {
        **({"modelUri": model} if model else {}),
        **({"adapterUri": adapter} if adapter else {}),
        "metricsUri": "s3://runs/job/metrics.json",
        "logsUri": "s3://runs/job/logs",
    }


def test_a_compress_job_reports_its_model_and_report() -> None:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CompressJob",
        "metadata": {"name": "small"},
        "spec": {
            "model": {"uri": "s3://models/base"},
            "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "format": "text"},
            "output": {"uri": "s3://runs/small"},
            "quantization": {"method": "rtn", "scheme": "W8A16"},
        },
    }
    job = KINDS["CompressJob"].model_validate(doc)
    assert isinstance(job, CompressJob)

    status = artifacts_of(job).status().model_dump(by_alias=True, exclude_none=True)

    assert status == {
        "modelUri": "s3://runs/small/model",
        "reportUri": "s3://runs/small/compression_report.json",
    }


def test_compression_takes_the_upstream_full_model_and_refuses_an_adapter_only_run() -> None:
    assert compressible_model_uri(finetune({"type": "full"})) == "s3://runs/job/model"
    with pytest.raises(
        AdapterOnlyUpstream, match=r"FineTuneJob up wrote only a LoRA adapter.*set model.uri here"
    ):
        compressible_model_uri(finetune({"type": "lora", "mergeAdapter": False}))
