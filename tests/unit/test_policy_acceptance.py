"""Acceptance policy: a job whose pod templates the API server would refuse, whose images are
outside the allowed prefixes, or whose ServiceAccount or Secret is not labelled for kubetune
fails before any child exists; a ServiceAccount or Secret that does not exist yet is waited for
and looked for again."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import RunnerAccount, SecretAccess
from kubetune.operator.policies import acceptance
from kubetune.operator.settings import Settings
from tests.policies import ago, condition, finetunejob, observe, wire

pytestmark = pytest.mark.unit

ACCOUNT = {"storage": {"serviceAccountName": "team-s3"}}
SECRET = {"storage": {"secretRef": {"name": "team-keys"}}}
TRACKED = {
    "tracking": {
        "mlflow": {
            "uri": "https://mlflow.example.com",
            "secretRef": {"name": "mlflow-keys", "tokenKey": "token"},
        }
    }
}
BAD_TOLERATION = {"resources": {"workers": 2, "tolerations": [{"operator": "Equal", "value": "x"}]}}
OUTSIDE = {"resources": {"workers": 2, "image": "docker.io/someone/miner:1"}}
ALLOWED = Settings(allowed_image_prefixes=("registry.example.com/ml/",))


@pytest.mark.parametrize(
    ("spec", "observed", "outcome", "reason"),
    [
        pytest.param({}, {}, "admitted", None, id="plain"),
        pytest.param(BAD_TOLERATION, {}, "Failed", "InvalidSpec", id="refused-pod-template"),
        pytest.param(OUTSIDE, {"settings": ALLOWED}, "Failed", "ImageNotAllowed", id="image"),
        pytest.param(OUTSIDE, {}, "admitted", None, id="any-image-without-prefixes"),
        pytest.param(
            ACCOUNT, {"runner_account": RunnerAccount.missing}, "Waiting", None, id="account-missing"
        ),
        pytest.param(
            ACCOUNT,
            {"runner_account": RunnerAccount.not_allowed},
            "Failed",
            "ServiceAccountNotAllowed",
            id="account",
        ),
        pytest.param(
            ACCOUNT, {"runner_account": RunnerAccount.allowed}, "admitted", None, id="account-allowed"
        ),
        pytest.param(SECRET, {"storage_secret": SecretAccess.missing}, "Waiting", None, id="secret-missing"),
        pytest.param(
            SECRET, {"storage_secret": SecretAccess.not_allowed}, "Failed", "SecretNotAllowed", id="secret"
        ),
        pytest.param(SECRET, {"storage_secret": SecretAccess.allowed}, "admitted", None, id="secret-allowed"),
        pytest.param(
            TRACKED, {"tracking_secret": SecretAccess.missing}, "Waiting", None, id="tracking-secret-missing"
        ),
        pytest.param(
            TRACKED,
            {"tracking_secret": SecretAccess.not_allowed},
            "Failed",
            "SecretNotAllowed",
            id="tracking-secret",
        ),
        pytest.param(
            TRACKED, {"tracking_secret": SecretAccess.allowed}, "admitted", None, id="tracking-secret-allowed"
        ),
    ],
)
def test_what_a_job_may_run_and_reference(
    spec: dict[str, Any], observed: dict[str, Any], outcome: str, reason: str | None
) -> None:
    obs = observe(finetunejob(**spec), **observed)
    decision = acceptance.admit(obs, obs.status)
    if outcome == "admitted":
        assert not decision.settled
        assert decision.status == obs.status
        return
    assert decision.settled
    assert wire(decision)["phase"] == outcome
    assert (condition(decision, "Failed") or {}).get("reason") == reason
    waits = outcome == "Waiting"
    assert decision.recheck_after == (acceptance.REFERENCE_RECHECK_SECONDS if waits else None)


def test_pod_templates_are_checked_only_before_the_start() -> None:
    # Later edits reach a child only when one is created, and the API server refuses those itself.
    obs = observe(finetunejob(**BAD_TOLERATION), {"startTime": ago(10)})
    assert not acceptance.admit(obs, obs.status).settled


def test_a_tracking_secret_is_refused_by_name_field_and_the_label_it_lacks() -> None:
    obs = observe(finetunejob(**TRACKED), tracking_secret=SecretAccess.not_allowed)

    message = (condition(acceptance.admit(obs, obs.status), "Failed") or {}).get("message", "")

    assert (
        'Secret mlflow-keys (spec.tracking.mlflow.secretRef) lacks the label kubetune.io/tracking-credentials: "true"'
        in message
    )
