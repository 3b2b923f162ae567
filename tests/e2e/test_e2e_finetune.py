"""From ``kubectl apply`` to a served answer: the real operator against the emulated API server,
the test-side kubelet running exactly the pods it rendered, the runtimes in those pods, and the
S3 server holding model, data and results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.kubelet import Kubelet
from tests.e2e.scenario import (
    CJ,
    FTJ,
    compressjob,
    create_credentials,
    created,
    finetunejob,
    keys,
    phases,
    progress_patches,
    reach,
    read_json,
    status,
    upload_inputs,
)
from tests.e2e.scenario import (
    kubelet_options as scenario_kubelet_options,
)
from tests.kube import KubeEmulator, Operator, create, eventually
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def kubelet_options() -> dict[str, Any]:
    return scenario_kubelet_options()


async def test_lora_zero2_on_two_workers_is_trained_served_and_then_compressed(
    kube: KubeEmulator, operator: Operator, kubelet: Kubelet, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model_uri, data_uri = upload_inputs(s3_bucket, tmp_path)
    await create_credentials(kube)
    tune = finetunejob("tune", s3_bucket, model_uri, data_uri, serve={"enabled": True})
    tune["spec"]["method"]["mergeAdapter"] = True  # the CompressJob below needs a full model
    await create(kube, FTJ, tune)
    # Applied at the same time, as in a GitOps commit: it waits for the FineTuneJob.
    await create(kube, CJ, compressjob("tune-int8", s3_bucket, data_uri, model={"fromFineTuneJob": "tune"}))

    await reach(kube, CJ, "tune-int8", "Waiting", timeout=60)
    done = await reach(kube, FTJ, "tune", "Succeeded", timeout=600)

    # The lifecycle the user saw, with one attempt and no restarts.
    assert phases(kube, FTJ, "tune")[-3:] == ["Validating", "Running", "Succeeded"]
    assert done["restarts"] == 0
    assert created(kube, "jobs")[:2] == ["tune-validate", "tune-train-r0"]
    assert {c["type"]: c["status"] for c in done["conditions"]}["Complete"] == "True"

    # Rank 0 reported progress while training (not the operator), ending at the last step.
    reports = progress_patches(kube, FTJ, "tune")
    steps = [p["step"] for _, p in reports]
    assert len(reports) >= 2, reports
    assert steps == sorted(steps)
    assert steps[0] < 8
    assert steps[-1] == 8
    assert done["progress"]["step"] == 8
    assert done["progress"]["totalSteps"] == 8
    assert done["progress"]["loss"] > 0

    # Checkpoints (each committed after its files), the adapter, the merged model, the records.
    run = "runs/tune"
    files = keys(s3_bucket, run)
    assert {"checkpoints/step-4/_COMMITTED.json", "checkpoints/step-8/_COMMITTED.json"} <= files
    assert {"model/config.json", "model/model.safetensors", "adapter/adapter_config.json"} <= files
    assert {"metrics.json", "run.json"} <= files
    assert read_json(s3_bucket, f"{run}/checkpoints/step-8/_COMMITTED.json")["step"] == 8
    assert read_json(s3_bucket, f"{run}/metrics.json")["global_step"] == 8
    record = read_json(s3_bucket, f"{run}/run.json")
    assert record["status"] == "succeeded"
    assert record["world"]["nodes"] == 2
    assert record["resumed_from"] is None
    assert done["artifacts"]["modelUri"] == f"{s3_bucket.uri}/{run}/model"

    # The serving Deployment's pod loads the model from S3 and answers through the OpenAI client.
    serving = await eventually(
        lambda: (s := status(kube, FTJ, "tune").get("serving") or {}).get("ready") and s,
        timeout=240,
        what="serving ready",
    )
    assert serving["url"] == "http://tune-serve.default.svc:8000/v1"
    client = openai.AsyncOpenAI(base_url=kubelet.url(serving["url"]), api_key="unused", max_retries=0)
    async with client:
        answer = await client.chat.completions.create(
            model="tune",
            messages=[{"role": "user", "content": "a b c d"}],
            max_tokens=8,
            temperature=0,
        )
    assert answer.model == "tune"
    assert answer.choices[0].message.role == "assistant"
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.usage is not None
    assert answer.usage.completion_tokens >= 1

    # The CompressJob starts once its FineTuneJob succeeded, on that job's model.
    compressed = await reach(kube, CJ, "tune-int8", "Succeeded", timeout=600)
    assert phases(kube, CJ, "tune-int8")[:1] == ["Waiting"]
    assert compressed["sourceModelUri"] == f"{s3_bucket.uri}/{run}/model"
    assert {"model/config.json", "compression_report.json", "run.json"} <= keys(s3_bucket, "runs/tune-int8")
    results = compressed.get("results") or {}
    assert results.get("originalSizeBytes", 0) > results.get("compressedSizeBytes", 0) > 0, compressed
    assert results["sizeRatio"] > 1
    assert set(results["metricsBefore"]) == set(results["metricsAfter"]) >= {"eval_loss"}


async def test_a_missing_dataset_fails_validation_with_its_uri_and_is_not_retried(
    kube: KubeEmulator, operator: Operator, kubelet: Kubelet, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model_uri, _ = upload_inputs(s3_bucket, tmp_path)
    await create_credentials(kube)
    missing = f"{s3_bucket.uri}/data/does-not-exist.jsonl"
    await create(kube, FTJ, finetunejob("nodata", s3_bucket, model_uri, missing))

    failed = await reach(kube, FTJ, "nodata", "Failed", timeout=180)

    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["status"] == "True"
    assert condition["reason"] in ("StorageError", "InvalidInput")
    assert missing in condition["message"]
    assert missing in failed["message"]
    assert failed["restarts"] == 0
    # Only the validation Job ever ran, and it ran one pod: exit code 3 is never retried.
    assert created(kube, "jobs") == ["nodata-validate"]
    assert [p for p in created(kube, "pods") if p.startswith("nodata-validate-")] == kubelet.pod_names(
        "default", **{"batch.kubernetes.io/job-name": "nodata-validate"}
    )
    assert len(kubelet.pod_names("default", **{"batch.kubernetes.io/job-name": "nodata-validate"})) == 1
