"""The process kubelet against the real control plane: the node, and a Job through the real controllers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.conftest import wait_for
from tests.cluster.controlplane import ControlPlane
from tests.cluster.process_kubelet import NODE_NAME, ProcessKubelet

pytestmark = pytest.mark.cluster

RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_the_node_registers_ready_and_schedulable(
    control_plane: ControlPlane, kubelet: ProcessKubelet
) -> None:
    def ready() -> dict[str, Any] | None:
        status, node = control_plane.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200:
            return None
        conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        taints = [t["key"] for t in node["spec"].get("taints", [])]
        return (
            node
            if conditions.get("Ready") == "True" and not node["spec"].get("unschedulable") and not taints
            else None
        )

    node = wait_for(ready, what="the node Ready without taints")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "0"


def test_an_indexed_job_completes_through_the_real_job_controller(
    control_plane: ControlPlane, kubelet: ProcessKubelet, namespace: str
) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "indexed"},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "completionMode": "Indexed",
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python",
                            "command": [
                                "python",
                                "-c",
                                "import os; print(os.environ['JOB_COMPLETION_INDEX'])",
                            ],
                            "securityContext": RESTRICTED_CONTAINER,
                        }
                    ],
                }
            },
        },
    }
    status, body = control_plane.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)
    assert status == 201, body

    def complete() -> bool:
        _, current = control_plane.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/indexed")
        return any(
            c["type"] == "Complete" and c["status"] == "True"
            for c in current.get("status", {}).get("conditions", [])
        )

    wait_for(complete, what="the Job Complete")


def test_a_failing_pod_reports_its_exit_code_and_termination_message(
    control_plane: ControlPlane, kubelet: ProcessKubelet, namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "fails"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python",
                    "command": ["python", "-c", "import sys; print('the reason'); sys.exit(3)"],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        },
    }
    status, body = control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert status == 201, body

    def failed() -> dict[str, Any] | None:
        _, current = control_plane.request("GET", f"/api/v1/namespaces/{namespace}/pods/fails")
        return current if current.get("status", {}).get("phase") == "Failed" else None

    current = wait_for(failed, what="the pod Failed")
    terminated = current["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert "the reason" in terminated.get("message", "")


def test_deleting_a_pod_stops_it_and_the_kubelet_removes_it(
    control_plane: ControlPlane, kubelet: ProcessKubelet, namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sleeps"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": "python",
                    "command": ["python", "-c", "import time; time.sleep(600)"],
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ],
        },
    }
    path = f"/api/v1/namespaces/{namespace}/pods/sleeps"
    assert control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)[0] == 201
    wait_for(
        lambda: control_plane.request("GET", path)[1].get("status", {}).get("phase") == "Running",
        what="Running",
    )
    assert control_plane.request("DELETE", path)[0] == 200
    wait_for(lambda: control_plane.request("GET", path)[0] == 404, what="the pod gone after the final delete")


def test_pod_security_restricted_refuses_a_pod_that_could_escalate(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The job namespaces enforce Pod Security "restricted": the API server itself refuses a
    pod without the restricted securityContext, before any controller or kubelet sees it."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "loose"},
        "spec": {"containers": [{"name": "main", "image": "python", "command": ["true"]}]},
    }
    status, body = control_plane.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
    assert status == 403, body
    assert 'violates PodSecurity "restricted:latest"' in body["message"]
    assert "runAsNonRoot" in body["message"]
