"""Serving policy: a succeeded job with spec.serve.enabled gets a Deployment and Service, kept in
step with spec.serve; status.serving and ServingReady report it; switching serving off removes
them; a serving image outside the allowed prefixes leaves serving as it was."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.operator.lifecycle import DeploymentState
from kubetune.operator.policies import serving
from kubetune.operator.render import ANNOTATION_SPEC_HASH, render_serving
from kubetune.operator.settings import Settings
from tests.policies import ago, condition, created, deleted, events, finetunejob, observe, wire

pytestmark = pytest.mark.unit

DONE = {"phase": "Succeeded", "completionTime": ago(10), "restarts": 0}
SERVE = {"serve": {"enabled": True}}
READY_BEFORE = {
    **DONE,
    "conditions": [
        {"type": "ServingReady", "status": "True", "reason": "Ready", "lastTransitionTime": ago(5)}
    ],
}


def current(ready: int, **serve: Any) -> DeploymentState:
    """The serving Deployment as rendered from the job's spec.serve now."""
    deployment, _ = render_serving(finetunejob(serve={"enabled": True, **serve}), Settings(), "ml")
    return DeploymentState("ft-serve", 1, ready, deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH])


@pytest.mark.parametrize(
    ("spec", "status", "deployment", "creates", "ready", "reason", "emitted"),
    [
        pytest.param(
            SERVE,
            DONE,
            None,
            ["Service/ft-serve", "Deployment/ft-serve"],
            "False",
            "NotReady",
            [],
            id="created",
        ),
        pytest.param(
            SERVE,
            DONE,
            current(ready=1),
            ["Service/ft-serve"],
            "True",
            "Ready",
            [("Normal", "ServingReady")],
            id="ready",
        ),
        pytest.param(
            SERVE, READY_BEFORE, current(ready=1), ["Service/ft-serve"], "True", "Ready", [], id="ready-still"
        ),
        pytest.param(
            {"serve": {"enabled": True, "replicas": 0}},
            DONE,
            current(ready=0, replicas=0),
            ["Service/ft-serve"],
            "False",
            "NotReady",
            [],
            id="no-replicas",
        ),
        pytest.param({}, DONE, None, [], None, None, [], id="never-served"),
    ],
)
def test_serving_a_succeeded_job(
    spec: dict[str, Any],
    status: dict[str, Any],
    deployment: DeploymentState | None,
    creates: list[str],
    ready: str | None,
    reason: str | None,
    emitted: list[tuple[str, str]],
) -> None:
    obs = observe(finetunejob(**spec), status, deployment=deployment)
    decision = serving.serve(obs, obs.status)
    assert created(decision) == creates
    assert decision.patch == []
    served = condition(decision, "ServingReady")
    assert (served or {}).get("status") == ready
    assert (served or {}).get("reason") == reason
    assert events(decision) == emitted
    if creates:
        assert wire(decision)["serving"] == {
            "deployment": "ft-serve",
            "service": "ft-serve",
            "url": "http://ft-serve.ml.svc:8000/v1",
            "ready": ready == "True",
            "readyReplicas": deployment.ready_replicas if deployment else 0,
        }


def test_a_changed_spec_serve_replaces_the_deployments_template() -> None:
    obs = observe(finetunejob(serve={"enabled": True, "replicas": 3}), DONE, deployment=current(ready=1))
    decision = serving.serve(obs, obs.status)
    assert [p.ref.name for p in decision.patch] == ["ft-serve"]
    assert decision.patch[0].json_patch
    assert {"op": "replace", "path": "/spec/replicas", "value": 3} in decision.patch[0].body
    assert ("Normal", "ServingUpdated") in events(decision)


def test_switching_serving_off_removes_it() -> None:
    on = observe(finetunejob(**SERVE), DONE, deployment=current(ready=1))
    served = serving.serve(on, on.status)
    off = observe(finetunejob(), served.status, deployment=current(ready=1))
    decision = serving.serve(off, off.status)
    assert deleted(decision) == ["Deployment/ft-serve", "Service/ft-serve"]
    assert "serving" not in wire(decision)
    assert (condition(decision, "ServingReady") or {}).get("reason") == "Disabled"


def test_a_serving_image_outside_the_prefixes_is_refused_once() -> None:
    spec = {"serve": {"enabled": True, "image": "docker.io/someone/server:1"}}
    allowed = Settings(allowed_image_prefixes=("registry.example.com/",))
    obs = observe(finetunejob(**spec), DONE, settings=allowed)
    first = serving.serve(obs, obs.status)
    assert first.create == []
    assert (condition(first, "ServingReady") or {}).get("reason") == "ImageNotAllowed"
    assert events(first) == [("Warning", "ImageNotAllowed")]
    again = observe(finetunejob(**spec), first.status, settings=allowed)
    assert serving.serve(again, again.status).events == [], "said once"
