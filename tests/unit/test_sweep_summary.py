"""An ended FineTuneSweep tracked in MLflow gets one Job <sweep>-summary, which logs its best trial
to the parent run its trials share (the operator never talks to MLflow): when it is created, that
it is never created twice, what its pod carries, and how its end shows in the sweep's status."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune.api import FineTuneSweep, Phase
from kubetune.api.sweep import FineTuneSweepStatus
from kubetune.operator import sweep as decide_sweep
from kubetune.operator.lifecycle import JobState, SecretAccess, get_condition, job_state
from kubetune.operator.settings import Settings
from kubetune.operator.sweep import CONDITION_TRACKING_SUMMARIZED, SweepObservation, trial_from
from kubetune.run.sweep_summary import ENV_SWEEP_SUMMARY, SweepSummaryPlan
from tests.unit.test_render import K8S_VERSION, restricted_violations

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)
NOW = datetime(2025, 1, 1, tzinfo=UTC)
MLFLOW = {"uri": "http://mlflow.mlflow:5000"}
CREDENTIALS = {"name": "mlflow-credentials", "usernameKey": "user", "passwordKey": "password"}


def sweep(**spec: Any) -> FineTuneSweep:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].update({"maxTrials": 2, "parallelism": 2, **spec})
    doc["metadata"]["uid"] = "u-1"
    return FineTuneSweep.model_validate(doc)


def tracked(mlflow: dict[str, Any] | None = None, **spec: Any) -> FineTuneSweep:
    return sweep(tracking={"mlflow": {**MLFLOW, **(mlflow or {})}}, **spec)


def decide(
    s: FineTuneSweep,
    bodies: list[dict[str, Any]],
    status: FineTuneSweepStatus | None = None,
    summary_job: JobState | None = None,
    now: datetime = NOW,
    tracking_secret: SecretAccess | None = SecretAccess.allowed,
    settings: Settings | None = None,
) -> decide_sweep.SweepDecision:
    trials = [t for b in bodies if (t := trial_from(b, s.spec.objective.metric)) is not None]
    return decide_sweep.decide(
        SweepObservation(
            s,
            "team-a",
            now,
            status or FineTuneSweepStatus(),
            trials,
            settings=settings or Settings(),
            summary_job=summary_job,
            tracking_secret=tracking_secret,
        )
    )


def finished_trials(s: FineTuneSweep, *losses: float) -> list[dict[str, Any]]:
    """The sweep's first trials, each Succeeded with its final evaluation loss."""
    bodies = []
    for manifest, loss in zip(decide(s, []).create, losses, strict=True):
        body = copy.deepcopy(manifest)
        body["status"] = {"phase": "Succeeded", "progress": {"step": 600, "evalLoss": loss}}
        bodies.append(body)
    return bodies


def ended(s: FineTuneSweep, *losses: float) -> tuple[list[dict[str, Any]], decide_sweep.SweepDecision]:
    bodies = finished_trials(s, *losses)
    return bodies, decide(s, bodies)


def summary_job_body(manifest: dict[str, Any], condition: str | None) -> dict[str, Any]:
    """The summary Job as the API server shows it once the Job controller set ``condition``."""
    body = copy.deepcopy(manifest)
    if condition:
        body["status"] = {
            "conditions": [
                {"type": condition, "status": "True", "reason": "BackoffLimitExceeded", "message": "3 pods"}
            ]
        }
    return body


def pod_env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_an_ended_sweep_tracked_in_mlflow_gets_one_summary_job_owned_by_it() -> None:
    _, decision = ended(tracked(), 0.9, 0.4)
    assert decision.status.phase == Phase.succeeded
    job = decision.create_summary
    assert job is not None
    meta = job["metadata"]
    assert (job["kind"], meta["name"], meta["namespace"]) == ("Job", "sweep-support-lora-summary", "team-a")
    assert meta["labels"]["kubetune.io/sweep"] == "sweep-support-lora"
    assert "kubetune.io/job-name" not in meta["labels"], "the jobs' handlers must not take it for a job's"
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FineTuneSweep",
        "sweep-support-lora",
        "u-1",
        True,
    )
    condition = get_condition(decision.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "Summarizing")


