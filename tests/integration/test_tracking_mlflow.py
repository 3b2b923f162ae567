"""MLflow tracking end to end: real runtimes (``torchrun`` + DeepSpeed on CPU, the compress
process) reading run plans rendered from jobs with ``spec.tracking.mlflow``, writing to the moto
S3 server and logging to a real MLflow tracking server on loopback; everything is read back
through ``MlflowClient``, as a user of the tracking server would see it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from kubetune.api.resources import CompressJob, FineTuneJob
from kubetune.run.plan import dumps_plan, plan_compress, plan_finetune
from kubetune.storage import open_store
from tests.integration.test_compress_support import compress_job, run_compress
from tests.integration.test_finetune_support import free_port, run_finetune, run_single, tiny_causal_lm
from tests.mlflow_server import MlflowServer
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UID_TAG = "kubetune.io/uid"


def finetune_job(
    name: str, uid: str, *, model: str, data: str, output: str, tracking: dict[str, Any]
) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {
                "model": {"uri": model},
                "dataset": {"train": {"uri": data}, "evalFraction": 0.1},
                "method": {"type": "full"},
                "hyperparameters": {
                    "maxSteps": 8,
                    "learningRate": 0.01,
                    "perDeviceBatchSize": 4,
                    "maxSeqLength": 64,
                    "loggingEverySteps": 2,
                    "evalEverySteps": 4,
                },
                "deepspeed": {"zeroStage": 2},
                "resources": {"processesPerWorker": 2},
                "checkpoint": {"everySteps": 100},
                "output": {"uri": output},
                "tracking": {"mlflow": tracking},
            },
        }
    )


def upload_tiny_model(tmp: Path, bucket: S3Bucket) -> tuple[str, str]:
    base, data = tiny_causal_lm(tmp / "inputs")
    store = open_store(bucket.uri)
    store.upload_dir(base, f"{bucket.uri}/models/base")
    store.upload_file(data, f"{bucket.uri}/data/train.jsonl")
    return f"{bucket.uri}/models/base", f"{bucket.uri}/data/train.jsonl"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def the_run(client: MlflowClient, experiment: str) -> Run:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"expected one run (rank 0 only), found {len(runs)}"
    return runs[0]


def tracking_records(progress: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    return [line["tracking"] for line in lines if "tracking" in line]


def test_a_finetune_run_logs_params_metrics_and_a_registered_version(
    tmp_path: Path, s3_bucket: S3Bucket, mlflow_server: MlflowServer
) -> None:
    model, data = upload_tiny_model(tmp_path, s3_bucket)
    name, uid, registered = unique("tune"), str(uuid.uuid4()), unique("tiny-lm")
    output = f"{s3_bucket.uri}/runs/{name}"
    job = finetune_job(
        name,
        uid,
        model=model,
        data=data,
        output=output,
        tracking={"uri": mlflow_server.uri, "registeredModel": registered},
    )
    plan = tmp_path / "plan.json"
    plan.write_text(dumps_plan(plan_finetune(job)), encoding="utf-8")
    progress = tmp_path / "progress.jsonl"
    run_finetune(plan, tmp_path, nproc=2, env={**s3_bucket.env(), "KUBETUNE_PROGRESS": f"file:{progress}"})

    client = MlflowClient(mlflow_server.uri)
    run = the_run(client, f"default/{name}")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == name
    # Tags: the job, and where its artifacts are (object storage, not MLflow).
    tags = run.data.tags
    assert tags[UID_TAG] == uid
    assert tags["kubetune.io/namespace"] == "default"
    assert tags["kubetune.io/name"] == name
    assert tags["kubetune.io/artifacts.model"] == f"{output}/model"
    assert tags["kubetune.io/artifacts.metrics"] == f"{output}/metrics.json"
    # Params: the resolved settings, the spec's and the runtime's.
    params = run.data.params
    assert params["hyperparameters.learningRate"] == "0.01"
    assert params["hyperparameters.maxSteps"] == "8"
    assert params["method.type"] == "full"
    assert params["world.processes_per_worker"] == "2"
    assert params["runtime.precision"] == "fp32"
    assert params["runtime.deepspeed.zero_optimization.stage"] == "2"
    # Metrics: the training loss at every logging step, once each (one rank logs), and evaluations.
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 4, 6, 8]
    assert all(m.value > 0 for m in loss)
    assert loss[-1].value < loss[0].value
    eval_loss = client.get_metric_history(run.info.run_id, "eval_loss")
    assert {m.step for m in eval_loss} >= {4, 8}
    assert "learning_rate" in run.data.metrics
    # The plan is an artifact, with no credentials in it.
    plan_artifact = Path(
        client.download_artifacts(run.info.run_id, "kubetune/plan.json", str(tmp_path / "dl"))
    )
    logged_plan = json.loads(plan_artifact.read_text())
    assert logged_plan["job"]["uid"] == uid
    assert logged_plan["tracking"]["experiment"] == f"default/{name}"
    text = plan_artifact.read_text()
    assert s3_bucket.env()["AWS_SECRET_ACCESS_KEY"] not in text
    # No weights were uploaded to MLflow: the run's artifacts are the plan alone.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["kubetune"]
    # The registered version points at the model in object storage and carries the job's uid.
    versions = client.search_model_versions(f"name = '{registered}'")
    assert len(versions) == 1
    version = versions[0]
    assert version.source == f"{output}/model"
    assert version.run_id == run.info.run_id
    assert version.tags[UID_TAG] == uid
    # status.tracking (through the progress reporter) names the run and the version.
    records = tracking_records(progress)
    assert records[-1] == {
        "experimentId": run.info.experiment_id,
        "runId": run.info.run_id,
        "modelVersion": version.version,
    }


def test_a_compress_job_logs_its_report_and_tags_the_version_with_it(
    tmp_path: Path, s3_bucket: S3Bucket, mlflow_server: MlflowServer
) -> None:
    model, data = upload_tiny_model(tmp_path, s3_bucket)
    name, uid, registered = unique("squeeze"), str(uuid.uuid4()), unique("tiny-lm-pruned")
    output = f"{s3_bucket.uri}/runs/{name}"
    base = compress_job(
        model_uri=model,
        train_uri=data,
        output_uri=output,
        name=name,
        uid=uid,
        pruning={"method": "magnitude", "sparsity": 0.5},
        calibration={"samples": 8, "maxSeqLength": 64},
    )
    doc = base.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["tracking"] = {
        "mlflow": {"uri": mlflow_server.uri, "experiment": f"compress/{name}", "registeredModel": registered}
    }
    job = CompressJob.model_validate(doc)
    plan = tmp_path / "plan.json"
    assert job.spec.model.uri is not None
    plan.write_text(dumps_plan(plan_compress(job, model_uri=job.spec.model.uri)), encoding="utf-8")
    result = run_compress(plan, tmp_path, env=s3_bucket.env())
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]

    client = MlflowClient(mlflow_server.uri)
    run = the_run(client, f"compress/{name}")
    assert run.info.status == "FINISHED"
    assert run.data.tags[UID_TAG] == uid
    assert run.data.tags["kubetune.io/artifacts.report"] == f"{output}/compression_report.json"
    assert run.data.params["compression.pruning.method"] == "magnitude"
    report_path = client.download_artifacts(
        run.info.run_id, "kubetune/compression_report.json", str(tmp_path / "dl")
    )
    report = json.loads(Path(report_path).read_text())
    stored = json.loads(open_store(output).read_bytes(f"{output}/compression_report.json"))
    assert report == stored
    metrics = run.data.metrics
    assert metrics["sizeRatio"] == pytest.approx(report["size_ratio"])
    assert metrics["originalSizeBytes"] == report["original"]["size_bytes"]
    assert metrics["metricsAfter.perplexity"] == pytest.approx(report["compressed"]["metrics"]["perplexity"])
    (version,) = client.search_model_versions(f"name = '{registered}'")
    assert version.source == f"{output}/model"
    assert version.tags[UID_TAG] == uid
    assert float(version.tags["kubetune.io/compression.sizeRatio"]) == pytest.approx(report["size_ratio"])
    assert float(version.tags["kubetune.io/compression.metricsBefore.perplexity"]) == pytest.approx(
        report["original"]["metrics"]["perplexity"]
    )


def test_a_tracking_server_that_is_down_never_fails_the_run_and_is_reported(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    model, data = upload_tiny_model(tmp_path, s3_bucket)
    name = unique("offline")
    output = f"{s3_bucket.uri}/runs/{name}"
    nobody = f"http://127.0.0.1:{free_port()}"  # a port with nothing listening
    job = finetune_job(
        name,
        str(uuid.uuid4()),
        model=model,
        data=data,
        output=output,
        tracking={"uri": nobody, "registeredModel": "never-registered"},
    )
    plan = tmp_path / "plan.json"
    plan.write_text(dumps_plan(plan_finetune(job)), encoding="utf-8")
    progress = tmp_path / "progress.jsonl"
    result = run_single(plan, tmp_path, env={**s3_bucket.env(), "KUBETUNE_PROGRESS": f"file:{progress}"})

    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    store = open_store(output)
    assert store.exists(f"{output}/model/config.json")
    assert json.loads(store.read_bytes(f"{output}/run.json"))["status"] == "succeeded"
    (degraded,) = tracking_records(progress)
    assert degraded["degraded"] is True
    assert nobody in degraded["message"]
    assert "tracking is off" in degraded["message"]
    assert "MLflow tracking is off for the rest of this run" in result.stdout + result.stderr
