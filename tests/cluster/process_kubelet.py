"""A kubelet for a real control plane that runs pods as local processes.

It is :class:`tests.e2e.kubelet.Kubelet`'s pod runtime (environment, ``$(VAR)`` expansion,
secretKeyRef/configMapKeyRef/fieldRef/envFrom, emptyDir/configMap/secret volumes as directories,
DNS and port translation, probes, termination messages, restart policies, process-tree kills) with
the emulator's Job and Deployment controllers switched off: the real kube-controller-manager does
that work, and the real kube-scheduler decides which pods come here. What this class adds is what
a kubelet does against a real API server:

* it authenticates as ``system:node:NAME`` (a client certificate in group ``system:nodes``), so the
  Node authorizer and the NodeRestriction admission plugin judge every request it makes;
* it registers its Node (capacity: cpu, memory, pods, ``nvidia.com/gpu: 0``; condition Ready);
* it runs the pods bound to it (``spec.nodeName``), reading the Secrets, ConfigMaps and
  ServiceAccounts they reference from the API (which the Node authorizer allows for its pods only);
* it fills the ``kube-api-access-*`` projected volume that ServiceAccount admission adds with a
  token from the TokenRequest API bound to the pod, and gives the pod's containers ``KUBECONFIG``
  pointing at a kubeconfig with that token: client libraries read in-cluster credentials from a
  fixed path a process cannot have, and this is the stand-in, with the pod's own identity;
* it enforces ``limits.memory``: a container whose processes' resident memory goes over it is
  killed (the whole tree, SIGKILL) and reported ``OOMKilled`` with exit code 137;
* it honours deletion as the kubelet does: on ``deletionTimestamp`` it stops the containers
  (SIGTERM, SIGKILL after the grace period), writes the pod's terminal status, then deletes the pod
  with grace period 0.

It runs in a thread with its own event loop so that synchronous tests can use it; the API is read
with blocking requests from that loop (loopback, a few milliseconds each), which only delays its
own probes. It renews its Lease and heartbeat, so the node-lifecycle controller lifts the
``node.kubernetes.io/not-ready`` taint that admission puts on every new Node, and keeps it off.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import yaml

from tests.cluster.controlplane import ControlPlane
from tests.e2e.kubelet import NODE_NAME, PODS, ConfigError, Kubelet, PodRun, now

SERVICE_ACCOUNT_MOUNT: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
HEARTBEAT_SECONDS: Final = 5.0
CAPACITY: Final = {"cpu": "64", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "0"}
_RESOURCE_PATHS: Final = {
    "v1/pods": "pods",
    "v1/secrets": "secrets",
    "v1/configmaps": "configmaps",
    "v1/serviceaccounts": "serviceaccounts",
    "v1/services": "services",
}


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user(kubeconfig: Path) -> dict[str, str]:
    config = yaml.safe_load(kubeconfig.read_text())
    return dict(config["users"][0]["user"])


@dataclass(kw_only=True)
class ProcessKubelet(Kubelet):
    """Runs the pods a real scheduler binds to node ``NODE_NAME`` (see the module docstring)."""

    plane: ControlPlane | None = None
    node_kubeconfig: Path | None = None
    # A container over its limits.memory is killed with reason OOMKilled, as by a node's kernel.
    enforce_memory_limits: bool = True
    _ssl: ssl.SSLContext | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _loop_ref: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _api: aiohttp.ClientSession | None = field(default=None, init=False)
    _finished: set[str] = field(default_factory=set, init=False)
    _heartbeat_at: float = field(default=0.0, init=False)
    _listed: list[dict[str, Any]] | None = field(default=None, init=False)
    _stop_requested: asyncio.Event | None = field(default=None, init=False)

    # --- lifecycle (a thread of its own)

    def start_thread(self) -> None:
        assert self.plane is not None
        self.node_kubeconfig = self.plane.node_kubeconfig(NODE_NAME)
        user = _user(self.node_kubeconfig)
        context = ssl.create_default_context(cafile=str(self.plane.ca_file))
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        self._ssl = context
        self._register_node()
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            # The loop lives until stop() has run on it to the end: the kubelet's own task ends
            # early in stop(), so "the task is done" cannot be the signal to close the loop.
            loop = asyncio.new_event_loop()
            self._loop_ref = loop
            self._stop_requested = asyncio.Event()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_until_complete(self._serve_until_stop_requested())
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="process-kubelet", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]

    async def _serve_until_stop_requested(self) -> None:
        assert self._stop_requested is not None
        await self._stop_requested.wait()
        await self.stop()

    def stop_thread(self) -> None:
        loop, thread, requested = self._loop_ref, self._thread, self._stop_requested
        if loop is None or thread is None or requested is None:
            return
        loop.call_soon_threadsafe(requested.set)
        thread.join(90)
        if thread.is_alive():
            raise RuntimeError("the process kubelet did not stop within 90 s")
        self._thread = None

    async def start(self) -> None:
        self._api = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl or False))
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._api is not None:
            await self._api.close()
            self._api = None

    # --- the Node

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        }
        status, body = self._request("POST", "/api/v1/nodes", node)
        if status not in (201, 409):
            raise RuntimeError(f"cannot register Node {NODE_NAME}: {status} {body}")
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "process kubelet is posting ready status",
            "lastHeartbeatTime": now(),
            "lastTransitionTime": now(),
        }
        node_status = {
            "status": {
                "capacity": CAPACITY,
                "allocatable": CAPACITY,
                "conditions": [condition],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": NODE_NAME},
                ],
                "nodeInfo": {
                    "kubeletVersion": "v1.37.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }
        status, body = self._request(
            "PATCH",
            f"/api/v1/nodes/{NODE_NAME}/status",
            node_status,
            "application/strategic-merge-patch+json",
        )
        if status != 200:
            raise RuntimeError(f"cannot report Node {NODE_NAME} ready: {status} {body}")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NODE_NAME, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": NODE_NAME, "leaseDurationSeconds": 40, "renewTime": _micro_now()},
        }
        status, body = self._request(
            "POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease
        )
        if status not in (201, 409):
            raise RuntimeError(f"cannot create the Lease of {NODE_NAME}: {status} {body}")
        self._heartbeat_at = time.monotonic()

    async def _heartbeat(self) -> None:
        """Renew the Lease and the Ready condition's heartbeat every few seconds."""
        if time.monotonic() - self._heartbeat_at < HEARTBEAT_SECONDS:
            return
        self._heartbeat_at = time.monotonic()
        await self._send(
            "PATCH",
            f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{NODE_NAME}",
            {"spec": {"renewTime": _micro_now()}},
            "application/merge-patch+json",
        )
        condition = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now()}
        await self._send(
            "PATCH",
            f"/api/v1/nodes/{NODE_NAME}/status",
            {"status": {"conditions": [condition]}},
            "application/strategic-merge-patch+json",
        )

    # --- the API server (blocking reads, async writes)

    def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        assert self.plane is not None
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.plane.server + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, context=self._ssl, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _node_pods(self) -> list[dict[str, Any]]:
        """Every pod bound to this node, those being deleted included."""
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={NODE_NAME}"})
        status, body = self._request("GET", f"/api/v1/pods?{query}")
        if status != 200:
            raise RuntimeError(f"GET /api/v1/pods?{query}: {status} {body}")
        return [dict(item) for item in body["items"]]

    def _objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        # The runtime lists only this node's pods (the Node authorizer allows nothing wider); the
        # list _sync_deletions made at the start of this loop serves it, one request per loop.
        if resource != PODS or namespace is not None:
            raise RuntimeError(f"the process kubelet lists only its node's pods, not {resource}")
        pods, self._listed = (self._listed if self._listed is not None else self._node_pods()), None
        # Pods being deleted are handled by _sync_deletions; the runtime sees them as gone.
        return [p for p in pods if not p["metadata"].get("deletionTimestamp")]

    def _get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        plural = _RESOURCE_PATHS[resource]
        status, body = self._request("GET", f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        return dict(body) if status == 200 else None

    async def _send(self, method: str, path: str, body: Any, content_type: str | None = None) -> bool:
        assert self._api is not None
        assert self.plane is not None
        headers = {"Content-Type": content_type or "application/json"}
        async with self._api.request(
            method, self.plane.server + path, json=body, headers=headers
        ) as response:
            if response.status == 404:
                return False
            if response.status >= 400:
                text = await response.text()
                raise RuntimeError(f"{method} {path} -> {response.status}: {text[:500]}")
            return True

    # --- the control loop: no Job or Deployment controller here

    async def _sync_jobs(self) -> None:
        await self._sync_deletions()

    async def _sync_deployments(self) -> None:
        await self._heartbeat()

    async def _sync_deletions(self) -> None:
        """Pods with a deletionTimestamp: stop what runs (the runtime sees them as gone), then
        delete the object for good once nothing of it runs here."""
        self._listed = self._node_pods()
        running = {run.uid for run in self.pods.values()} | set(self._terminating)
        for pod in self._listed:
            meta = pod["metadata"]
            if not meta.get("deletionTimestamp") or meta["uid"] in running or meta["uid"] in self._finished:
                continue
            self._finished.add(meta["uid"])
            await self._delete_for_good(meta["namespace"], meta["name"], meta["uid"])

    async def _finish_termination(self, run: PodRun) -> None:
        try:
            await self._terminate(run)
            if run.phase not in ("Succeeded", "Failed"):
                codes = [c.exit_code for c in run.containers]
                run.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
            for container in run.all_containers():
                if container.exit_code is None:
                    container.state = {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "Error",
                            "finishedAt": now(),
                            "startedAt": run.start_time,
                        }
                    }
            # The terminal status first: the Job controller counts a deleted pod by its phase.
            await self._patch_status(PODS, run.namespace, run.name, run.status())
            self._finished.add(run.uid)
            await self._delete_for_good(run.namespace, run.name, run.uid)
        finally:
            self._terminating.pop(run.uid, None)
            self._poke()

    async def _delete_for_good(self, namespace: str, name: str, uid: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            await self._send("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
        except RuntimeError as exc:  # 409: a newer pod of the same name; nothing of ours left
            self.errors.append(f"{now()} final delete of {namespace}/{name}: {exc}")

    def _namespace_pods(self, namespace: str) -> list[dict[str, Any]]:
        # The Node authorizer lets a node list only its own pods; every pod of these tests runs on
        # this one node, so those are all the hostnames cluster DNS would resolve.
        return [
            p
            for p in self._node_pods()
            if p["metadata"]["namespace"] == namespace and not p["metadata"].get("deletionTimestamp")
        ]

    # --- ServiceAccount tokens

    def _other_volume(self, run: PodRun, volume: Mapping[str, Any], path: Path) -> None:
        """The ``kube-api-access-*`` volume ServiceAccount admission adds: a projected volume."""
        if "projected" not in volume:
            super()._other_volume(run, volume, path)
            return
        for source in volume["projected"].get("sources") or []:
            self._project_source(run, source, path)

    def _project_source(self, run: PodRun, source: dict[str, Any], path: Path) -> None:
        if "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            (path / spec.get("path", "token")).write_text(
                self._token(run, int(spec.get("expirationSeconds", 3607)))
            )
        elif "configMap" in source:
            self._project(run.namespace, {"name": "projected", "configMap": source["configMap"]}, path)
        elif "secret" in source:
            secret = dict(source["secret"])
            secret["secretName"] = secret.pop("name", "")
            self._project(run.namespace, {"name": "projected", "secret": secret}, path)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                (path / item["path"]).write_text(self._field(run, item["fieldRef"]["fieldPath"]))
        else:
            raise ConfigError(f"projected volume source {sorted(source)} is not supported here")

    def _token(self, run: PodRun, seconds: int) -> str:
        account = run.spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": max(seconds, 600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid},
            },
        }
        status, body = self._request(
            "POST", f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{account}/token", request
        )
        if status != 201:
            raise ConfigError(f"TokenRequest for {run.namespace}/{account}: {status} {body}")
        return str(body["status"]["token"])

    def _prepare(self, run: PodRun) -> None:
        super()._prepare(run)
        token_volume = next(
            (
                m["name"]
                for c in run.spec.get("containers") or []
                for m in c.get("volumeMounts") or []
                if m.get("mountPath") == SERVICE_ACCOUNT_MOUNT
            ),
            None,
        )
        if token_volume is None or self.plane is None:
            return
        token = (run.root / "volumes" / token_volume / "token").read_text()
        kubeconfig = self.plane.token_kubeconfig(run.root / "kubeconfig", token)
        for container in run.all_containers():
            container.env.setdefault("KUBECONFIG", str(kubeconfig))