def test_the_summary_names_the_best_trial_its_parameters_objective_and_output() -> None:
    _, decision = ended(tracked(), 0.9, 0.4)
    assert decision.create_summary is not None
    plan = SweepSummaryPlan.model_validate_json(pod_env(decision.create_summary)[ENV_SWEEP_SUMMARY])
    # The trials' own experiment and parent run: <namespace>/<sweep>, the sweep's uid.
    assert (plan.tracking.uri, plan.tracking.experiment) == (MLFLOW["uri"], "team-a/sweep-support-lora")
    assert (plan.sweep.name, plan.sweep.uid, plan.namespace) == ("sweep-support-lora", "u-1", "team-a")
    assert plan.sweep.search["maxTrials"] == 2
    best = plan.summary["bestTrial"]
    assert (best["number"], best["name"], best["objective"], best["state"]) == (
        1,
        "sweep-support-lora-t1",
        0.4,
        "Complete",
    )
    assert best["outputUri"] == "s3://runs/sweep-support-lora/trials/1"
    assert set(best["parameters"]) == {p.path for p in tracked().spec.parameters}
    assert plan.summary["objective"] == {"metric": "eval_loss", "direction": "minimize"}
    assert [t["state"] for t in plan.summary["trials"]] == ["Complete", "Complete"]


def test_the_templates_tracking_counts_when_the_sweep_has_none() -> None:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"]["template"]["tracking"] = {"mlflow": {"uri": "http://other:5000", "experiment": "mine"}}
    doc["spec"].update({"maxTrials": 1, "parallelism": 1})
    doc["metadata"]["uid"] = "u-1"
    s = FineTuneSweep.model_validate(doc)
    _, decision = ended(s, 0.5)
    assert decision.create_summary is not None
    plan = SweepSummaryPlan.model_validate_json(pod_env(decision.create_summary)[ENV_SWEEP_SUMMARY])
    assert (plan.tracking.uri, plan.tracking.experiment) == ("http://other:5000", "mine")


def test_a_sweep_without_tracking_gets_no_summary_job_nor_condition() -> None:
    _, decision = ended(sweep(), 0.9, 0.4)
    assert decision.status.phase == Phase.succeeded
    assert decision.create_summary is None
    assert get_condition(decision.status.conditions, CONDITION_TRACKING_SUMMARIZED) is None


def test_a_running_sweep_gets_no_summary_job() -> None:
    s = tracked()
    bodies = finished_trials(s, 0.9, 0.4)
    bodies[1]["status"] = {"phase": "Running", "progress": {"step": 100}}
    decision = decide(s, bodies)
    assert decision.status.phase == Phase.running
    assert decision.create_summary is None


def test_a_failed_sweep_is_summarized_too_but_one_that_never_ran_a_trial_is_not() -> None:
    s = tracked(maxFailedTrials=0)
    failed = finished_trials(s, 0.9, 0.4)
    failed[0]["status"] = {
        "phase": "Failed",
        "conditions": [{"type": "Failed", "status": "True", "reason": "X"}],
    }
    decision = decide(s, failed)
    assert decision.status.phase == Phase.failed
    assert decision.create_summary is not None

    never = FineTuneSweepStatus(phase=Phase.failed, completion_time="2025-01-01T00:00:00Z")
    assert decide(s, [], never).create_summary is None


def test_the_summary_job_is_created_once_its_condition_remembers_it() -> None:
    s = tracked()
    bodies, first = ended(s, 0.9, 0.4)
    # The next look, before the Job's watch event came, and after the Job is gone (TTL): none.
    assert decide(s, bodies, first.status).create_summary is None
    # An operator that lost its status write sees the Job itself: none either.
    assert first.create_summary is not None
    running = job_state(summary_job_body(first.create_summary, None))
    assert decide(s, bodies, summary_job=running).create_summary is None


