"""What the real-cluster scenarios share: reading jobs, Jobs and Events back from the API server,
and the audit log as the record of who sent what.

The manifests and the tiny model and dataset are the emulator scenarios' (tests.e2e.scenario): the
same job, run against a real control plane.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Final

from tests.cluster.controlplane import ControlPlane

GROUP_VERSION: Final = "kubetune.io/v1alpha1"
PLURALS: Final = {
    "FineTuneJob": "finetunejobs",
    "CompressJob": "compressjobs",
    "FineTuneSweep": "finetunesweeps",
}
FINISHED: Final = ("Succeeded", "Failed")


def path(plural: str, namespace: str, name: str | None = None) -> str:
    group = {"jobs": "/apis/batch/v1", "deployments": "/apis/apps/v1"}.get(plural)
    if plural in PLURALS.values():
        group = f"/apis/{GROUP_VERSION}"
    prefix = f"{group or '/api/v1'}/namespaces/{namespace}/{plural}"
    return f"{prefix}/{name}" if name else prefix


def create(plane: ControlPlane, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(manifest)
    doc.setdefault("metadata", {})["namespace"] = namespace
    plural = PLURALS.get(doc["kind"]) or doc["kind"].lower() + "s"
    status, body = plane.request("POST", path(plural, namespace), doc)
    assert status == 201, body
    return dict(body)


def get(plane: ControlPlane, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    status, body = plane.request("GET", path(plural, namespace, name))
    return dict(body) if status == 200 else None


def names(plane: ControlPlane, plural: str, namespace: str, selector: str = "") -> list[str]:
    query = f"?labelSelector={selector}" if selector else ""
    _, body = plane.request("GET", path(plural, namespace) + query)
    return sorted(item["metadata"]["name"] for item in body["items"])


def status(plane: ControlPlane, plural: str, namespace: str, name: str) -> dict[str, Any]:
    return dict((get(plane, plural, namespace, name) or {}).get("status") or {})


def reach(
    plane: ControlPlane, plural: str, namespace: str, name: str, phase: str, timeout: float
) -> dict[str, Any]:
    """Wait for ``phase``; another finished phase fails at once, with the job's status."""
    deadline = time.monotonic() + timeout
    while True:
        current = status(plane, plural, namespace, name)
        if current.get("phase") == phase:
            return current
        if current.get("phase") in FINISHED:
            raise AssertionError(f"{name} ended {current['phase']} while waiting for {phase}: {current}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {phase} within {timeout}s: {current}")
        time.sleep(0.2)


def events(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """Events about object ``name``, oldest first."""
    _, body = plane.request("GET", path("events", namespace) + f"?fieldSelector=involvedObject.name={name}")
    return sorted(body["items"], key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")


def audited(
    plane: ControlPlane,
    user: str,
    verb: str,
    namespace: str,
    resource: str,
    subresource: str | None,
    code: int,
) -> list[dict[str, Any]]:
    """The completed requests of ``user`` on ``resource`` (and ``subresource``) in ``namespace``
    that the server answered with ``code``, oldest first (audit log)."""
    out = []
    for event in plane.audit_events():
        ref = event.get("objectRef", {})
        if (
            event.get("stage") == "ResponseComplete"
            and event.get("verb") == verb
            and event.get("user", {}).get("username") == user
            and ref.get("namespace") == namespace
            and ref.get("resource") == resource
            and ref.get("subresource") == subresource
            and event.get("responseStatus", {}).get("code") == code
        ):
            out.append(event)
    return out


def created_by(plane: ControlPlane, user: str, namespace: str, resource: str) -> list[str]:
    """Names of the ``resource`` objects ``user`` created in ``namespace``, in order."""
    return [
        e["objectRef"].get("name", "") for e in audited(plane, user, "create", namespace, resource, None, 201)
    ]


def status_patches_by(plane: ControlPlane, user: str, namespace: str, plural: str, name: str) -> int:
    """How many status patches of one job ``user`` made that the server accepted."""
    patches = audited(plane, user, "patch", namespace, plural, "status", 200)
    return sum(1 for e in patches if e["objectRef"].get("name") == name)
