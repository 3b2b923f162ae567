"""From ``kubectl apply`` to a served answer on a real control plane: the operator under its own
ServiceAccount, the real Job, Deployment and garbage-collector controllers and scheduler, the
process kubelet running the pods they create, MinIO holding model, data and results."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from kubetune.operator import render
from tests.cluster import scenario
from tests.cluster.conftest import OPERATOR_USER, OperatorProcess, wait_for
from tests.cluster.controlplane import ControlPlane
from tests.e2e.scenario import compressjob, finetunejob, keys, read_json, upload_inputs
from tests.minio import MinioBucket, MinioServer

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

FTJ, CJ = "finetunejobs", "compressjobs"


def runner(namespace: str, job: str) -> str:
    return f"system:serviceaccount:{namespace}:{job}-runner"


@pytest.fixture
def credentials(control_plane: ControlPlane, minio_server: MinioServer, namespace: str) -> str:
    """The Secret a user creates for the bucket; the operator only ever names it."""
    secret = minio_server.credentials_secret("s3-credentials", namespace)
    # The opt-in that lets a job name it (the operator checks the label, never the values).
    secret["metadata"]["labels"] = {render.LABEL_STORAGE_CREDENTIALS: "true"}
    scenario.create(control_plane, namespace, secret)
    return "s3-credentials"


@dataclass
class World:
    """What every scenario runs in: the operator, the node, a bucket holding the tiny base model
    and dataset, the user's Secret, and a fresh namespace enforcing Pod Security restricted."""

    operator: OperatorProcess
    kubelet: Any
    bucket: MinioBucket
    namespace: str
    model_uri: str
    data_uri: str

    @property
    def plane(self) -> ControlPlane:
        return self.operator.plane

    def start(self, name: str, steps: int, **spec: Any) -> None:
        """A FineTuneJob of ``steps`` steps on the tiny model and dataset (``spec`` overrides)."""
        job = finetunejob(name, self.bucket, self.model_uri, self.data_uri, **spec)
        job["spec"]["hyperparameters"]["maxSteps"] = steps
        scenario.create(self.plane, self.namespace, job)


@pytest.fixture
def world(
    operator_process: OperatorProcess,
    kubelet: Any,
    minio_bucket: MinioBucket,
    credentials: str,
    namespace: str,
    tmp_path: Path,
) -> World:
    model_uri, data_uri = upload_inputs(minio_bucket, tmp_path)
    return World(operator_process, kubelet, minio_bucket, namespace, model_uri, data_uri)


def training_process(kubelet: Any, namespace: str, pod: str) -> psutil.Process:
    """The training process torchrun started in ``pod`` (a child of the pod's main process)."""
    procs = kubelet.processes(namespace, pod)
    pids = {p.pid for p in procs}
    workers = [p for p in procs if p.ppid() in pids and "finetune" in p.cmdline()]
    assert len(workers) == 1, [p.cmdline() for p in procs]
    return workers[0]


def test_lora_on_two_workers_is_trained_served_through_the_real_controllers_and_compressed(
    world: World,
) -> None:
    plane, namespace, bucket = world.plane, world.namespace, world.bucket
    model_uri, data_uri = world.model_uri, world.data_uri
    tune = finetunejob("tune", bucket, model_uri, data_uri, serve={"enabled": True})
    tune["spec"]["method"]["mergeAdapter"] = True  # the CompressJob below needs a full model
    scenario.create(plane, namespace, tune)
    scenario.create(
        plane, namespace, compressjob("tune-int8", bucket, data_uri, model={"fromFineTuneJob": "tune"})
    )

    scenario.reach(plane, CJ, namespace, "tune-int8", "Waiting", timeout=60)
    done = scenario.reach(plane, FTJ, namespace, "tune", "Succeeded", timeout=600)

    assert done["restarts"] == 0
    assert scenario.created_by(plane, OPERATOR_USER, namespace, "jobs")[:2] == [
        "tune-validate",
        "tune-train-r0",
    ]
    assert {c["type"]: c["status"] for c in done["conditions"]}["Complete"] == "True"
    reasons = [e["reason"] for e in scenario.events(plane, namespace, "tune")]
    assert reasons.index("Validating") < reasons.index("Running") < reasons.index("Succeeded"), reasons
    # Rank 0 reported progress with the runner's own token, through the real authorizer.
    assert scenario.status_patches_by(plane, runner(namespace, "tune"), namespace, FTJ, "tune") >= 2
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == 8

    run = "runs/tune"
    files = keys(bucket, run)
    assert {"checkpoints/step-4/_COMMITTED.json", "checkpoints/step-8/_COMMITTED.json"} <= files
    assert {"model/config.json", "model/model.safetensors", "adapter/adapter_config.json"} <= files
    record = read_json(bucket, f"{run}/run.json")
    assert record["status"] == "succeeded"
    assert record["world"]["nodes"] == 2

    # The serving Deployment becomes Available through the real deployment controller.
    serving = wait_for(
        lambda: (s := scenario.status(plane, FTJ, namespace, "tune").get("serving") or {}).get("ready") and s,
        timeout=300,
        what="serving ready",
    )
    deployment = scenario.get(plane, "deployments", namespace, "tune-serve")
    assert deployment is not None
    available = {c["type"]: c["status"] for c in deployment["status"]["conditions"]}
    assert available["Available"] == "True"
    assert serving["url"] == f"http://tune-serve.{namespace}.svc:8000/v1"
    client = openai.OpenAI(base_url=world.kubelet.url(serving["url"]), api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="tune", messages=[{"role": "user", "content": "a b c d"}], max_tokens=8, temperature=0
    )
    assert answer.model == "tune"
    assert answer.usage is not None
    assert answer.usage.completion_tokens >= 1

    compressed = scenario.reach(plane, CJ, namespace, "tune-int8", "Succeeded", timeout=600)
    assert compressed["sourceModelUri"] == f"{bucket.uri}/{run}/model"
    results = compressed.get("results") or {}
    assert results.get("originalSizeBytes", 0) > results.get("compressedSizeBytes", 0) > 0, compressed


