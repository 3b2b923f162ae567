"""The job lifecycle as a pure function: observed state in, children and status out."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.status import JobStatusBase
from kubetune.operator import lifecycle
from kubetune.operator.lifecycle import (
    ChildPatch,
    ChildRef,
    JobState,
    Observation,
    Termination,
    Upstream,
)
from kubetune.operator.policies.failure import pick_termination
from kubetune.operator.reconcile import child_failure, decide
from kubetune.operator.settings import Settings
from tests.policies import NOW, condition, finetunejob, observe, wire

pytestmark = pytest.mark.unit

T = lifecycle.rfc3339


def cj(**model: Any) -> CompressJob:
    return CompressJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "CompressJob",
            "metadata": {"name": "cj", "namespace": "ml", "uid": "u2"},
            "spec": {
                "model": model,
                "dataset": {"train": {"uri": "s3://data/train.jsonl"}},
                "quantization": {"method": "rtn", "scheme": "W8A16"},
                "output": {"uri": "s3://runs/cj"},
            },
        }
    )


VALIDATED = [
    {
        "type": "Validated",
        "status": "True",
        "reason": "Validated",
        "message": "",
        "lastTransitionTime": T(NOW),
    }
]
RUNNING = {
    "phase": "Running",
    "startTime": T(NOW - timedelta(seconds=100)),
    "restarts": 0,
    "conditions": VALIDATED,
}


def job(name: str, component: str = "train", attempt: int = 0, **state: Any) -> JobState:
    return JobState(
        name=name, component=component, attempt=attempt, suspended=state.pop("suspended", False), **state
    )


def created(decision: lifecycle.Decision) -> list[str]:
    return [f"{m['kind']}/{m['metadata']['name']}" for m in decision.create]


def test_a_new_job_gets_its_plan_identity_and_validation_only() -> None:
    d = decide(observe(finetunejob()))
    assert created(d) == ["ConfigMap/ft-plan", "ServiceAccount/ft-runner", "Job/ft-validate"]
    assert wire(d) == {
        "observedGeneration": 1,
        "restarts": 0,
        "phase": "Validating",
        "message": "validating model and data",
        "activeJob": "ft-validate",
        "startTime": T(NOW),
    }
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Validating")]


IDENTITY = {"storage": {"serviceAccountName": "team-s3"}}


def test_a_job_waits_for_the_service_account_it_names() -> None:
    d = decide(observe(finetunejob(**IDENTITY), runner_account=lifecycle.RunnerAccount.missing))
    assert d.create == []
    assert wire(d)["phase"] == "Waiting"
    assert "ServiceAccount team-s3 (spec.storage.serviceAccountName)" in wire(d)["message"]


def test_a_service_account_without_the_runner_label_fails_the_job() -> None:
    d = decide(observe(finetunejob(**IDENTITY), runner_account=lifecycle.RunnerAccount.not_allowed))
    assert d.create == []
    assert wire(d)["phase"] == "Failed"
    failed = condition(d, "Failed")
    assert failed is not None
    assert failed["reason"] == "ServiceAccountNotAllowed"
    assert 'kubetune.io/runner: "true"' in failed["message"]


def test_a_labelled_service_account_is_used_and_never_created_or_deleted() -> None:
    d = decide(observe(finetunejob(**IDENTITY), runner_account=lifecycle.RunnerAccount.allowed))
    assert created(d) == ["ConfigMap/ft-plan", "Job/ft-validate"]
    done = {"phase": "Succeeded", "completionTime": T(NOW - timedelta(seconds=10)), "restarts": 0}
    ttl = decide(observe(finetunejob(ttlSecondsAfterFinished=5, **IDENTITY), done))
    assert "ServiceAccount" not in {ref.kind for ref in ttl.delete}


def test_deciding_again_on_the_written_status_changes_nothing() -> None:
    first = decide(observe(finetunejob()))
    second = decide(observe(finetunejob(), first.status, jobs=[job("ft-validate", "validate")]))
    assert lifecycle.status_patch(first.status, second.status) == {}
    assert second.events == []
    assert second.delete == []
    assert second.patch == []


def test_a_queued_job_is_pending_until_kueue_admits_it() -> None:
    d = decide(observe(finetunejob(queueName="gpus")))
    assert d.create[-1]["spec"]["suspend"] is True
    assert wire(d)["phase"] == "Pending"
    assert "startTime" not in wire(d)
    assert "LocalQueue gpus" in wire(d)["message"]
    admitted = decide(observe(finetunejob(queueName="gpus"), d.status, jobs=[job("ft-validate", "validate")]))
    assert wire(admitted)["phase"] == "Validating"
    assert admitted.patch == []


def test_validation_passed_starts_the_gang() -> None:
    status = {"phase": "Validating", "startTime": T(NOW), "restarts": 0}
    d = decide(observe(finetunejob(), status, jobs=[job("ft-validate", "validate", complete=True)]))
    # The rendezvous Service and the right to report status come with the gang, before its Job.
    assert created(d)[-4:] == [
        "Service/ft-workers",
        "Role/ft-runner",
        "RoleBinding/ft-runner",
        "Job/ft-train-r0",
    ]
    assert wire(d)["phase"] == "Running"
    assert wire(d)["activeJob"] == "ft-train-r0"
    assert lifecycle.is_true(d.status.conditions, "Validated")
    assert lifecycle.is_true(d.status.conditions, "Running")


@pytest.mark.parametrize(
    ("term", "job_reason", "job_message", "reason"),
    [
        pytest.param(
            Termination("p", "trainer", 2, "Error", "bad record"),
            "PodFailurePolicy",
            "",
            "InvalidInput",
            id="exit-2",
        ),
        pytest.param(
            Termination("p", "trainer", 3, "Error", "403 on s3://x"),
            "PodFailurePolicy",
            "",
            "StorageError",
            id="exit-3",
        ),
        pytest.param(
            None,
            "PodFailurePolicy",
            "Container trainer for pod ml/p failed with exit code 3 matching FailJob rule at index 0",
            "StorageError",
            id="pods-gone-exit-code-from-job-message",
        ),
    ],
)
def test_non_retriable_failures_fail_at_once(
    term: Termination | None, job_reason: str, job_message: str, reason: str
) -> None:
    failed = job("ft-train-r0", failed=True, failed_reason=job_reason, failed_message=job_message)
    terms = {"ft-train-r0": term} if term else {}
    d = decide(observe(finetunejob(), dict(RUNNING), jobs=[failed], terminations=terms))
    assert wire(d)["phase"] == "Failed"
    assert d.create[-1]["kind"] != "Job"
    cond = condition(d, "Failed")
    assert cond is not None
    assert cond["reason"] == reason
    if term:
        assert term.message in cond["message"]
    assert wire(d)["completionTime"] == T(NOW)


def test_retriable_failure_replaces_the_gang_before_deleting_it() -> None:
    failed = job("ft-train-r0", failed=True, failed_reason="BackoffLimitExceeded")
    d = decide(
        observe(
            finetunejob(),
            dict(RUNNING),
            jobs=[failed],
            terminations={"ft-train-r0": Termination("p", "trainer", 137, "Error", "")},
        )
    )
    assert created(d)[-1] == "Job/ft-train-r1"
    assert d.delete == [ChildRef("batch/v1", "Job", "ft-train-r0")]
    assert wire(d)["restarts"] == 1
    assert wire(d)["phase"] == "Running"
    assert [e.reason for e in d.events] == ["Restarting"]
    again = decide(observe(finetunejob(), d.status, jobs=[failed, job("ft-train-r1", attempt=1)]))
    assert again.delete == [ChildRef("batch/v1", "Job", "ft-train-r0")], "stale attempts go"
    assert wire(again)["restarts"] == 1
    assert "Job/ft-train-r2" not in created(again)


def test_restarts_are_bounded_by_max_restarts() -> None:
    failed = job(
        "ft-train-r1", attempt=1, failed=True, failed_reason="BackoffLimitExceeded", failed_message="boom"
    )
    d = decide(observe(finetunejob(maxRestarts=1), dict(RUNNING, restarts=1), jobs=[failed]))
    cond = condition(d, "Failed")
    assert cond is not None
    assert cond["reason"] == "RestartsExhausted"
    assert "boom" in cond["message"]


def test_validation_failure_fails_with_the_runtime_message() -> None:
    status = {"phase": "Validating", "startTime": T(NOW), "restarts": 0}
    failed = job("ft-validate", "validate", failed=True, failed_reason="PodFailurePolicy")
    term = Termination("v", "validate", 2, "Error", "dataset.train: line 3 is not JSON")
    d = decide(observe(finetunejob(), status, jobs=[failed], terminations={"ft-validate": term}))
    assert wire(d)["phase"] == "Failed"
    validated = condition(d, "Validated")
    assert validated is not None
    assert validated["status"] == "False"
    assert validated["reason"] == "InvalidInput"
    assert "line 3 is not JSON" in validated["message"]


def test_deadline_counts_only_unsuspended_time() -> None:
    running = job("ft-train-r0", active=2)
    late = decide(observe(finetunejob(activeDeadlineSeconds=60), dict(RUNNING), jobs=[running]))
    assert wire(late)["phase"] == "Failed"
    assert late.delete == [ChildRef("batch/v1", "Job", "ft-train-r0")]
    assert condition(late, "Failed")["reason"] == "DeadlineExceeded"  # type: ignore[index]
    paused = decide(
        observe(
            finetunejob(activeDeadlineSeconds=60),
            dict(RUNNING),
            jobs=[running],
            annotations={lifecycle.ANNOTATION_PAUSED: "50"},
        )
    )
    assert wire(paused)["phase"] == "Running"


def test_suspend_and_resume_toggle_the_job_and_pause_the_clock() -> None:
    running = job("ft-train-r0", active=2)
    suspended = decide(observe(finetunejob(suspend=True), dict(RUNNING), jobs=[running]))
    assert [p.body for p in suspended.patch] == [{"spec": {"suspend": True}}]
    assert wire(suspended)["phase"] == "Suspended"
    later = NOW + timedelta(seconds=30)
    resumed = decide(
        observe(finetunejob(), suspended.status, jobs=[job("ft-train-r0", suspended=True)], now=later)
    )
    assert [p.body for p in resumed.patch] == [{"spec": {"suspend": False}}]
    assert wire(resumed)["phase"] == "Running"
    assert resumed.annotations == {lifecycle.ANNOTATION_PAUSED: "30"}
    assert condition(resumed, "Suspended")["status"] == "False"  # type: ignore[index]


def test_success_records_artifacts_and_serves() -> None:
    d = decide(
        observe(finetunejob(serve={"enabled": True}), dict(RUNNING), jobs=[job("ft-train-r0", complete=True)])
    )
    assert wire(d)["phase"] == "Succeeded"
    assert wire(d)["artifacts"] == {
        "modelUri": "s3://runs/ft/model",
        "adapterUri": "s3://runs/ft/adapter",
        "metricsUri": "s3://runs/ft/metrics.json",
        "logsUri": "s3://runs/ft/logs",
    }
    assert created(d)[-2:] == ["Service/ft-serve", "Deployment/ft-serve"]
    assert wire(d)["serving"]["url"] == "http://ft-serve.ml.svc:8000/v1"
    assert wire(d)["serving"]["ready"] is False


def test_serve_changes_patch_the_deployment_and_disabling_removes_it() -> None:
    done = {"phase": "Succeeded", "completionTime": T(NOW), "restarts": 0}
    stale = lifecycle.DeploymentState("ft-serve", replicas=1, ready_replicas=1, spec_hash="old")
    d = decide(observe(finetunejob(serve={"enabled": True, "replicas": 3}), done, deployment=stale))
    assert len(d.patch) == 1
    assert d.patch[0].json_patch
    assert {"op": "replace", "path": "/spec/replicas", "value": 3} in d.patch[0].body
    off = decide(observe(finetunejob(), d.status, deployment=stale))
    assert off.delete == [
        ChildRef("apps/v1", "Deployment", "ft-serve"),
        ChildRef("v1", "Service", "ft-serve"),
    ]
    assert lifecycle.status_patch(d.status, off.status)["serving"] is None, "removed"


def test_ttl_deletes_the_workload_children_once() -> None:
    done = {"phase": "Failed", "completionTime": T(NOW - timedelta(seconds=10)), "restarts": 0}
    early = decide(observe(finetunejob(ttlSecondsAfterFinished=60), done))
    assert early.delete == []
    d = decide(observe(finetunejob(ttlSecondsAfterFinished=5), done, jobs=[job("ft-train-r0", failed=True)]))
    assert [f"{r.kind}/{r.name}" for r in d.delete] == [
        "Job/ft-train-r0",
        "Job/ft-validate",
        "ConfigMap/ft-plan",
        "Service/ft-workers",
        "RoleBinding/ft-runner",
        "Role/ft-runner",
        "ServiceAccount/ft-runner",
    ]
    assert d.annotations == {lifecycle.ANNOTATION_CLEANED: "true"}
    again = decide(observe(finetunejob(ttlSecondsAfterFinished=5), done, annotations=d.annotations))
    assert again.delete == []


@pytest.mark.parametrize(
    ("upstream", "phase", "reason"),
    [
        pytest.param(Upstream("ft", found=False), "Waiting", None, id="missing"),
        pytest.param(Upstream("ft", found=True, phase="Running"), "Waiting", None, id="running"),
        pytest.param(
            Upstream("ft", found=True, phase="Failed", message="OOM"), "Failed", "UpstreamFailed", id="failed"
        ),
        pytest.param(
            Upstream(
                "ft",
                found=True,
                phase="Succeeded",
                job=finetunejob(method={"type": "lora", "mergeAdapter": False}),
            ),
            "Failed",
            "InvalidInput",
            id="adapter-only",
        ),
        pytest.param(
            Upstream("ft", found=True, phase="Succeeded", job=finetunejob()),
            "Validating",
            None,
            id="ready",
        ),
    ],
)
def test_compressjob_follows_its_finetunejob(upstream: Upstream, phase: str, reason: str | None) -> None:
    d = decide(observe(cj(fromFineTuneJob="ft"), upstream=upstream))
    assert wire(d)["phase"] == phase
    if reason:
        assert condition(d, "Failed")["reason"] == reason  # type: ignore[index]
    if phase == "Validating":
        assert wire(d)["sourceModelUri"] == "s3://runs/ft/model"
    if phase == "Waiting":
        assert d.create == []


def test_upstream_reads_the_finetunejob_body() -> None:
    upstream = finetunejob(method={"type": "lora", "mergeAdapter": False}, output={"uri": "s3://runs/ft/"})
    body = {**upstream.to_wire(), "status": {"phase": "Succeeded"}}
    up = lifecycle.upstream_from("ft", body)
    assert up == Upstream("ft", found=True, phase="Succeeded", job=upstream)
    assert lifecycle.upstream_from("ft", None) == Upstream("ft", found=False)


def test_conditions_keep_their_transition_time_while_unchanged() -> None:
    first = lifecycle.set_condition([], "Running", True, "Running", "a", NOW, 1)
    later = lifecycle.set_condition(first, "Running", True, "Running", "b", NOW + timedelta(hours=1), 2)
    assert [c.to_wire() for c in later] == [
        {
            "type": "Running",
            "status": "True",
            "reason": "Running",
            "message": "b",
            "observedGeneration": 2,
            "lastTransitionTime": T(NOW),
        }
    ]
    flipped = lifecycle.set_condition(later, "Running", False, "Suspended", "c", NOW + timedelta(hours=2))
    assert flipped[0].last_transition_time == T(NOW + timedelta(hours=2))


def test_the_failure_that_explains_a_gang() -> None:
    def pod(name: str, code: int, at: str, message: str = "") -> dict[str, Any]:
        term = {"exitCode": code, "finishedAt": at, "message": message}
        return {
            "metadata": {"name": name},
            "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]},
        }

    pods = [
        pod("b", 1, "2026-01-01T00:00:05Z"),
        pod("a", 137, "2026-01-01T00:00:01Z"),
        pod("c", 0, "2026-01-01T00:00:00Z"),
    ]
    assert pick_termination(pods) == Termination("a", "trainer", 137, None, "", "2026-01-01T00:00:01Z")
    pods.append(pod("d", 2, "2026-01-01T00:00:09Z", "bad data"))
    picked = pick_termination(pods)
    assert picked is not None
    assert picked.exit_code == 2
    assert picked.describe() == "bad data (container trainer of pod d exited with code 2)"
    assert pick_termination([]) is None


def test_job_state_reads_the_job_controllers_conditions() -> None:
    body = {
        "metadata": {
            "name": "ft-train-r2",
            "labels": {"kubetune.io/component": "train", "kubetune.io/attempt": "2"},
        },
        "spec": {"suspend": False},
        "status": {
            "active": 1,
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "m"}
            ],
        },
    }
    assert lifecycle.job_state(body) == JobState(
        "ft-train-r2",
        "train",
        2,
        False,
        active=1,
        failed=True,
        failed_reason="PodFailurePolicy",
        failed_message="m",
    )


def test_a_log_tail_termination_message_becomes_its_last_line() -> None:
    from kubetune.operator.lifecycle import Termination

    tail = "ning: all_gather is deprecated\nTraceback (most recent call last):\n  File x\nRuntimeError: NCCL timeout\n"
    term = Termination(pod="p-0", container="trainer", exit_code=1, reason="Error", message=tail)
    assert term.describe() == "RuntimeError: NCCL timeout (container trainer of pod p-0 exited with code 1)"


# --- Spec edits before the job starts (issue 12, part 3) ----------------------------------------


def edited(generation: int, **spec: Any) -> FineTuneJob:
    job = finetunejob(**spec)
    job.metadata.generation = generation
    return job


def validation_of(d: lifecycle.Decision, suspended: bool | None = None) -> JobState:
    """The validation Job a decision created, as the index will observe it."""
    state = lifecycle.job_state(next(m for m in d.create if m["metadata"]["name"] == "ft-validate"))
    return state if suspended is None else dataclasses.replace(state, suspended=suspended)


def plan_ref(d: lifecycle.Decision) -> list[str]:
    return [f"{ref.kind}/{ref.name}" for ref in d.update]


def at(
    generation: int, job: FineTuneJob, status: dict[str, Any] | JobStatusBase, jobs: list[JobState]
) -> Observation:
    obs = observe(job, status, jobs=jobs)
    obs.generation = generation
    return obs


@pytest.mark.parametrize(
    "spec",
    [{"suspend": True}, {"queueName": "team-queue"}],
    ids=["suspended", "waiting-for-kueue"],
)
def test_an_edit_before_the_start_re_renders_the_plan_and_the_validation_job(spec: dict[str, Any]) -> None:
    first = decide(observe(edited(1, **spec)))
    configmap = next(m for m in first.create if m["kind"] == "ConfigMap")
    assert configmap["metadata"]["annotations"] == {"kubetune.io/generation": "1"}
    assert plan_ref(first) == ["ConfigMap/ft-plan"], "the plan follows the spec until the start"
    old_validation = validation_of(first)
    assert old_validation.suspended
    assert old_validation.generation == 1
    # The plan changes; the validation Job's pod reads it when it starts, so the Job is kept.
    plan_only = edited(2, output={"uri": "s3://runs/ft-v2"}, **spec)
    d = decide(at(2, plan_only, first.status, [old_validation]))
    configmap = next(m for m in d.create if m["kind"] == "ConfigMap")
    assert '"output_uri": "s3://runs/ft-v2"' in configmap["data"]["plan.json"]
    assert configmap["metadata"]["annotations"] == {"kubetune.io/generation": "2"}
    assert plan_ref(d) == ["ConfigMap/ft-plan"]
    assert d.delete == []
    # The image changes too: the validation Job's pod template is immutable, so it is replaced.
    new = edited(3, output={"uri": "s3://runs/ft-v2"}, resources={"workers": 2, "image": "trainer:2"}, **spec)
    d = decide(at(3, new, first.status, [old_validation]))
    assert plan_ref(d) == ["ConfigMap/ft-plan"]
    assert d.delete == [ChildRef("batch/v1", "Job", "ft-validate")], "its pod template is immutable"
    assert "Job/ft-validate" not in created(d), "created again once the old one is gone"
    assert ("Normal", "SpecChanged") in [(e.type, e.reason) for e in d.events]
    assert "startTime" not in wire(d)
    # Once gone, it comes back from the current generation.
    again = decide(at(3, new, d.status, []))
    assert validation_of(again).generation == 3
    # What it renders unchanged, it is kept.
    assert decide(at(3, new, again.status, [validation_of(again)])).delete == []


def test_resuming_before_the_start_unsuspends_the_validation_job_in_place() -> None:
    first = decide(observe(edited(1, suspend=True)))
    d = decide(at(2, edited(2, suspend=False), first.status, [validation_of(first)]))
    assert d.delete == []
    assert d.patch == [ChildPatch(ChildRef("batch/v1", "Job", "ft-validate"), {"spec": {"suspend": False}})]
    assert wire(d)["phase"] == "Validating"
    assert wire(d)["startTime"] == T(NOW)


def test_after_the_start_the_plan_and_validation_job_stay_as_they_are() -> None:
    first = decide(observe(edited(1)))
    started = first.status
    assert started.start_time
    d = decide(at(2, edited(2, output={"uri": "s3://runs/other"}), started, [validation_of(first)]))
    assert d.update == []
    assert d.delete == []
    # A running validation Job of a job whose startTime is not written yet is not replaced either.
    d = decide(
        at(2, edited(2, output={"uri": "s3://runs/other"}), {}, [validation_of(first, suspended=False)])
    )
    assert d.update == []
    assert d.delete == []


def test_the_generation_a_job_was_rendered_from_is_observed() -> None:
    body = {"metadata": {"name": "ft-validate", "annotations": {"kubetune.io/generation": "7"}}}
    assert lifecycle.job_state(body).generation == 7
    assert lifecycle.job_state({"metadata": {"name": "ft-validate"}}).generation is None


# --- Children the API server would refuse (issue 12, part 5) --------------------------------------


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (
            {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "a100"}]},
            "spec.resources.tolerations[0].value: must be empty when operator is Exists (got 'a100')",
        ),
        (
            {"tolerations": [{"operator": "Equal", "value": "x"}]},
            "spec.resources.tolerations[0].operator: must be Exists when key is empty",
        ),
        (
            {"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]},
            "spec.resources.tolerations[0].tolerationSeconds: only allowed with effect NoExecute",
        ),
        (
            {"tolerations": [{"key": "bad key!", "operator": "Exists"}]},
            "spec.resources.tolerations[0].key: invalid value 'bad key!'",
        ),
        ({"nodeSelector": {"gpu type": "a100"}}, "spec.resources.nodeSelector: invalid key 'gpu type'"),
        (
            {"nodeSelector": {"example.com/gpu": "a100 80gb"}},
            "spec.resources.nodeSelector[example.com/gpu]: invalid value 'a100 80gb'",
        ),
        (
            {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"memory": "8Gi"}},
            "spec.resources.requests[memory]: 16Gi is more than the limit 8Gi (spec.resources.limits[memory])",
        ),
        (
            {"requests": {"cpu": "1500m"}, "limits": {"cpu": "1"}},
            "spec.resources.requests[cpu]: 1500m is more than the limit 1",
        ),
        (
            {"gpusPerWorker": 1, "requests": {"nvidia.com/gpu": "2"}},
            "spec.resources.requests[nvidia.com/gpu]: 2 is more than the limit 1 (spec.resources.gpus)",
        ),
        ({"requests": {"cpu": "-1"}}, "spec.resources.requests[cpu]: must not be negative (got -1)"),
        (
            {"requests": {"gpu": "1"}},
            "spec.resources.requests[gpu]: 'gpu' is not a resource the API server accepts",
        ),
    ],
    ids=[
        "exists-with-value",
        "no-key-equal",
        "seconds-without-noexecute",
        "bad-toleration-key",
        "bad-selector-key",
        "bad-selector-value",
        "memory-above-limit",
        "cpu-above-limit",
        "gpu-request-above-gpus",
        "negative",
        "unknown-resource",
    ],
)
def test_children_the_api_server_would_refuse_fail_the_job_before_any_exists(
    resources: dict[str, Any], expected: str
) -> None:
    d = decide(observe(finetunejob(resources={"workers": 2, **resources})))
    assert d.create == []
    failed = condition(d, "Failed")
    assert failed is not None
    assert failed["reason"] == "InvalidSpec"
    assert expected in failed["message"]


def test_valid_placement_and_resources_pass() -> None:
    resources = {
        "workers": 2,
        "gpusPerWorker": 1,
        "requests": {"cpu": "3500m", "memory": "16Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "16Gi", "cpu": "4"},
        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": ""},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"operator": "Exists"},
            {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 30},
        ],
    }
    d = decide(observe(finetunejob(resources=resources)))
    assert created(d) == ["ConfigMap/ft-plan", "ServiceAccount/ft-runner", "Job/ft-validate"]


def test_a_rejected_child_fails_the_job_or_after_success_only_its_serving() -> None:
    obs = observe(finetunejob())
    rejected = "the API server rejected Job ft-validate: spec.template.spec.x: Invalid value: 1"
    d = child_failure(obs, decide(obs), lifecycle.REASON_INVALID_CHILD, rejected)
    assert d.create == []
    assert wire(d)["phase"] == "Failed"
    assert wire(d)["message"] == rejected
    failed = condition(d, "Failed")
    assert failed is not None
    assert failed["reason"] == "InvalidChild"
    assert ("Warning", "InvalidChild") in [(e.type, e.reason) for e in d.events]
    done = {"phase": "Succeeded", "completionTime": T(NOW), "restarts": 0}
    served = observe(finetunejob(serve={"enabled": True}), done)
    d = child_failure(served, decide(served), lifecycle.REASON_INVALID_CHILD, rejected)
    assert wire(d)["phase"] == "Succeeded"
    serving = condition(d, "ServingReady")
    assert serving is not None
    assert serving["reason"] == "InvalidChild"


# --- What a job may reference (issue 12, part 7) --------------------------------------------------

SECRET = {"storage": {"secretRef": {"name": "team-keys"}}}


def test_a_job_waits_for_the_secret_it_names() -> None:
    d = decide(observe(finetunejob(**SECRET), storage_secret=lifecycle.SecretAccess.missing))
    assert d.create == []
    assert wire(d)["phase"] == "Waiting"
    assert wire(d)["message"] == "waiting for Secret team-keys (spec.storage.secretRef) to exist"


def test_a_secret_without_the_storage_credentials_label_fails_the_job() -> None:
    d = decide(observe(finetunejob(**SECRET), storage_secret=lifecycle.SecretAccess.not_allowed))
    assert d.create == []
    failed = condition(d, "Failed")
    assert failed is not None
    assert failed["reason"] == "SecretNotAllowed"
    assert (
        'Secret team-keys (spec.storage.secretRef) lacks the label kubetune.io/storage-credentials: "true"'
        in (failed["message"])
    )


def test_a_labelled_secret_is_used() -> None:
    d = decide(observe(finetunejob(**SECRET), storage_secret=lifecycle.SecretAccess.allowed))
    assert created(d) == ["ConfigMap/ft-plan", "ServiceAccount/ft-runner", "Job/ft-validate"]


ALLOWED = Settings(allowed_image_prefixes=("registry.example.com/ml/", "ghcr.io/acme"))


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example.com/ml/trainer:1", True),
        ("ghcr.io/acme/trainer@sha256:abc", True),
        ("ghcr.io/acme", True),
        ("ghcr.io/acme-evil/trainer:1", False),
        ("ghcr.io/acme.evil.io/x", False),
        ("registry.example.com/other/trainer:1", False),
        ("trainer:1", False),
    ],
)
def test_image_prefixes_match_at_a_boundary(image: str, allowed: bool) -> None:
    assert ALLOWED.image_allowed(image) is allowed
    assert Settings().image_allowed(image), "no prefixes: any image"


def test_an_image_outside_the_allowed_prefixes_fails_the_job() -> None:
    job = finetunejob(resources={"workers": 2, "image": "docker.io/someone/miner:1"})
    obs = observe(job)
    obs.settings = ALLOWED
    d = decide(obs)
    assert d.create == []
    failed = condition(d, "Failed")
    assert failed is not None
    assert failed["reason"] == "ImageNotAllowed"
    assert failed["message"] == (
        "spec.resources.image docker.io/someone/miner:1 is not allowed: the operator runs only images "
        "starting with registry.example.com/ml/, ghcr.io/acme (KUBETUNE_ALLOWED_IMAGE_PREFIXES)"
    )
    ok = observe(finetunejob(resources={"workers": 2, "image": "registry.example.com/ml/trainer:2"}))
    ok.settings = ALLOWED
    validate = next(m for m in decide(ok).create if m["metadata"]["name"] == "ft-validate")
    assert (
        validate["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/ml/trainer:2"
    )


def test_a_serving_image_edited_after_success_is_refused_without_touching_serving() -> None:
    done = {"phase": "Succeeded", "completionTime": T(NOW), "restarts": 0}
    obs = observe(finetunejob(serve={"enabled": True, "image": "docker.io/someone/server:1"}), done)
    obs.settings = ALLOWED
    d = decide(obs)
    assert d.create == []
    assert d.patch == []
    assert wire(d)["phase"] == "Succeeded"
    serving = condition(d, "ServingReady")
    assert serving is not None
    assert serving["reason"] == "ImageNotAllowed"
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "ImageNotAllowed")]
