"""The test-side kubelet and Job/Deployment controllers, with generic workloads (plain ``python -c``
programs): what end-to-end tests rely on when they run an operator's Jobs and Deployments."""

from __future__ import annotations

import base64
import json
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.e2e.kubelet import Kubelet, Rewrites, expand, format_indexes
from tests.kube import KubeEmulator, create, delete, eventually, patch

pytestmark = pytest.mark.timeout(120)

NS = "default"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
DEPLOYMENTS = "apps/v1/deployments"


# --- Pure helpers -------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--rank=$(INDEX)", "--rank=3"),
        ("$(UNDEFINED) stays", "$(UNDEFINED) stays"),
        ("$$(INDEX) is escaped", "$(INDEX) is escaped"),
        ("cost: $5", "cost: $5"),
        ("$(INDEX)$(INDEX)", "33"),
        ("unterminated $(INDEX", "unterminated $(INDEX"),
    ],
)
def test_expand_follows_kubernetes_variable_references(text: str, expected: str) -> None:
    assert expand(text, {"INDEX": "3"}) == expected


@pytest.mark.unit
def test_rewrites_map_mount_paths_hosts_and_ports() -> None:
    rewrites = Rewrites(
        paths={"/etc/app": "/host/plan", "/scratch": "/host/scratch", "/dev/termination-log": "/host/term"},
        hosts=["job-0.workers", "job-0.workers.default.svc"],
        ports={29500: 41000, 8000: 42000},
    )
    argv = [
        "torchrun",
        "--master_addr=job-0.workers",
        "--master_port=29500",
        "--port",
        "8000",
        "--count",
        "8000",
        "--plan",
        "/etc/app/plan.json",
        "--out=/scratch",
        "file:/scratch/progress",
        "s3://bucket/scratch/x",
        "/etc/application",
        "http://job-0.workers.default.svc:29500/x",
        "job-0.workers-other",
    ]
    assert rewrites.argv(argv) == [
        "torchrun",
        "--master_addr=127.0.0.1",
        "--master_port=41000",
        "--port",
        "42000",
        "--count",
        "8000",
        "--plan",
        "/host/plan/plan.json",
        "--out=/host/scratch",
        "file:/host/scratch/progress",
        "s3://bucket/scratch/x",
        "/etc/application",
        "http://127.0.0.1:41000/x",
        "job-0.workers-other",
    ]
    env = rewrites.env(
        {"HOME": "/scratch", "MASTER_PORT": "29500", "RETRIES": "8000", "MSG": "/dev/termination-log"}
    )
    assert env == {"HOME": "/host/scratch", "MASTER_PORT": "41000", "RETRIES": "8000", "MSG": "/host/term"}


