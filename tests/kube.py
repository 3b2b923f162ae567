"""A Kubernetes API for tests: KMock's KubernetesEmulator with the resources kubetune uses, and
the real operator running against it in-process.

Import the fixtures into a test module (or conftest) to use them::

    from tests.kube import kube, kubeconfig, operator  # noqa: F401

``kube`` is a :class:`KubeEmulator` served on 127.0.0.1; ``kubeconfig`` points KUBECONFIG at it
(that is how both kopf and the operator's own client find it); ``operator`` runs kopf with
``kubetune.operator.handlers`` in the test's event loop. No controllers run: tests play the Job
controller and the kubelet with :func:`start_job`, :func:`complete_job`, :func:`fail_job` and
:func:`set_deployment_ready`. Only the garbage collector is emulated (owner references).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kmock._internal.parsing as _kmock_parsing
import kopf
import pytest
import yaml

from kubetune.operator.settings import Settings

STANDARD_VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}

# (group/version/plural, kind, namespaced, subresources). Everything the operator or kopf touches.
RESOURCES: tuple[tuple[str, str, bool, frozenset[str]], ...] = (
    (
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        frozenset({"status"}),
    ),
    ("v1/namespaces", "Namespace", False, frozenset({"status"})),
    ("v1/events", "Event", True, frozenset()),
    ("kubetune.io/v1alpha1/finetunejobs", "FineTuneJob", True, frozenset({"status"})),
    ("kubetune.io/v1alpha1/compressjobs", "CompressJob", True, frozenset({"status"})),
    ("kubetune.io/v1alpha1/finetunesweeps", "FineTuneSweep", True, frozenset({"status"})),
    ("batch/v1/jobs", "Job", True, frozenset({"status"})),
    ("apps/v1/deployments", "Deployment", True, frozenset({"status", "scale"})),
    ("v1/pods", "Pod", True, frozenset({"status", "log"})),
    ("v1/configmaps", "ConfigMap", True, frozenset()),
    ("v1/services", "Service", True, frozenset({"status"})),
    ("v1/serviceaccounts", "ServiceAccount", True, frozenset()),
    ("v1/secrets", "Secret", True, frozenset()),
    ("rbac.authorization.k8s.io/v1/roles", "Role", True, frozenset()),
    ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding", True, frozenset()),
)
SHORT_NAMES = {"FineTuneJob": {"ftj"}, "CompressJob": {"cj"}, "FineTuneSweep": {"fts"}}


def _parse_path(path: str) -> Any:
    """KMock 0.8 reads /api/v1/namespaces[/NAME] as a namespace with no resource; in Kubernetes
    it is the cluster-scoped resource "namespaces" (kopf lists it when watching namespaces)."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[:2] == ["api", "v1"] else None
    if rest is not None and rest[:1] == ["namespaces"] and len(rest) <= 2:
        return _kmock_parsing.ParsedPath(
            "", "v1", "namespaces", None, rest[1] if len(rest) == 2 else None, None
        )
    return _original_parse_path(path)


