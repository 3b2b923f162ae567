"""A gang restart end to end: one training process is SIGKILLed (as the OOM killer or a lost node
would), the Job controller fails the whole gang, the operator replaces the Job, and the new
attempt resumes from the newest committed checkpoint in S3 and finishes the planned steps."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.kubelet import Kubelet
from tests.e2e.scenario import (
    FTJ,
    JOBS,
    NS,
    create_credentials,
    created,
    finetunejob,
    keys,
    object_exists,
    progress_patches,
    reach,
    read_json,
    upload_inputs,
)
from tests.e2e.scenario import (
    kubelet_options as scenario_kubelet_options,
)
from tests.kube import KubeEmulator, Operator, create
from tests.s3server import S3Bucket

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 24


@pytest.fixture
def kubelet_options() -> dict[str, Any]:
    return scenario_kubelet_options()


def training_process(kubelet: Kubelet, pod: str) -> psutil.Process:
    """The training process torchrun started in ``pod`` (a child of the pod's main process)."""
    procs = kubelet.processes(NS, pod)
    pids = {p.pid for p in procs}
    workers = [p for p in procs if p.ppid() in pids and "finetune" in p.cmdline()]
    assert len(workers) == 1, [p.cmdline() for p in procs]
    return workers[0]


async def test_a_worker_killed_after_a_checkpoint_is_replaced_and_the_run_resumes_from_it(
    kube: KubeEmulator, operator: Operator, kubelet: Kubelet, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model_uri, data_uri = upload_inputs(s3_bucket, tmp_path)
    await create_credentials(kube)
    job = finetunejob("resume", s3_bucket, model_uri, data_uri)
    job["spec"]["hyperparameters"]["maxSteps"] = STEPS
    await create(kube, FTJ, job)
    run = "runs/resume"

    await object_exists(s3_bucket, f"{run}/checkpoints/step-4/_COMMITTED.json", timeout=300)
    labels = {
        "batch.kubernetes.io/job-name": "resume-train-r0",
        "batch.kubernetes.io/job-completion-index": "1",
    }
    (pod,) = kubelet.pod_names(NS, **labels)
    training_process(kubelet, pod).send_signal(signal.SIGKILL)

    done = await reach(kube, FTJ, "resume", "Succeeded", timeout=600)

    # The operator replaced the failed gang once; the failed Job is gone.
    assert done["restarts"] == 1
    assert created(kube, "jobs") == ["resume-validate", "resume-train-r0", "resume-train-r1"]
    assert "resume-train-r0" not in kube.names(JOBS, NS)
    events = [kube.get("v1/events", NS, name) or {} for name in kube.names("v1/events", NS)]
    restarting = [e for e in events if e.get("reason") == "Restarting"]
    assert len(restarting) == 1
    assert restarting[0]["message"].startswith("attempt 0 failed")

    # The second attempt started from a checkpoint committed before the kill, and ran to the end.
    record = read_json(s3_bucket, f"{run}/run.json")
    assert record["status"] == "succeeded"
    resumed = record["resumed_from"]
    assert resumed is not None
    assert 4 <= resumed["step"] < STEPS
    assert resumed["uri"] == f"{s3_bucket.uri}/{run}/checkpoints/step-{resumed['step']}"
    assert record["global_step"] == record["total_steps"] == STEPS
    assert read_json(s3_bucket, f"{run}/metrics.json")["global_step"] == STEPS
    assert read_json(s3_bucket, f"{run}/checkpoints/step-{STEPS}/_COMMITTED.json")["step"] == STEPS
    assert {"model/model.safetensors", "adapter/adapter_config.json"} <= keys(s3_bucket, run)
    assert done["progress"]["step"] == STEPS
    assert done["progress"]["totalSteps"] == STEPS
    # Rank 0 of the new attempt reported progress past the checkpoint it resumed from.
    assert any(p["step"] > resumed["step"] for _, p in progress_patches(kube, FTJ, "resume"))
