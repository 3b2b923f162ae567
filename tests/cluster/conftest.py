"""Fixtures of the real-cluster tier: one control plane per test session, kubetune installed into it
as a user installs it (``kubectl apply -k manifests``), and the operator running with its own
ServiceAccount's token, so the real RBAC authorizer enforces manifests/operator/clusterrole.yaml.

Job namespaces are created per test with Pod Security ``restricted`` enforced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import REPO, ControlPlane, die_with_parent, free_port
from tests.cluster.process_kubelet import ProcessKubelet
from tests.e2e.scenario import kubelet_options as scenario_kubelet_options

OPERATOR_NAMESPACE = "kubetune-system"
OPERATOR_ACCOUNT = "kubetune-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    call = getattr(request.node, "rep_call", None)
    return call is None or bool(call.failed)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler, once per session."""
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
    except BaseException:
        print(plane.report())
        plane.stop()
        raise
    try:
        yield plane
    finally:
        plane.stop()


def create_token(plane: ControlPlane, namespace: str, account: str, duration: str = "2h") -> str:
    return plane.kubectl("create", "token", account, "-n", namespace, f"--duration={duration}").stdout.strip()


@pytest.fixture(scope="session")
def kubetune_installed(control_plane: ControlPlane) -> ControlPlane:
    """``kubectl apply -k manifests``: namespace, CRDs, ServiceAccount, ClusterRole(Binding), the
    operator's Deployment and Service (``KUBETUNE_TEST_KUSTOMIZATION`` names another kustomization,
    e.g. an overlay). The Deployment is scaled to zero: the tier runs the same
    operator as a process it can restart and read the logs of (see :func:`operator`)."""
    control_plane.kubectl(
        "apply", "--server-side", "-k", os.environ.get("KUBETUNE_TEST_KUSTOMIZATION", str(REPO / "manifests"))
    )
    for crd in ("finetunejobs.kubetune.io", "compressjobs.kubetune.io"):
        control_plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    # Established is not yet served: for about a second lists answer 429 "storage is
    # (re)initializing". kopf retries them; waiting here keeps that retry out of every test's timing.
    for plural in ("finetunejobs", "compressjobs"):
        wait_for(
            lambda plural=plural: (
                control_plane.request("GET", f"/apis/kubetune.io/v1alpha1/{plural}")[0] == 200
            ),
            what=f"{plural} to be served",
        )
    control_plane.kubectl("scale", "deployment/kubetune-operator", "-n", OPERATOR_NAMESPACE, "--replicas=0")
    return control_plane


@dataclass
class OperatorProcess:
    """``kubetune operator`` authenticated as its ServiceAccount (a TokenRequest token)."""

    plane: ControlPlane
    directory: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.directory / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        kubeconfig = self.plane.token_kubeconfig(
            self.directory / "operator.kubeconfig",
            create_token(self.plane, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT),
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(self.env, KUBECONFIG=str(kubeconfig))
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubetune.cli", "operator", "--log-format=text"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self) -> str:
        return "\n".join(
            (self.directory / f"operator-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
            if (self.directory / f"operator-{i}.log").exists()
        )


def operator_env(**overrides: str) -> dict[str, str]:
    """The operator Deployment's settings, with a fast clock and no fixed ports."""
    deployment = yaml.safe_load((REPO / "manifests" / "operator" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env.update(
        KUBETUNE_LOG_FORMAT="text",
        KUBETUNE_HEALTH_PORT=str(free_port()),
        KUBETUNE_METRICS_PORT=str(free_port()),
        KUBETUNE_RESYNC_SECONDS="0.5",
        POD_NAMESPACE=OPERATOR_NAMESPACE,
        POD_NAME="kubetune-operator-test",
    )
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def cluster_operator(
    kubetune_installed: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, once per session (tests restart it through :meth:`OperatorProcess.restart`)."""
    running = OperatorProcess(kubetune_installed, tmp_path_factory.mktemp("operator"), operator_env())
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def operator_process(
    cluster_operator: OperatorProcess, request: pytest.FixtureRequest
) -> Iterator[OperatorProcess]:
    """The session's operator, checked alive around the test; its log printed when it fails."""
    if not cluster_operator.alive():
        cluster_operator.start()
    yield cluster_operator
    if _failed(request) or not cluster_operator.alive():
        print(cluster_operator.logs()[-8000:])
    assert cluster_operator.alive(), "the operator exited"


@pytest.fixture(scope="session")
def cluster_kubelet(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    """The node: a process kubelet registered with the control plane, once per session."""
    node = ProcessKubelet(
        None, tmp_path_factory.mktemp("node"), plane=control_plane, **scenario_kubelet_options()
    )
    node.start_thread()
    try:
        yield node
    finally:
        node.stop_thread()


@pytest.fixture
def kubelet(cluster_kubelet: ProcessKubelet, request: pytest.FixtureRequest) -> Iterator[ProcessKubelet]:
    """The session's node; the tail of every container log is printed when the test fails."""
    yield cluster_kubelet
    if _failed(request):
        print(cluster_kubelet.dump_logs(40))


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace enforcing Pod Security ``restricted``, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}
    status, body = control_plane.request("POST", "/api/v1/namespaces", manifest)
    assert status == 201, body
    # Pods need the namespace's "default" ServiceAccount, which the controller manager creates.
    wait_for(
        lambda: control_plane.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
        what=f"ServiceAccount {name}/default",
    )
    yield name
    if _failed(request):
        print(control_plane.kubectl("get", "all,events", "-n", name, check=False).stdout)
        print(control_plane.report(15))
    control_plane.request("DELETE", f"/api/v1/namespaces/{name}")


def wait_for(check: Any, timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")