def test_the_summary_jobs_end_sets_the_condition_and_a_failure_leaves_the_sweep_succeeded() -> None:
    s = tracked()
    bodies, first = ended(s, 0.9, 0.4)
    assert first.create_summary is not None
    done = decide(s, bodies, first.status, job_state(summary_job_body(first.create_summary, "Complete")))
    condition = get_condition(done.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert (condition.status, condition.reason) == ("True", "Summarized")

    failed = decide(s, bodies, first.status, job_state(summary_job_body(first.create_summary, "Failed")))
    assert failed.status.phase == Phase.succeeded
    condition = get_condition(failed.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "SummaryFailed")
    assert "BackoffLimitExceeded" in condition.message
    assert "kubectl logs job/sweep-support-lora-summary" in condition.message


def test_the_ttl_deletes_the_summary_job_once_it_ended() -> None:
    s = tracked(ttlSecondsAfterFinished=60)
    bodies, first = ended(s, 0.9, 0.4)
    assert first.create_summary is not None
    running = job_state(summary_job_body(first.create_summary, None))
    complete = job_state(summary_job_body(first.create_summary, "Complete"))
    later = NOW + timedelta(seconds=61)
    assert decide(s, bodies, first.status, complete, NOW).delete_summary is None, "before the TTL"
    assert decide(s, bodies, first.status, running, later).delete_summary is None, "still logging"
    assert decide(s, bodies, first.status, complete, later).delete_summary == "sweep-support-lora-summary"


def test_the_summary_pod_gets_the_credentials_by_secret_reference_only() -> None:
    _, decision = ended(tracked({"secretRef": CREDENTIALS}), 0.9, 0.4)
    assert decision.create_summary is not None
    env = pod_env(decision.create_summary)
    assert env["MLFLOW_TRACKING_USERNAME"] == {"secretKeyRef": {"name": "mlflow-credentials", "key": "user"}}
    assert env["MLFLOW_TRACKING_PASSWORD"] == {
        "secretKeyRef": {"name": "mlflow-credentials", "key": "password"}
    }
    assert "MLFLOW_TRACKING_TOKEN" not in env
    assert "mlflow-credentials" not in env[ENV_SWEEP_SUMMARY], "the summary names no Secret"


def test_the_summary_job_runs_the_trainers_command_valid_and_restricted() -> None:
    _, decision = ended(tracked({"secretRef": CREDENTIALS}), 0.9, 0.4)
    job = decision.create_summary
    assert job is not None
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["automountServiceAccountToken"] is False, "it needs no Kubernetes API"
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "kubetune.trainer", "sweep-summary"]
    assert container["image"] == Settings().trainer_image
    assert json.loads(pod_env(job)[ENV_SWEEP_SUMMARY])["namespace"] == "team-a"


@pytest.mark.parametrize(
    ("access", "reason", "says"),
    [
        (
            SecretAccess.not_allowed,
            "SecretNotAllowed",
            "Secret mlflow-credentials (spec.tracking.mlflow.secretRef) lacks the label "
            'kubetune.io/tracking-credentials: "true"',
        ),
        (
            SecretAccess.missing,
            "SummaryFailed",
            "Secret mlflow-credentials (spec.tracking.mlflow.secretRef) does not exist",
        ),
        (None, "SecretNotAllowed", "lacks the label"),  # not looked at: refused, never assumed allowed
    ],
)
def test_the_summary_job_takes_only_a_secret_its_owner_opted_in(
    access: SecretAccess | None, reason: str, says: str
) -> None:
    s = tracked({"secretRef": CREDENTIALS})
    bodies = finished_trials(s, 0.9, 0.4)
    decision = decide(s, bodies, tracking_secret=access)
    assert decision.create_summary is None
    condition = get_condition(decision.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", reason)
    assert says in condition.message
    assert decision.status.phase == Phase.succeeded, "tracking never fails the sweep"
    # Decided once: a later reconcile, the Secret labelled meanwhile, creates nothing either.
    assert decide(s, bodies, decision.status).create_summary is None


def test_the_summary_job_runs_only_an_allowed_image() -> None:
    template = copy.deepcopy(EXAMPLE["spec"]["template"])
    template["resources"]["image"] = "evil.example/collector:1"
    s = tracked(template=template)
    settings = Settings(allowed_image_prefixes=("ghcr.io/kubetune/",))
    decision = decide(s, finished_trials(s, 0.9, 0.4), settings=settings)
    assert decision.create_summary is None
    condition = get_condition(decision.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert (condition.status, condition.reason) == ("False", "ImageNotAllowed")
    assert "spec.template.resources.image evil.example/collector:1 is not allowed" in condition.message


def test_a_refused_secret_of_the_templates_tracking_is_named_where_it_is_set() -> None:
    template = copy.deepcopy(EXAMPLE["spec"]["template"])
    template["tracking"] = {"mlflow": {**MLFLOW, "secretRef": CREDENTIALS}}
    s = sweep(template=template)
    decision = decide(s, finished_trials(s, 0.9, 0.4), tracking_secret=SecretAccess.not_allowed)
    condition = get_condition(decision.status.conditions, CONDITION_TRACKING_SUMMARIZED)
    assert condition is not None
    assert condition.reason == "SecretNotAllowed"
    assert "Secret mlflow-credentials (spec.template.tracking.mlflow.secretRef)" in condition.message
