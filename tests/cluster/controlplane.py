"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler, built from source by ``tests/testbin/build.sh``.

The API server authenticates by client certificates and ServiceAccount tokens and authorizes with
the Node and RBAC authorizers; its admission chain is the default one (PodSecurity, ServiceAccount,
NodeRestriction, ...). The controller manager runs each controller under its own ServiceAccount
(``--use-service-account-credentials``), as kubeadm clusters do, so the Job, Deployment, ReplicaSet,
garbage-collector and token controllers here are the ones production runs. No kubelet is part of
it: :mod:`tests.cluster.kubelet` registers the Node and runs the pods the scheduler binds to it.

Every process gets a parent-death signal, so none outlives the test session even when pytest is
killed; their logs stay under ``<directory>/logs`` for failure reports.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from tests.cluster.pki import CertificateAuthority, KeyPair, service_account_keys

REPO: Final = Path(__file__).resolve().parents[2]
BUILD_SCRIPT: Final = REPO / "tests" / "testbin" / "build.sh"
LOOPBACK: Final = "127.0.0.1"
SERVICE_CIDR: Final = "10.96.0.0/16"
# The audience and issuer every ServiceAccount token carries.
ISSUER: Final = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS: Final = (
    "job-controller",
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    # Lifts the not-ready taint that admission puts on every new Node once its kubelet reports Ready.
    "node-lifecycle-controller",
    "pod-garbage-collector-controller",
    "ttl-after-finished-controller",
)
_PR_SET_PDEATHSIG: Final = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the process that started it dies (Linux), so a
    killed test run leaves no component behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def binaries_dir() -> Path:
    """Where build.sh keeps the binaries (building nothing)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def write_kubeconfig(
    path: Path, server: str, ca: Path, *, client: KeyPair | None = None, token: str | None = None
) -> Path:
    user: dict[str, Any] = {}
    if client is not None:
        user = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        user = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler under ``directory``."""

    directory: Path
    bin_dir: Path = field(default_factory=binaries_dir)
    components: list[Component] = field(default_factory=list)
    api_port: int = 0

    def __post_init__(self) -> None:
        self.pki_dir = self.directory / "pki"
        self.logs = self.directory / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority(self.pki_dir)
        self.api_port = free_port()
        self.server = f"https://{LOOPBACK}:{self.api_port}"
        self.admin = self.ca.issue("admin", "kubetune-test-admin", organizations=("system:masters",))
        self.admin_kubeconfig = write_kubeconfig(
            self.directory / "admin.kubeconfig", self.server, self.ca.cert_file, client=self.admin
        )

    # --- identities

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_file

    def node_kubeconfig(self, node: str) -> Path:
        """Credentials of the kubelet of ``node``: the identity the Node authorizer and the
        NodeRestriction admission plugin judge (system:node:NAME in group system:nodes)."""
        pair = self.ca.issue(f"node-{node}", f"system:node:{node}", organizations=("system:nodes",))
        return write_kubeconfig(
            self.directory / f"node-{node}.kubeconfig", self.server, self.ca_file, client=pair
        )

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        return write_kubeconfig(path, self.server, self.ca_file, token=token)

    # --- lifecycle

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.exists():
            raise ControlPlaneError(f"{path} is missing: run `make testbin` (tests/testbin/build.sh)")
        return str(path)

    def start(self, timeout: float = 120.0) -> None:
        sa = service_account_keys(self.pki_dir)
        serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            hosts=(
                LOOPBACK,
                "10.96.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            server=True,
        )
        etcd_port, peer_port = free_port(), free_port()
        etcd = Component(
            "etcd",
            [
                self.binary("etcd"),
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls=http://{LOOPBACK}:{etcd_port}",
                f"--advertise-client-urls=http://{LOOPBACK}:{etcd_port}",
                f"--listen-peer-urls=http://{LOOPBACK}:{peer_port}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer_port}",
                f"--initial-cluster=default=http://{LOOPBACK}:{peer_port}",
                # Test data: nothing to lose on a crash, and fsync dominates etcd's latency here.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.logs / "etcd.log",
        )
        apiserver = Component(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://{LOOPBACK}:{etcd_port}",
                f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.directory / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca_file}",
                f"--service-account-issuer={ISSUER}",
                f"--api-audiences={ISSUER}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=false",
                # The Endpoints of Service "kubernetes" would name 127.0.0.1; nothing reads them.
                "--endpoint-reconciler-type=none",
                f"--audit-log-path={self.logs / 'audit.log'}",
                f"--audit-policy-file={self._audit_policy()}",
                "--v=1",
            ],
            self.logs / "kube-apiserver.log",
        )
        kcm_config = write_kubeconfig(
            self.directory / "kube-controller-manager.kubeconfig",
            self.server,
            self.ca_file,
            client=self.ca.issue("kube-controller-manager", "system:kube-controller-manager"),
        )
        scheduler_config = write_kubeconfig(
            self.directory / "kube-scheduler.kubeconfig",
            self.server,
            self.ca_file,
            client=self.ca.issue("kube-scheduler", "system:kube-scheduler"),
        )
        kcm_port, scheduler_port = free_port(), free_port()
        controller_manager = Component(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={kcm_port}",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={self.ca_file}",
                "--leader-elect=false",
                # Short syncs: tests wait on garbage collection and Job status.
                "--concurrent-gc-syncs=4",
                "--v=1",
            ],
            self.logs / "kube-controller-manager.log",
        )
        scheduler = Component(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--kubeconfig={scheduler_config}",
                f"--authentication-kubeconfig={scheduler_config}",
                f"--authorization-kubeconfig={scheduler_config}",
                f"--bind-address={LOOPBACK}",
                f"--secure-port={scheduler_port}",
                "--leader-elect=false",
                "--v=1",
            ],
            self.logs / "kube-scheduler.log",
        )
        deadline = time.monotonic() + timeout
        etcd.start()
        self.components.append(etcd)
        self._wait(etcd, lambda: _http_ok(f"http://{LOOPBACK}:{etcd_port}/health"), deadline)
        apiserver.start()
        self.components.append(apiserver)
        self._wait(apiserver, lambda: self._ok("/readyz"), deadline)
        for component in (controller_manager, scheduler):
            component.start()
            self.components.append(component)
        self._wait(controller_manager, lambda: _http_ok(f"https://{LOOPBACK}:{kcm_port}/healthz"), deadline)
        self._wait(scheduler, lambda: _http_ok(f"https://{LOOPBACK}:{scheduler_port}/healthz"), deadline)
        # Pods of a namespace need its "default" ServiceAccount and the published root CA: both
        # are there once the controllers have synced.
        for path in (
            "/api/v1/namespaces/default/serviceaccounts/default",
            "/api/v1/namespaces/default/configmaps/kube-root-ca.crt",
        ):
            self._wait(controller_manager, functools.partial(self._ok, path), deadline)

    def stop(self) -> None:
        for component in reversed(self.components):
            component.stop()
        self.components.clear()

    def check_alive(self) -> None:
        dead = [c for c in self.components if not c.alive()]
        if dead:
            raise ControlPlaneError("; ".join(f"{c.name} exited:\n{c.tail()}" for c in dead))

    def report(self, lines: int = 30) -> str:
        return "\n".join(f"--- {c.name} ({c.log})\n{c.tail(lines)}" for c in self.components)

    # --- requests as the admin (for waiting on the control plane itself)

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type} if data else {},
        )
        try:
            with urllib.request.urlopen(request, context=self._ssl(), timeout=10) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())

    def request_patch(self, path: str, body: Any) -> tuple[int, Any]:
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def _ok(self, path: str) -> bool:
        try:
            return self.request("GET", path)[0] == 200
        except (OSError, ValueError):
            return False

    def _wait(self, component: Component, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if not component.alive():
                raise ControlPlaneError(f"{component.name} exited while starting:\n{component.tail()}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{component.name} not ready in time:\n{component.tail()}")
            time.sleep(0.2)

    def _audit_policy(self) -> Path:
        """Metadata of every request by a non-system user: who did what, kept for RBAC reports."""
        path = self.directory / "audit-policy.yaml"
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "None", "userGroups": ["system:nodes"]},
                {"level": "None", "users": ["system:kube-scheduler", "system:apiserver"]},
                {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                {"level": "Metadata"},
            ],
        }
        path.write_text(yaml.safe_dump(policy))
        return path

    def audit_events(self) -> list[dict[str, Any]]:
        path = self.logs / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # --- kubectl

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv: Sequence[str] = [
            self.binary("kubectl"),
            f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result


def _decode(payload: bytes) -> Any:
    """JSON where the server sent JSON (objects, Status), text otherwise (/readyz says "ok")."""
    try:
        return json.loads(payload or b"null")
    except ValueError:
        return payload.decode(errors="replace")


def _http_ok(url: str) -> bool:
    # The controller manager and the scheduler serve /healthz with self-signed certificates.
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False