_original_parse_path = _kmock_parsing.parse_path
_kmock_parsing.parse_path = _parse_path


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``None`` deletes a key)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _label_selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """KMock's emulator plus what clients rely on from a real API server.

    * metadata.uid, creationTimestamp, generation (bumped when spec changes), resourceVersion;
    * the status subresource: PATCH .../status changes only status, the main resource never does;
    * JSON patches (application/json-patch+json) and label selectors on lists;
    * the garbage collector: deleting an object deletes its dependents (ownerReferences.uid),
      unless propagationPolicy is Orphan (the default for batch/v1 Jobs, as in Kubernetes);
    * O(1) lookups of single objects (the base class scans all objects per request), and
      requests recorded in :attr:`log` (KMock's own history makes each request cost O(history)).
    """

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    journal: list[tuple[float, str, str, str | None, str]] = attrs.field(factory=list, init=False)
    log: list[kmock.Request] = attrs.field(factory=list, init=False)
    _builtin_reactions: int = attrs.field(default=0, init=False)

    def register_resources(self) -> None:
        for path, kind, namespaced, subresources in RESOURCES:
            self.resources[path] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs=STANDARD_VERBS,
                shortnames=SHORT_NAMES.get(kind, set()),
                categories={"kubetune"} if path.startswith("kubetune.io") else set(),
                subresources=subresources,
            )

    def _subresources(self, resource: kmock.resource | None) -> set[str]:
        if resource is None or resource not in self.resources:
            return set()
        return set(self.resources[resource].subresources)

    def _stamp(self, meta: dict[str, Any]) -> None:
        meta["resourceVersion"] = str(next(self._versions))

    def _find(self, resource: Any, namespace: str | None, name: str | None) -> Any:
        key: Any = (resource, namespace, name)
        if name is None or key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj

    def _object(self, request: kmock.Request, namespace: str | None = None, name: str | None = None) -> Any:
        key: Any = (request.resource, namespace or request.namespace, name or request.name)
        return self.objects[key]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # KMock matches each request against every reaction by scanning the whole request
        # history (quadratic in requests); keep only the current one there and the rest in .log.
        self.log.append(request)
        del self._requests[:-1]
        resource = request.resource
        if resource is None or request.action is None:
            return await super()._handle(request)
        action = request.action
        if action == kmock.action.CREATE and isinstance(request.data, dict):
            self._prepare_create(request)
        elif action == kmock.action.UPDATE and isinstance(request.data, list):
            return await self._json_patch(request)
        elif action == kmock.action.UPDATE and isinstance(request.data, dict):
            self._prepare_merge_patch(request)
        if action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE, kmock.action.FETCH) and (
            len(self._payloads) == self._builtin_reactions
        ):
            response = await self._serve_directly(request)
        else:  # lists, watches, and whatever a test reacts to itself
            response = await super()._handle(request)
        if (
            action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
            and response.status < 400
        ):
            name = request.name or (request.data or {}).get("metadata", {}).get("name", "")
            plural = str(resource.plural) + (f"/{request.subresource}" if request.subresource else "")
            self.journal.append(
                (time.monotonic(), str(action.value).lower(), plural, request.namespace, name)
            )
        return response

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._builtin_reactions = len(self._payloads)

    async def _serve_directly(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """The emulator's own semantics for single objects, without KMock's reaction matching
        (which costs milliseconds per request once a few thousand objects exist)."""
        resource = request.resource
        assert resource is not None
        try:
            if request.action == kmock.action.FETCH:
                return aiohttp.web.json_response(await self._serve_fetch(request))
            if request.action == kmock.action.CREATE:
                meta = request.data.get("metadata", {})
                key = (resource, request.namespace or meta.get("namespace"), meta.get("name"))
                async with self._lock:
                    if self._find(*key) is not None:
                        raise kmock.KubernetesError(
                            status=409, reason="AlreadyExists", message=f"{key[2]} already exists"
                        )
                    if key in self.objects:
                        self.objects[key].create(request.data)
                    else:
                        self.objects[key] = request.data
                    raw = self.objects[key].raw
                    await self._buses[resource].put({"type": "ADDED", "object": raw})
                return aiohttp.web.json_response(raw, status=201)
            key = (resource, request.namespace, request.name)
            doomed_uid = None
            async with self._lock:
                obj = self._find(*key)
                if obj is None:
                    raise kmock.KubernetesObjectNotFoundError()
                meta = obj.raw.get("metadata", {})
                if request.action == kmock.action.UPDATE:
                    obj.patch(request.data)
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                    meta = obj.raw.get("metadata", {})
                    release = bool(meta.get("deletionTimestamp")) and not meta.get("finalizers")
                elif meta.get("deletionTimestamp"):
                    release = False
                elif meta.get("finalizers"):
                    obj.patch(
                        {"metadata": {"deletionTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}}
                    )
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                    release = False
                else:
                    release = True
                last = obj.raw
                if release:
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": last})
                    doomed_uid = meta.get("uid")
            if doomed_uid and self._propagation(request) != "Orphan":
                await self._collect_dependents(doomed_uid)
            return aiohttp.web.json_response(last)
        except kmock.KubernetesError as exc:
            return await self._render_error(exc)

    def _prepare_create(self, request: kmock.Request) -> None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if request.namespace is not None:
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        self._stamp(meta)
        if "status" in self._subresources(request.resource):
            data.pop("status", None)

    def _prepare_merge_patch(self, request: kmock.Request) -> None:
        data = request.data
        has_status = "status" in self._subresources(request.resource)
        if request.subresource == "status":
            for key in list(data):
                if key != "status":
                    del data[key]
        elif request.subresource is None and has_status:
            data.pop("status", None)
        obj = self._find(request.resource, request.namespace, request.name)
        meta = data.setdefault("metadata", {})
        if obj is not None and request.subresource is None and "spec" in data:
            old = obj.last.raw
            if merge_patch(old.get("spec"), data["spec"]) != old.get("spec"):
                meta["generation"] = int(old.get("metadata", {}).get("generation") or 1) + 1
        self._stamp(meta)

    async def _json_patch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        assert request.resource is not None
        async with self._lock:
            obj = self._find(request.resource, request.namespace, request.name)
            if obj is None:
                return await self._render_error(kmock.KubernetesObjectNotFoundError())
            old = copy.deepcopy(obj.last.raw)
            try:
                new = jsonpatch.apply_patch(old, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return await self._render_error(
                    kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
                )
            if new.get("spec") != old.get("spec"):
                new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
            self._stamp(new["metadata"])
            obj.create(new)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
        self.journal.append(
            (time.monotonic(), "update", str(request.resource.plural), request.namespace, request.name or "")
        )
        return aiohttp.web.json_response(new)

    @staticmethod
    def _propagation(request: kmock.Request) -> str:
        policy = request.params.get("propagationPolicy")
        if policy is None and isinstance(request.data, dict):
            policy = request.data.get("propagationPolicy")
        if policy is None and request.resource is not None and request.resource.group == "batch":
            return "Orphan"  # batch/v1 Jobs orphan their pods unless told otherwise
        return str(policy or "Background")

    async def _collect_dependents(self, uid: str) -> None:
        pending = [uid]
        while pending:
            owner = pending.pop()
            async with self._lock:
                doomed = [
                    (key, obj)
                    for key, obj in self.objects.items()
                    if not obj.deleted
                    and any(
                        ref.get("uid") == owner
                        for ref in obj.last.raw.get("metadata", {}).get("ownerReferences") or []
                    )
                ]
                for (resource, _, _), obj in doomed:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
                    pending.append(raw["metadata"].get("uid", ""))

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        obj = self._find(request.resource, request.namespace, request.name)
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        if "as=PartialObjectMetadata" in str(request.headers.get("Accept", "")):
            # What a metadata-only GET answers: the object's metadata, none of its data.
            return {
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": copy.deepcopy(obj.raw.get("metadata", {})),
            }
        return obj.raw

    async def _serve_create(self, request: kmock.Request) -> Any:
        meta = request.data.get("metadata", {})
        return self._object(request, meta.get("namespace"), meta.get("name")).raw

    async def _serve_update(self, request: kmock.Request) -> Any:
        return self._object(request).last.raw

    async def _serve_delete(self, request: kmock.Request) -> Any:
        return self._object(request).last.raw

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload: Any = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [
                item
                for item in payload["items"]
                if _label_selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        return payload

    # -- conveniences for tests (objects as plain dicts, None when absent)

    # Shadows KMock's HTTP ``get(url)`` helper on purpose: tests read objects far more often
    # than they send raw GETs (use ``request("GET", url)`` for those).
    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:  # type: ignore[override]
        obj = self._find(kmock.resource(resource), namespace, name)
        return copy.deepcopy(obj.raw) if obj is not None else None

    def names(self, resource: str, namespace: str | None = None) -> list[str]:
        res = kmock.resource(resource)
        return sorted(
            name
            for (r, ns, name), obj in self.objects.items()
            if r == res and not obj.deleted and (namespace is None or ns == namespace)
        )


# --- Requests as a client would send them (User-Agent kmock: not the operator) -----------------


def api_path(
    resource: str, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    res = kmock.resource(resource)
    prefix = "/api/v1" if res.group == "" else f"/apis/{res.group}/{res.version}"
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{res.plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


async def _send(
    kube: KubeEmulator, method: str, path: str, body: Any = None, content_type: str | None = None
) -> Any:
    headers = {"Content-Type": content_type} if content_type else None
    async with kube.request(method, path, json=body, headers=headers) as response:
        payload = await response.json(content_type=None)
        if response.status >= 400:
            raise AssertionError(f"{method} {path} -> {response.status}: {payload.get('message')}")
        return payload


async def create(kube: KubeEmulator, resource: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    namespace = manifest.get("metadata", {}).get("namespace")
    result: dict[str, Any] = await _send(kube, "POST", api_path(resource, namespace), dict(manifest))
    return result


async def patch(
    kube: KubeEmulator,
    resource: str,
    namespace: str | None,
    name: str,
    body: Mapping[str, Any],
    subresource: str | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = await _send(
        kube,
        "PATCH",
        api_path(resource, namespace, name, subresource),
        dict(body),
        "application/merge-patch+json",
    )
    return result


async def delete(kube: KubeEmulator, resource: str, namespace: str | None, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
    await _send(kube, "DELETE", api_path(resource, namespace, name), body)


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy (or stops raising AssertionError)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")
        await asyncio.sleep(0.02)


# --- Playing the Job controller and the kubelet ----------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def start_job(kube: KubeEmulator, namespace: str, name: str) -> None:
    """All of the Job's pods are running and ready."""
    job = kube.get("batch/v1/jobs", namespace, name)
    assert job is not None, f"Job {namespace}/{name} does not exist"
    n = int(job["spec"].get("parallelism") or 1)
    await patch(
        kube,
        "batch/v1/jobs",
        namespace,
        name,
        {"status": {"startTime": _now(), "active": n, "ready": n}},
        "status",
    )


async def complete_job(kube: KubeEmulator, namespace: str, name: str) -> None:
    job = kube.get("batch/v1/jobs", namespace, name)
    assert job is not None, f"Job {namespace}/{name} does not exist"
    n = int(job["spec"].get("completions") or 1)
    status = {
        "active": 0,
        "ready": 0,
        "succeeded": n,
        "completionTime": _now(),
        "conditions": [
            {
                "type": "SuccessCriteriaMet",
                "status": "True",
                "reason": "CompletionsReached",
                "lastTransitionTime": _now(),
            },
            {
                "type": "Complete",
                "status": "True",
                "reason": "CompletionsReached",
                "lastTransitionTime": _now(),
            },
        ],
    }
    await patch(kube, "batch/v1/jobs", namespace, name, {"status": status}, "status")


async def fail_job(
    kube: KubeEmulator, namespace: str, name: str, *, exit_code: int, message: str = "", index: int = 0
) -> None:
    """Pod ``index`` of the Job exits with ``exit_code`` and termination message ``message``; the
    Job fails as the Job controller would with backoffLimit 0 and the podFailurePolicy."""
    job = kube.get("batch/v1/jobs", namespace, name)
    assert job is not None, f"Job {namespace}/{name} does not exist"
    template = job["spec"]["template"]
    container = template["spec"]["containers"][0]["name"]
    pod_name = f"{name}-{index}-x{uuid.uuid4().hex[:4]}"
    pod_labels = {
        **template["metadata"].get("labels", {}),
        "batch.kubernetes.io/job-name": name,
        "job-name": name,
        "batch.kubernetes.io/job-completion-index": str(index),
    }
    owner = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": name,
        "uid": job["metadata"]["uid"],
        "controller": True,
    }
    await create(
        kube,
        "v1/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": pod_labels,
                "ownerReferences": [owner],
            },
            "spec": template["spec"],
        },
    )
    terminated = {"exitCode": exit_code, "reason": "Error", "message": message, "finishedAt": _now()}
    pod_status = {
        "phase": "Failed",
        "containerStatuses": [
            {"name": container, "ready": False, "restartCount": 0, "state": {"terminated": terminated}}
        ],
    }
    await patch(kube, "v1/pods", namespace, pod_name, {"status": pod_status}, "status")
    if exit_code in (2, 3):
        reason = "PodFailurePolicy"
        why = (
            f"Container {container} for pod {namespace}/{pod_name} failed with exit code {exit_code} "
            "matching FailJob rule at index 0"
        )
    else:
        reason, why = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    status = {
        "active": 0,
        "ready": 0,
        "failed": 1,
        "conditions": [
            {
                "type": "FailureTarget",
                "status": "True",
                "reason": reason,
                "message": why,
                "lastTransitionTime": _now(),
            },
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": why,
                "lastTransitionTime": _now(),
            },
        ],
    }
    await patch(kube, "batch/v1/jobs", namespace, name, {"status": status}, "status")


async def set_deployment_ready(kube: KubeEmulator, namespace: str, name: str, ready: int) -> None:
    await patch(
        kube,
        "apps/v1/deployments",
        namespace,
        name,
        {"status": {"readyReplicas": ready, "availableReplicas": ready, "replicas": ready}},
        "status",
    )


# --- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture
async def kube() -> AsyncIterator[KubeEmulator]:
    """The emulated API server, serving every resource kubetune touches."""
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        emulator.register_resources()
        yield emulator


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def kubeconfig(kube: KubeEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG pointing at the emulator, for kopf's and the operator's logins."""
    path = write_kubeconfig(tmp_path / "kubeconfig", str(kube.url).rstrip("/"))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


# Settings of operators under test: no ports, and a fast clock for deadlines and TTLs.
TEST_SETTINGS = Settings(health_port=0, metrics_port=0, resync_seconds=0.2, log_format="text")


@dataclass
class Operator:
    """The real operator (kopf + kubetune.operator.handlers) in a thread with its own event loop,
    as in production: kopf cancels the tasks it did not start when it stops, so it cannot share
    the test's loop."""

    settings: Settings = TEST_SETTINGS
    thread: threading.Thread | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    async def start(self) -> None:
        import kubetune.operator.handlers  # noqa: F401  (registers the handlers)

        self.stop_flag = threading.Event()
        self.error = None
        ready = threading.Event()
        namespaces = list(self.settings.namespaces)
        port = self.settings.health_port
        liveness = f"http://127.0.0.1:{port}/healthz" if port else None

        def main() -> None:
            try:
                kopf.run(
                    clusterwide=not namespaces,
                    namespaces=namespaces,
                    standalone=True,
                    liveness_endpoint=liveness,
                    stop_flag=self.stop_flag,
                    ready_flag=ready,
                    memo=kopf.Memo(config=self.settings),
                    settings=kopf.OperatorSettings(),
                )
            except BaseException as exc:  # reported by stop()
                self.error = exc

        self.thread = threading.Thread(target=main, name="kubetune-operator", daemon=True)
        self.thread.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise AssertionError(f"the operator did not start within 30 seconds: {self.error!r}")

    async def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        thread, self.thread = self.thread, None
        await asyncio.to_thread(thread.join, 30)
        if thread.is_alive():
            raise AssertionError("the operator did not stop within 30 seconds")
        if self.error is not None:
            raise self.error

    async def restart(self) -> None:
        await self.stop()
        await self.start()


@pytest.fixture
async def operator(kube: KubeEmulator, kubeconfig: Path) -> AsyncIterator[Operator]:
    """The operator, started against ``kube``; stopped at the end of the test."""
    running = Operator()
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def finetunejob(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A small valid FineTuneJob manifest; keyword arguments override top-level spec fields."""
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "format": "text"},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
        "hyperparameters": {"maxSteps": 20, "learningRate": 0.0002},
        "resources": {"workers": 2, "requests": {"cpu": "2", "memory": "8Gi"}},
        "output": {"uri": f"s3://runs/{name}"},
        # No secretRef: a job may use a Secret only once it is labelled for it (see the
        # operator's storage_secret scenario).
        "storage": {"endpoint": "http://minio.storage:9000"},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**base, **spec},
    }


def compressjob(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": {"uri": "s3://data/train.jsonl"}, "format": "text"},
        "quantization": {"method": "rtn", "scheme": "W8A16"},
        "output": {"uri": f"s3://runs/{name}"},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CompressJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**base, **spec},
    }


def operator_requests(kube: KubeEmulator) -> list[kmock.Request]:
    """Requests sent by the operator (kopf and its own client), not by the test."""
    return [
        r
        for r in kube.log
        if str(r.headers.get("User-Agent", "")).startswith(("kopf/", "kubetune-operator/"))
    ]


def secret(name: str, ns: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIA-TEST-ID", "AWS_SECRET_ACCESS_KEY": "not-for-the-operator"},
    }


def assert_secrets_read_as_metadata_only(kube: KubeEmulator) -> None:
    secret_requests = [
        r for r in operator_requests(kube) if r.resource is not None and r.resource.plural == "secrets"
    ]
    assert secret_requests, "the operator checked the Secrets"
    for request in secret_requests:
        assert (
            str(request.method.value if hasattr(request.method, "value") else request.method).upper() == "GET"
        )
        assert request.name, "a single Secret, never a list or watch"
        assert str(request.headers.get("Accept")) == (
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
        ), "metadata only, with no fallback to the whole Secret"