@pytest.mark.unit
def test_completed_indexes_are_written_as_ranges() -> None:
    assert format_indexes([]) == ""
    assert format_indexes([0]) == "0"
    assert format_indexes([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7-8"


# --- Jobs ---------------------------------------------------------------------------------------


def program(source: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(source)]


def job(name: str, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    pod_spec = spec.pop("pod", {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"restartPolicy": "Never", "containers": containers, **pod_spec},
            },
            **spec,
        },
    }


def status(kube: KubeEmulator, resource: str, name: str) -> dict[str, Any]:
    return dict((kube.get(resource, NS, name) or {}).get("status") or {})


def conditions(kube: KubeEmulator, resource: str, name: str) -> dict[str, dict[str, Any]]:
    return {
        c["type"]: c
        for c in status(kube, resource, name).get("conditions") or []
        if c.get("status") == "True"
    }


def pods_of(kube: KubeEmulator, job_name: str) -> list[dict[str, Any]]:
    return [
        p
        for name in kube.names(PODS, NS)
        if (p := kube.get(PODS, NS, name)) is not None
        and (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job_name
    ]


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"].get("terminated") or {})


async def finished(kube: KubeEmulator, name: str, condition: str, timeout: float = 60) -> dict[str, Any]:
    await eventually(
        lambda: condition in conditions(kube, JOBS, name), timeout=timeout, what=f"Job {name} {condition}"
    )
    return status(kube, JOBS, name)


@pytest.mark.integration
async def test_indexed_job_pods_get_identity_environment_secrets_and_configmap_files(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    await create(
        kube,
        "v1/secrets",
        {
            "metadata": {"name": "creds", "namespace": NS},
            "data": {"token": base64.b64encode(b"s3cr3t").decode()},
        },
    )
    await create(
        kube,
        "v1/configmaps",
        {"metadata": {"name": "settings", "namespace": NS}, "data": {"greeting.txt": "hello"}},
    )
    report = """
        import json, os, pathlib, sys
        print(json.dumps({
            "argv": sys.argv[1:],
            "index": os.environ["JOB_COMPLETION_INDEX"],
            "pod": os.environ["POD_NAME"],
            "namespace": os.environ["POD_NAMESPACE"],
            "token": os.environ["TOKEN"],
            "greeting": pathlib.Path(os.environ["GREETING_FILE"]).read_text(),
            "scratch_is_dir": pathlib.Path(os.environ["SCRATCH"]).is_dir(),
            "home": os.environ["HOME"],
            "kubeconfig": "KUBECONFIG" in os.environ,
            "hostname": os.environ["HOSTNAME"],
        }))
    """
    container = {
        "name": "main",
        "image": "python",
        "command": program(report),
        "args": ["--rank=$(JOB_COMPLETION_INDEX)", "--peer=$(PEER)", "$$(LITERAL)"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "GREETING_FILE", "value": "/etc/settings/greeting.txt"},
            {"name": "SCRATCH", "value": "/scratch"},
            {"name": "HOME", "value": "$(SCRATCH)/home"},
            {"name": "PEER", "value": "ids-0.ids-workers"},
        ],
        "volumeMounts": [
            {"name": "settings", "mountPath": "/etc/settings"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
    }
    manifest = job(
        "ids",
        [container],
        completionMode="Indexed",
        completions=2,
        parallelism=2,
        pod={
            "subdomain": "ids-workers",
            "automountServiceAccountToken": False,
            "volumes": [
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        },
    )
    await create(kube, JOBS, manifest)

    final = await finished(kube, "ids", "Complete")

    assert final["succeeded"] == 2
    assert final["active"] == 0
    assert final["completedIndexes"] == "0-1"
    assert final["startTime"]
    assert final["completionTime"]
    assert "SuccessCriteriaMet" in conditions(kube, JOBS, "ids")
    pods = sorted(pods_of(kube, "ids"), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for p in pods] == ["0", "1"]
    for index, pod in enumerate(pods):
        name = pod["metadata"]["name"]
        assert name.startswith(f"ids-{index}-")
        assert pod["spec"]["hostname"] == f"ids-{index}"
        assert pod["status"]["phase"] == "Succeeded"
        assert terminated(pod)["exitCode"] == 0
        assert terminated(pod)["reason"] == "Completed"
        seen = json.loads(kubelet.log_path(NS, name).read_text().strip().splitlines()[-1])
        assert seen["argv"] == [f"--rank={index}", "--peer=127.0.0.1", "$(LITERAL)"]
        assert seen["index"] == str(index)
        assert seen["pod"] == name
        assert seen["namespace"] == NS
        assert seen["token"] == "s3cr3t"
        assert seen["greeting"] == "hello"
        assert seen["scratch_is_dir"] is True
        assert seen["home"].endswith("/volumes/scratch/home")
        assert seen["kubeconfig"] is False  # the pod opted out of the ServiceAccount token
        assert seen["hostname"] == f"ids-{index}"


@pytest.mark.integration
async def test_gang_members_reach_each_other_by_hostname_and_declared_port(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    gang = """
        import socket, sys, time
        rank, peer = int(sys.argv[1]), sys.argv[2]
        host, port = peer.rsplit(":", 1)
        if rank == 0:
            server = socket.create_server(("0.0.0.0", int(port)))
            conn, _ = server.accept()
            print("got", conn.recv(100).decode())
        else:
            for _ in range(200):
                try:
                    socket.create_connection((host, int(port))).sendall(b"hello from 1")
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                sys.exit(1)
    """
    container = {
        "name": "member",
        "image": "python",
        "command": program(gang),
        "args": ["$(JOB_COMPLETION_INDEX)", "gang-0.gang-workers.default.svc.cluster.local:29500"],
        "ports": [{"name": "rendezvous", "containerPort": 29500}],
    }
    await create(
        kube,
        JOBS,
        job(
            "gang",
            [container],
            completionMode="Indexed",
            completions=2,
            parallelism=2,
            pod={"subdomain": "gang-workers"},
        ),
    )

    await finished(kube, "gang", "Complete")

    leader = next(p for p in pods_of(kube, "gang") if p["spec"]["hostname"] == "gang-0")
    assert kubelet.log_path(NS, leader["metadata"]["name"]).read_text().strip() == "got hello from 1"


@pytest.mark.integration
async def test_fail_job_rule_fails_the_job_with_the_termination_message(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    failing = """
        import pathlib, sys
        pathlib.Path(sys.argv[1]).write_text("InvalidInput: the data is not JSON lines\\n")
        sys.exit(2)
    """
    container = {
        "name": "worker",
        "image": "python",
        "command": program(failing),
        "args": ["/dev/termination-log"],
        "terminationMessagePath": "/dev/termination-log",
    }
    policy = {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2, 3]},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    await create(kube, JOBS, job("invalid", [container], backoffLimit=5, podFailurePolicy=policy))

    await finished(kube, "invalid", "Failed")

    failed = conditions(kube, JOBS, "invalid")["Failed"]
    assert failed["reason"] == "PodFailurePolicy"
    assert "failed with exit code 2 matching FailJob rule at index 0" in failed["message"]
    assert "FailureTarget" in conditions(kube, JOBS, "invalid")
    (pod,) = pods_of(kube, "invalid")  # no retries despite backoffLimit 5
    assert pod["status"]["phase"] == "Failed"
    assert terminated(pod)["exitCode"] == 2
    assert terminated(pod)["message"] == "InvalidInput: the data is not JSON lines"
    assert status(kube, JOBS, "invalid")["failed"] == 1


@pytest.mark.integration
async def test_a_failed_gang_member_fails_the_job_after_its_peers_have_been_terminated(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    member = """
        import sys, time
        if sys.argv[1] == "1":
            print("step 1 ok")
            print("lost my peer, giving up")
            sys.exit(1)
        time.sleep(600)
    """
    container = {
        "name": "member",
        "image": "python",
        "command": program(member),
        "args": ["$(JOB_COMPLETION_INDEX)"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    await create(kube, JOBS, job("gang", [container], completionMode="Indexed", completions=2, parallelism=2))
    leader = await eventually(
        lambda: [p for p in pods_of(kube, "gang") if p["spec"]["hostname"] == "gang-0"], what="leader pod"
    )
    pids = await eventually(
        lambda: kubelet.processes(NS, leader[0]["metadata"]["name"]), what="leader running"
    )

    final = await finished(kube, "gang", "Failed")

    failed = conditions(kube, JOBS, "gang")["Failed"]
    assert failed["reason"] == "BackoffLimitExceeded"
    assert final["failed"] == 1
    assert final["active"] == 0
    assert final["terminating"] == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in pids)
    (pod,) = pods_of(kube, "gang")  # the terminated leader is gone; the failed member stays
    assert terminated(pod)["exitCode"] == 1
    assert terminated(pod)["message"] == "step 1 ok\nlost my peer, giving up"


@pytest.mark.integration
async def test_backoff_limit_allows_retries_until_a_pod_succeeds(
    kube: KubeEmulator, kubelet: Kubelet, tmp_path: Path
) -> None:
    marker = tmp_path / "attempted"
    flaky = f"""
        import pathlib, sys
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.touch()
            sys.exit(1)
    """
    await create(
        kube,
        JOBS,
        job("flaky", [{"name": "main", "image": "python", "command": program(flaky)}], backoffLimit=1),
    )

    final = await finished(kube, "flaky", "Complete")

    assert final["failed"] == 1
    assert final["succeeded"] == 1
    assert sorted(p["status"]["phase"] for p in pods_of(kube, "flaky")) == ["Failed", "Succeeded"]


@pytest.mark.integration
async def test_suspended_jobs_run_nothing_until_resumed_and_stop_when_suspended_again(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    sleeper = {"name": "main", "image": "python", "command": program("import time; time.sleep(600)")}
    await create(kube, JOBS, job("later", [sleeper], suspend=True))
    await eventually(lambda: "Suspended" in conditions(kube, JOBS, "later"), what="Suspended")
    assert pods_of(kube, "later") == []
    assert "startTime" not in status(kube, JOBS, "later")

    await patch(kube, JOBS, NS, "later", {"spec": {"suspend": False}})
    running = await eventually(
        lambda: [p for p in pods_of(kube, "later") if p.get("status", {}).get("phase") == "Running"],
        what="running pod",
    )
    procs = kubelet.processes(NS, running[0]["metadata"]["name"])
    assert procs
    assert status(kube, JOBS, "later")["active"] == 1
    assert status(kube, JOBS, "later")["startTime"]

    await patch(kube, JOBS, NS, "later", {"spec": {"suspend": True}})
    await eventually(
        lambda: "Suspended" in conditions(kube, JOBS, "later") and not pods_of(kube, "later"),
        what="suspended again",
    )
    await eventually(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), what="killed"
    )
    assert status(kube, JOBS, "later")["active"] == 0


@pytest.mark.integration
async def test_deleting_a_job_kills_its_processes_including_own_sessions(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    # The child starts its own session (as torchrun's workers do): a process-group kill misses it.
    parent = """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        time.sleep(600)
    """
    await create(kube, JOBS, job("doomed", [{"name": "main", "image": "python", "command": program(parent)}]))
    pod = (await eventually(lambda: pods_of(kube, "doomed"), what="pod"))[0]["metadata"]["name"]

    def both_running() -> list[psutil.Process]:
        procs = kubelet.processes(NS, pod)
        return procs if len(procs) == 2 else []

    procs = await eventually(both_running, what="two processes")

    await delete(kube, JOBS, NS, "doomed")

    await eventually(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs), what="killed"
    )
    assert pods_of(kube, "doomed") == []


@pytest.mark.integration
async def test_a_missing_secret_keeps_the_container_waiting_until_it_exists(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    container = {
        "name": "main",
        "image": "python",
        "command": program("import os; print(os.environ['KEY'])"),
        "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late", "key": "key"}}}],
    }
    await create(kube, JOBS, job("patient", [container]))

    def waiting() -> dict[str, Any] | None:
        pods = pods_of(kube, "patient")
        statuses = pods[0].get("status", {}).get("containerStatuses") if pods else None
        return statuses[0]["state"].get("waiting") if statuses else None

    state = await eventually(
        lambda: (w := waiting()) and w.get("reason") == "CreateContainerConfigError" and w, what="waiting"
    )
    assert "Secret default/late not found" in state["message"]

    await create(
        kube, "v1/secrets", {"metadata": {"name": "late", "namespace": NS}, "stringData": {"key": "finally"}}
    )

    await finished(kube, "patient", "Complete")
    (pod,) = pods_of(kube, "patient")
    assert kubelet.log_path(NS, pod["metadata"]["name"]).read_text().strip() == "finally"


# --- Deployments and Services -------------------------------------------------------------------


SERVER = """
    import argparse, http.server, os
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    port = parser.parse_args().port

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ["ANSWER"].encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
"""


def deployment(answer: str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "server",
        "image": "python",
        "command": program(SERVER),
        "args": ["--port", "8000"],
        "env": [{"name": "ANSWER", "value": answer}],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": probe,
        "livenessProbe": probe,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [container]}},
        },
    }


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


@pytest.mark.integration
async def test_deployment_pods_become_ready_behind_their_service_and_roll_on_template_change(
    kube: KubeEmulator, kubelet: Kubelet
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    await create(kube, "v1/services", service)
    await create(kube, DEPLOYMENTS, deployment("first"))

    await eventually(lambda: status(kube, DEPLOYMENTS, "web").get("readyReplicas") == 1, what="ready")
    assert "Available" in conditions(kube, DEPLOYMENTS, "web")
    url = kubelet.url("http://web.default.svc:8000/v1/models")
    assert url.startswith("http://127.0.0.1:")
    assert not url.startswith("http://127.0.0.1:8000/")
    assert url.endswith("/v1/models")
    assert await get_text(url) == "first"
    (first_pod,) = kubelet.pod_names(NS, app="web")

    await patch(
        kube, DEPLOYMENTS, NS, "web", {"spec": {"template": deployment("second")["spec"]["template"]}}
    )

    async def rolled() -> bool:
        names = kubelet.pod_names(NS, app="web")
        if first_pod in names or len(names) != 1:
            return False
        try:
            return await get_text(kubelet.url("http://web.default.svc.cluster.local:8000/")) == "second"
        except (LookupError, aiohttp.ClientError):
            return False

    # eventually() awaits coroutine results; its annotation cannot say so for async checks.
    await eventually(rolled, timeout=60, what="rolled to the new template")  # type: ignore[arg-type]
    final = status(kube, DEPLOYMENTS, "web")
    assert (
        final["replicas"],
        final["updatedReplicas"],
        final["readyReplicas"],
        final["availableReplicas"],
    ) == (1, 1, 1, 1)
    assert [c.restart_count for run in kubelet.pods.values() for c in run.containers] == [0]


@pytest.mark.integration
async def test_a_service_without_ready_pods_has_no_url(kube: KubeEmulator, kubelet: Kubelet) -> None:
    await create(
        kube,
        "v1/services",
        {
            "metadata": {"name": "idle", "namespace": NS},
            "spec": {"selector": {"app": "idle"}, "ports": [{"port": 80}]},
        },
    )
    with pytest.raises(LookupError, match="no ready pod behind Service default/idle"):
        kubelet.url("http://idle.default.svc/")
    with pytest.raises(LookupError, match="Service default/absent does not exist"):
        kubelet.url("http://absent.default.svc/")


@pytest.mark.integration
async def test_a_crashing_server_is_restarted(kube: KubeEmulator, kubelet: Kubelet, tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    crash_once = f"""
        import pathlib, runpy, sys
        counter = pathlib.Path({str(counter)!r})
        starts = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(starts))
        if starts == 1:
            sys.exit(7)
        exec(compile({textwrap.dedent(SERVER)!r}, "server", "exec"))
    """
    manifest = deployment("up")
    manifest["spec"]["template"]["spec"]["containers"][0]["command"] = [
        "python",
        "-c",
        textwrap.dedent(crash_once),
    ]
    await create(kube, DEPLOYMENTS, manifest)

    await eventually(
        lambda: status(kube, DEPLOYMENTS, "web").get("readyReplicas") == 1, timeout=60, what="ready"
    )

    (pod_name,) = kubelet.pod_names(NS, app="web")
    pod = kube.get(PODS, NS, pod_name)
    assert pod is not None
    container_status = pod["status"]["containerStatuses"][0]
    assert container_status["restartCount"] == 1
    assert container_status["lastState"]["terminated"]["exitCode"] == 7
