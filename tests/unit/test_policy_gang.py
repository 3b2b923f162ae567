"""Gang policy: the Job of the current attempt is created (after its rendezvous Service and
status access), older attempts go, and a complete attempt makes the job Succeeded with the
artifacts of the run contract."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import JobState
from kubetune.operator.policies import gang
from kubetune.operator.render import Job, render_plan
from kubetune.operator.settings import Settings
from tests.policies import ago, child, compressjob, condition, created, deleted, finetunejob, observe, wire

pytestmark = pytest.mark.unit

SUPPORT = ["Service/ft-workers", "Role/ft-runner", "RoleBinding/ft-runner"]
VALIDATED = {"phase": "Validating", "startTime": ago(100), "restarts": 0}


def run(job: Job, status: dict[str, Any], jobs: list[JobState]) -> Any:
    obs = observe(job, status, jobs=jobs)
    return gang.run(obs, obs.status, render_plan(job, Settings(), "ml", "s3://models/base"))


@pytest.mark.parametrize(
    ("status", "jobs", "creates", "deletes", "phase", "message"),
    [
        pytest.param(
            VALIDATED, [], [*SUPPORT, "Job/ft-train-r0"], [], "Running", "training started", id="start"
        ),
        pytest.param(
            VALIDATED,
            [child("ft-train-r0", active=2, ready=1)],
            SUPPORT,
            [],
            "Running",
            "training: 1/2 workers ready",
            id="running",
        ),
        pytest.param(
            {**VALIDATED, "restarts": 1},
            [child("ft-train-r0", failed=True), child("ft-train-r1", attempt=1, ready=2)],
            SUPPORT,
            ["Job/ft-train-r0"],
            "Running",
            "training: 2/2 workers ready",
            id="stale-attempts-go",
        ),
        pytest.param(
            VALIDATED,
            [child("ft-train-r0", complete=True)],
            [],
            [],
            "Succeeded",
            "training finished",
            id="done",
        ),
    ],
)
def test_the_gang_of_the_current_attempt(
    status: dict[str, Any],
    jobs: list[JobState],
    creates: list[str],
    deletes: list[str],
    phase: str,
    message: str,
) -> None:
    decision = run(finetunejob(), status, jobs)
    assert created(decision) == creates
    assert deleted(decision) == deletes
    assert wire(decision)["phase"] == phase
    assert wire(decision)["message"] == message
    assert wire(decision)["activeJob"] == f"ft-train-r{status['restarts']}"


@pytest.mark.parametrize(
    ("job", "artifacts"),
    [
        pytest.param(
            finetunejob(),
            {
                "modelUri": "s3://runs/ft/model",
                "adapterUri": "s3://runs/ft/adapter",
                "metricsUri": "s3://runs/ft/metrics.json",
                "logsUri": "s3://runs/ft/logs",
            },
            id="merged-lora",
        ),
        pytest.param(
            finetunejob(method={"type": "lora", "mergeAdapter": False}),
            {
                "adapterUri": "s3://runs/ft/adapter",
                "metricsUri": "s3://runs/ft/metrics.json",
                "logsUri": "s3://runs/ft/logs",
            },
            id="adapter-only",
        ),
        pytest.param(
            finetunejob(method={"type": "full"}),
            {
                "modelUri": "s3://runs/ft/model",
                "metricsUri": "s3://runs/ft/metrics.json",
                "logsUri": "s3://runs/ft/logs",
            },
            id="full",
        ),
        pytest.param(
            compressjob({"uri": "s3://models/m"}),
            {"modelUri": "s3://runs/cj/model", "reportUri": "s3://runs/cj/compression_report.json"},
            id="compression",
        ),
    ],
)
def test_success_records_the_artifacts(job: Job, artifacts: dict[str, str]) -> None:
    name = f"{job.metadata.name}-{'train' if job.kind == 'FineTuneJob' else 'compress'}-r0"
    decision = run(job, VALIDATED, [child(name, component=name.split("-")[1], complete=True)])
    assert wire(decision)["artifacts"] == artifacts
    assert wire(decision)["completionTime"] == ago(0)
    assert (condition(decision, "Complete") or {}).get("status") == "True"
    assert (condition(decision, "Running") or {}).get("status") == "False"


def test_status_says_where_the_current_attempts_process_logs_are_kept() -> None:
    job = finetunejob()
    decision = run(
        job,
        {**VALIDATED, "restarts": 1},
        [child("ft-train-r0", failed=True), child("ft-train-r1", attempt=1, ready=2)],
    )

    output = job.spec.output.uri.rstrip("/")
    assert wire(decision)["logs"] == {"attempt": 1, "uri": f"{output}/logs/attempt-1"}