def test_a_missing_dataset_fails_validation_naming_the_uri_and_is_never_retried(
    world: World,
) -> None:
    plane, namespace, bucket = world.plane, world.namespace, world.bucket
    model_uri = world.model_uri
    missing = f"{bucket.uri}/data/does-not-exist.jsonl"
    scenario.create(plane, namespace, finetunejob("nodata", bucket, model_uri, missing))

    failed = scenario.reach(plane, FTJ, namespace, "nodata", "Failed", timeout=240)

    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] in ("StorageError", "InvalidInput")
    assert missing in condition["message"]
    assert failed["restarts"] == 0
    assert scenario.created_by(plane, OPERATOR_USER, namespace, "jobs") == ["nodata-validate"]
    # The real Job controller ran one pod: podFailurePolicy FailJob on exit code 3.
    pods = scenario.names(plane, "pods", namespace, "batch.kubernetes.io/job-name=nodata-validate")
    assert len(pods) == 1
    validation = scenario.get(plane, "jobs", namespace, "nodata-validate")
    assert validation is not None
    job_conditions = {c["type"]: c.get("reason") for c in validation["status"]["conditions"]}
    assert job_conditions.get("Failed") == "PodFailurePolicy"


def test_a_killed_worker_fails_the_gang_and_the_replacement_resumes_from_the_newest_checkpoint(
    world: World,
) -> None:
    plane, namespace, bucket = world.plane, world.namespace, world.bucket
    steps = 24
    world.start("resume", steps)
    run = "runs/resume"

    wait_for(
        lambda: "checkpoints/step-4/_COMMITTED.json" in keys(bucket, run),
        timeout=300,
        what="a checkpoint",
    )
    (pod,) = scenario.names(
        plane,
        "pods",
        namespace,
        "batch.kubernetes.io/job-name=resume-train-r0,batch.kubernetes.io/job-completion-index=1",
    )
    training_process(world.kubelet, namespace, pod).send_signal(signal.SIGKILL)

    done = scenario.reach(plane, FTJ, namespace, "resume", "Succeeded", timeout=600)

    assert done["restarts"] == 1
    assert scenario.created_by(plane, OPERATOR_USER, namespace, "jobs") == [
        "resume-validate",
        "resume-train-r0",
        "resume-train-r1",
    ]
    assert scenario.get(plane, "jobs", namespace, "resume-train-r0") is None
    record = read_json(bucket, f"{run}/run.json")
    resumed = record["resumed_from"]
    assert resumed is not None
    assert 4 <= resumed["step"] < steps
    assert record["global_step"] == record["total_steps"] == steps


def test_suspend_stops_the_gang_and_resume_continues_it(
    world: World,
) -> None:
    plane, namespace = world.plane, world.namespace
    world.start("pause", 400)
    scenario.reach(plane, FTJ, namespace, "pause", "Running", timeout=300)

    patch = {"spec": {"suspend": True}}
    assert plane.request_patch(scenario.path(FTJ, namespace, "pause"), patch)[0] == 200
    scenario.reach(plane, FTJ, namespace, "pause", "Suspended", timeout=120)
    # The real Job controller deletes a suspended Job's pods.
    wait_for(
        lambda: not scenario.names(plane, "pods", namespace, "batch.kubernetes.io/job-name=pause-train-r0"),
        timeout=120,
        what="the gang's pods to go",
    )
    train = scenario.get(plane, "jobs", namespace, "pause-train-r0")
    assert train is not None
    assert train["spec"]["suspend"] is True

    assert plane.request_patch(scenario.path(FTJ, namespace, "pause"), {"spec": {"suspend": False}})[0] == 200
    scenario.reach(plane, FTJ, namespace, "pause", "Running", timeout=120)
    wait_for(
        lambda: (
            len(scenario.names(plane, "pods", namespace, "batch.kubernetes.io/job-name=pause-train-r0")) == 2
        ),
        timeout=120,
        what="the gang to run again",
    )


def test_a_deadline_fails_the_job_and_ttl_lets_the_garbage_collector_remove_its_children(
    world: World,
) -> None:
    plane, namespace = world.plane, world.namespace
    world.start("late", 400, activeDeadlineSeconds=25, ttlSecondsAfterFinished=1)

    failed = scenario.reach(plane, FTJ, namespace, "late", "Failed", timeout=240)
    assert {c["type"]: c.get("reason") for c in failed["conditions"]}["Failed"] == "DeadlineExceeded"
    # ttlSecondsAfterFinished: the operator deletes the job's children and the real garbage
    # collector removes what they own (the gang's pods).
    wait_for(
        lambda: not scenario.names(plane, "jobs", namespace) and not scenario.names(plane, "pods", namespace),
        timeout=180,
        what="children and pods to be collected",
    )


def test_an_operator_restart_mid_run_creates_no_duplicate_children(
    world: World,
) -> None:
    plane, namespace = world.plane, world.namespace
    world.start("steady", 16)
    scenario.reach(plane, FTJ, namespace, "steady", "Running", timeout=300)

    world.operator.restart()

    scenario.reach(plane, FTJ, namespace, "steady", "Succeeded", timeout=600)
    jobs = scenario.created_by(plane, OPERATOR_USER, namespace, "jobs")
    assert jobs == ["steady-validate", "steady-train-r0"]
    assert len(scenario.created_by(plane, OPERATOR_USER, namespace, "configmaps")) == 1
