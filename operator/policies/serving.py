"""Serving a succeeded job: its Deployment and Service, ``status.serving`` and ServingReady.

``spec.serve`` may change after success: the Deployment is patched when what it renders changes
(its kubetune.io/spec-hash), and goes with its Service when serving is switched off. A serving
image outside the allowed prefixes leaves serving as it was.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import ConditionType
from kubetune.api.status import JobStatusBase, ServingStatus
from kubetune.operator.admission import disallowed_images, images_message
from kubetune.operator.lifecycle import (
    REASON_IMAGE_NOT_ALLOWED,
    ChildPatch,
    ChildRef,
    Decision,
    Event,
    Observation,
    StateReason,
    get_condition,
    is_true,
    ref_of,
    with_condition,
)
from kubetune.operator.render import ANNOTATION_SPEC_HASH, Manifest, child_names, render_serving, serving_url


def serve(obs: Observation, status: JobStatusBase) -> Decision:
    serve = obs.job.spec.serve
    dep = obs.deployment
    name = child_names(obs.job).serve
    if not serve.enabled:
        if dep is None and not status.serving:
            return Decision(status=status)
        status = status.model_copy(update={"serving": None})
        status = with_condition(
            obs,
            status,
            ConditionType.serving_ready,
            False,
            StateReason.disabled,
            "spec.serve.enabled is false",
        )
        return Decision(
            status=status,
            delete=[ChildRef("apps/v1", "Deployment", name), ChildRef("v1", "Service", name)],
        )
    images = disallowed_images(obs.job, obs.settings, serving_only=True)
    if images:
        message = images_message(images, obs.settings)
        old = get_condition(obs.status.conditions, ConditionType.serving_ready)
        status = with_condition(
            obs, status, ConditionType.serving_ready, False, REASON_IMAGE_NOT_ALLOWED, message
        )
        first = old is None or old.reason != REASON_IMAGE_NOT_ALLOWED
        return Decision(
            status=status, events=[Event("Warning", REASON_IMAGE_NOT_ALLOWED, message)] if first else []
        )
    deployment, service = render_serving(obs.job, obs.settings, obs.namespace)
    decision = Decision(status=status, create=[service])
    if dep is None:
        decision.create.append(deployment)
    elif dep.spec_hash != deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH]:
        decision.patch.append(ChildPatch(ref_of(deployment), deployment_update(deployment), json_patch=True))
        decision.events.append(
            Event("Normal", "ServingUpdated", "spec.serve changed; the serving Deployment was updated")
        )
    ready_replicas = dep.ready_replicas if dep is not None else 0
    ready = ready_replicas >= 1
    url = serving_url(obs.job, obs.namespace)
    status = status.model_copy(
        update={
            "serving": ServingStatus(
                deployment=name, service=name, url=url, ready=ready, ready_replicas=ready_replicas
            )
        }
    )
    if ready:
        status = with_condition(
            obs,
            status,
            ConditionType.serving_ready,
            True,
            StateReason.ready,
            f"{ready_replicas} replica(s) ready at {url}",
        )
        if not is_true(obs.status.conditions, ConditionType.serving_ready):
            decision.events.append(Event("Normal", "ServingReady", f"serving at {url}"))
    else:
        why = "no replicas requested" if serve.replicas == 0 else "waiting for a replica to load the model"
        status = with_condition(obs, status, ConditionType.serving_ready, False, StateReason.not_ready, why)
    decision.status = status
    return decision


def deployment_update(deployment: Manifest) -> list[dict[str, Any]]:
    """A JSON patch replacing the Deployment's replicas and pod template wholesale: a merge patch
    would keep fields the new template no longer has (e.g. vLLM's init container)."""
    return [
        {
            "op": "add",
            "path": "/metadata/annotations/" + ANNOTATION_SPEC_HASH.replace("~", "~0").replace("/", "~1"),
            "value": deployment["metadata"]["annotations"][ANNOTATION_SPEC_HASH],
        },
        {"op": "replace", "path": "/spec/replicas", "value": deployment["spec"]["replicas"]},
        {"op": "replace", "path": "/spec/template", "value": deployment["spec"]["template"]},
    ]
