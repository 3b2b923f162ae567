"""A kubelet, a Job controller and a Deployment controller for the Kubernetes emulator.

No cluster runs on these machines, so end-to-end tests need something that turns the objects an
operator creates into running processes and reports back, as Kubernetes would. :class:`Kubelet`
does exactly that for ``batch/v1`` Jobs and ``apps/v1`` Deployments in a
:class:`tests.kube.KubeEmulator`, and knows nothing about what it runs:

Job controller
    Creates the Pods of a Job (Indexed and NonIndexed completion modes) up to ``parallelism``,
    honours ``suspend`` (no pods; running ones are terminated), ``backoffLimit``,
    ``podFailurePolicy`` (``FailJob``/``Ignore``/``Count`` rules on exit codes and pod conditions)
    and ``activeDeadlineSeconds``, and writes the Job's status as Kubernetes 1.31+ does: ``active``,
    ``ready``, ``succeeded``, ``failed``, ``terminating``, ``startTime``, ``completionTime``,
    ``completedIndexes`` and the ``Suspended``/``FailureTarget``/``Failed``/``SuccessCriteriaMet``/
    ``Complete`` conditions (``Failed`` only once the Job's remaining pods have terminated).
    Indexed pods are named ``<job>-<index>-<suffix>``, get hostname ``<job>-<index>``, the
    ``batch.kubernetes.io/job-completion-index`` label and annotation, and ``JOB_COMPLETION_INDEX``.
Deployment controller
    Keeps ``replicas`` pods of the current template (``pod-template-hash``), rolls to a new
    template by starting new pods first and removing the old ones once the new ones are ready, and
    reports ``replicas``/``updatedReplicas``/``readyReplicas``/``availableReplicas`` with the
    ``Available`` and ``Progressing`` conditions. Pods are owned by the Deployment itself (there
    are no ReplicaSet objects).
Kubelet
    Runs every container of every Pod as a local process group, with the environment Kubernetes
    would give it, and writes Pod status: phase, ``Ready`` condition and
    ``containerStatuses[].state`` (``terminated.exitCode``/``reason``/``message``, the message
    read from ``terminationMessagePath``, or the log tail under ``FallbackToLogsOnError``).
    Container restarts follow ``restartPolicy``; startup, readiness and liveness probes
    (``httpGet``, ``tcpSocket``, ``exec``) run with their periods capped at ``probe_period_cap``
    seconds so tests need not wait for production timings. Deleting a Pod terminates its processes
    (SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``, capped at ``max_grace_seconds``),
    every descendant included, also those that started their own sessions.

A process is not a container, so a few things are emulated by rewriting what the process sees
(argv, command and env values; never files or program code):

* Environment: ``env`` values, ``$(VAR)`` expansion (``$$`` escapes) in env, command and args,
  ``valueFrom.secretKeyRef``/``configMapKeyRef`` (read from the emulator; a missing one keeps the
  container waiting in ``CreateContainerConfigError`` until it appears), ``fieldRef`` (metadata
  name/namespace/uid/labels/annotations, spec.nodeName/serviceAccountName, status.podIP/hostIP),
  ``envFrom``. On top: ``PATH`` of the "image" (``image_path``, this interpreter's bin directory by
  default), ``base_env`` from the test and, for pods that mount a ServiceAccount token
  (``automountServiceAccountToken``, pod over ServiceAccount, default true), ``KUBECONFIG``
  pointing at the emulator: the stand-in for in-cluster credentials. RBAC is not enforced.
* Volumes: ``emptyDir`` and ``configMap``/``secret`` volumes (items or all keys) become
  directories under the pod's work directory. A value in argv/env that names a ``mountPath`` (the
  whole value, or after ``=``, ``:``, ``,`` or a space, followed by ``/`` or the end) has that
  prefix rewritten to the directory (``subPath`` honoured). ``terminationMessagePath`` is a file in
  the same way; programs that hard-code the path instead of reading it from argv/env can be told
  the real file through the ``termination_message_env`` variable the test chooses.
* DNS: ``<hostname>.<subdomain>`` of every pod in the namespace (also with ``.<ns>.svc`` and
  ``.<ns>.svc.cluster.local``) is rewritten to ``127.0.0.1``.
* Ports: every declared ``containerPort`` gets a free loopback port; one mapping per Job (its pods
  reach each other on the same port number, as in a cluster) and one per Deployment pod (replicas
  would collide). A port number P is rewritten to its mapped port where it is the value of a
  ``--*port`` flag (``--port P``, ``--master_port=P``), a ``host:P`` in a URL or address, or the
  value of an env variable whose name contains ``PORT``. Probes use the mapping too.
  :meth:`Kubelet.url` maps a Service URL (``http://<svc>.<ns>.svc:<port>/...``) to a ready pod
  behind it.

Memory limits: with ``enforce_memory_limits`` (the cluster tier's kubelet sets it) a container
whose processes' resident memory goes over ``limits.memory`` is killed, its whole tree, and
reported as the kernel's OOM killer is: exit code 137, reason ``OOMKilled``.

Each container's stdout and stderr go to ``<workdir>/<namespace>/<pod>/<container>.log``;
:meth:`Kubelet.dump_logs` gathers their tails for failure reports.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import kmock
import psutil

log = logging.getLogger("tests.e2e.kubelet")

JOBS: Final = "batch/v1/jobs"
DEPLOYMENTS: Final = "apps/v1/deployments"
PODS: Final = "v1/pods"
SERVICES: Final = "v1/services"
SECRETS: Final = "v1/secrets"
CONFIGMAPS: Final = "v1/configmaps"
SERVICEACCOUNTS: Final = "v1/serviceaccounts"

LABEL_CONTROLLER_UID: Final = "batch.kubernetes.io/controller-uid"
LABEL_JOB_NAME: Final = "batch.kubernetes.io/job-name"
LABEL_COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
ANNOTATION_COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"
LABEL_TEMPLATE_HASH: Final = "pod-template-hash"

LOOPBACK: Final = "127.0.0.1"
NODE_NAME: Final = "e2e-kubelet"
DEFAULT_TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
# What the kubelet keeps of a termination message and of the log fallback.
_MESSAGE_MAX_BYTES: Final = 4096
_LOG_FALLBACK_BYTES: Final = 2048
_LOG_FALLBACK_LINES: Final = 80


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def format_indexes(indexes: Iterable[int]) -> str:
    """Indexes the way Job status writes them: ``0-2,4``."""
    ranges: list[list[int]] = []
    for i in sorted(set(indexes)):
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is a literal
    ``$``, anything else (an undefined ``$(VAR)`` included) stays as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(char)
        i += 1
    return "".join(out)


def condition(type_: str, status: bool, reason: str = "", message: str = "") -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_,
        "status": "True" if status else "False",
        "lastTransitionTime": now(),
    }
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``new`` over ``old`` by type; a condition keeps its transition time while its status holds."""
    by_type = {c["type"]: dict(c) for c in old}
    for cond in new:
        previous = by_type.get(cond["type"])
        if previous is not None and previous.get("status") == cond["status"]:
            cond = {
                **cond,
                "lastTransitionTime": previous.get("lastTransitionTime", cond["lastTransitionTime"]),
            }
        by_type[cond["type"]] = cond
    return list(by_type.values())


def _is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in conditions or [])


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Rewriting what a process sees --------------------------------------------------------------


_PORT_FLAG = re.compile(r"^--?[\w.-]*port$", re.IGNORECASE)
_PORT_FLAG_VALUE = re.compile(r"^(--?[\w.-]*port)=(\d+)$", re.IGNORECASE)
_HOST_PORT = re.compile(r"(?<=[\w\]]:)(\d+)(?!\d)")


@dataclass(frozen=True)
class Rewrites:
    """How container paths, cluster host names and container ports map onto this machine."""

    paths: Mapping[str, str] = field(default_factory=dict)
    hosts: Sequence[str] = ()
    ports: Mapping[int, int] = field(default_factory=dict)

    def _path_pattern(self) -> re.Pattern[str] | None:
        if not self.paths:
            return None
        alternatives = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        return re.compile(rf"(?:^|(?<=[=:,\s]))({alternatives})(?=$|[/\s,:])")

    def _host_pattern(self) -> re.Pattern[str] | None:
        if not self.hosts:
            return None
        alternatives = "|".join(re.escape(h) for h in sorted(self.hosts, key=len, reverse=True))
        return re.compile(rf"(?<![\w.-])({alternatives})(?![\w-]|\.[\w])")

    def _common(self, text: str) -> str:
        hosts = self._host_pattern()
        if hosts is not None:
            text = hosts.sub(LOOPBACK, text)
        if self.ports:
            text = _HOST_PORT.sub(lambda m: str(self.ports.get(int(m.group(1)), m.group(1))), text)
        paths = self._path_pattern()
        if paths is not None:
            text = paths.sub(lambda m: self.paths[m.group(1)], text)
        return text

    def argv(self, argv: Sequence[str]) -> list[str]:
        out: list[str] = []
        for i, token in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if self.ports and token.isdigit() and _PORT_FLAG.match(previous) and int(token) in self.ports:
                out.append(str(self.ports[int(token)]))
                continue
            flag = _PORT_FLAG_VALUE.match(token)
            if self.ports and flag and int(flag.group(2)) in self.ports:
                out.append(f"{flag.group(1)}={self.ports[int(flag.group(2))]}")
                continue
            out.append(self._common(token))
        return out

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in env.items():
            if "PORT" in name.upper() and value.isdigit() and int(value) in self.ports:
                out[name] = str(self.ports[int(value)])
            else:
                out[name] = self._common(value)
        return out


# --- Processes ----------------------------------------------------------------------------------


class ConfigError(Exception):
    """A container cannot be created yet (missing Secret or ConfigMap, unsupported volume)."""


@dataclass
class ContainerRun:
    """One container of a pod: its process (restarted per restartPolicy) and its observed state."""

    name: str
    spec: dict[str, Any]
    log_path: Path
    termination_path: Path
    init: bool = False
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: asyncio.subprocess.Process | None = None
    tree: dict[int, psutil.Process] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    started: bool = False  # startup probe passed (or none)
    ready: bool = False
    oom_killed: bool = False  # its process tree went over limits.memory (enforce_memory_limits)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def exit_code(self) -> int | None:
        term = self.state.get("terminated")
        return None if term is None else int(term["exitCode"])

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.running and self.started,
            "restartCount": self.restart_count,
            "state": copy.deepcopy(self.state),
        }
        if self.last_state:
            out["lastState"] = copy.deepcopy(self.last_state)
        return out


@dataclass
class PodRun:
    """A pod the kubelet runs."""

    namespace: str
    name: str
    uid: str
    pod: dict[str, Any]
    root: Path
    ports: dict[int, int]
    containers: list[ContainerRun] = field(default_factory=list)
    init_containers: list[ContainerRun] = field(default_factory=list)
    phase: str = "Pending"
    start_time: str = field(default_factory=now)
    terminating: bool = False
    task: asyncio.Task[None] | None = None
    written: dict[str, Any] | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.pod.get("spec") or {})

    def all_containers(self) -> list[ContainerRun]:
        return [*self.init_containers, *self.containers]

    def ready(self) -> bool:
        return self.phase == "Running" and bool(self.containers) and all(c.ready for c in self.containers)

    def status(self) -> dict[str, Any]:
        initialized = all(c.exit_code == 0 for c in self.init_containers)
        ready = self.ready()
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": LOOPBACK,
            "podIP": LOOPBACK,
            "podIPs": [{"ip": LOOPBACK}],
            "startTime": self.start_time,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True" if initialized else "False"},
                {"type": "ContainersReady", "status": "True" if ready else "False"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        return status


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _track(container: ContainerRun) -> None:
    """Remember every descendant of the container's process: children that start their own session
    (torchrun's workers do) survive a process-group kill, and orphans lose their parent link."""
    if container.process is None:
        return
    try:
        root = psutil.Process(container.process.pid)
        found = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in found:
        container.tree.setdefault(proc.pid, proc)
    for pid, proc in list(container.tree.items()):
        if not _alive(proc):
            del container.tree[pid]


def _signal_tree(container: ContainerRun, sig: signal.Signals) -> None:
    _track(container)
    for proc in list(container.tree.values()):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


_QUANTITY: Final = re.compile(r"^([0-9.]+(?:[eE][0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_SUFFIX: Final = {
    None: 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("64Mi", "1G", "1e9") in bytes."""
    match = _QUANTITY.match(str(quantity).strip())
    if match is None:
        raise ConfigError(f"memory quantity {quantity!r} is not understood here")
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])


def _tree_rss(container: ContainerRun) -> int:
    _track(container)
    total = 0
    for proc in list(container.tree.values()):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _read_message(container: ContainerRun, exit_code: int) -> str:
    try:
        message = (
            container.termination_path.read_bytes()[:_MESSAGE_MAX_BYTES].decode("utf-8", "replace").strip()
        )
    except OSError:
        message = ""
    policy = container.spec.get("terminationMessagePolicy", "File")
    if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
        try:
            lines = container.log_path.read_bytes().decode("utf-8", "replace").splitlines()
        except OSError:
            lines = []
        message = "\n".join(lines[-_LOG_FALLBACK_LINES:])
        encoded = message.encode()
        if len(encoded) > _LOG_FALLBACK_BYTES:
            message = encoded[-_LOG_FALLBACK_BYTES:].decode("utf-8", "ignore")
    return message


# --- The executor -------------------------------------------------------------------------------


@dataclass
class Kubelet:
    """Runs the emulator's Jobs and Deployments as local processes (see the module docstring).

    Use as ``async with Kubelet(kube, workdir, kubeconfig=...) as kubelet:`` inside a test's event
    loop, or call :meth:`start` and :meth:`stop`.
    """

    kube: Any  # tests.kube.KubeEmulator (kept loose: only objects/request/url are used)
    workdir: Path
    kubeconfig: Path | None = None
    image_path: Sequence[str] = (str(Path(sys.executable).parent),)
    base_env: Mapping[str, str] = field(default_factory=dict)
    termination_message_env: str | None = None
    # Kill a container whose processes' resident memory goes over its limits.memory, reported as
    # the kernel's OOM killer is (exit code 137, reason OOMKilled). Off: limits are ignored.
    enforce_memory_limits: bool = False
    poll_interval: float = 0.1
    probe_period_cap: float = 1.0
    max_grace_seconds: float = 5.0
    pods: dict[tuple[str, str], PodRun] = field(default_factory=dict, init=False)
    _terminating: dict[str, PodRun] = field(default_factory=dict, init=False)
    _job_ports: dict[str, dict[int, int]] = field(default_factory=dict, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _http: aiohttp.ClientSession | None = field(default=None, init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _stopping: bool = field(default=False, init=False)
    errors: list[str] = field(default_factory=list, init=False)

    async def __aenter__(self) -> Kubelet:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._loop(), name="e2e-kubelet")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._poke()
            await task
        runs = [*self.pods.values(), *self._terminating.values()]
        await asyncio.gather(*(self._terminate(run, grace=1.0) for run in runs), return_exceptions=True)
        self.pods.clear()
        self._terminating.clear()
        for leftover in list(self._background):
            leftover.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- what tests use

    def url(self, url: str) -> str:
        """A Service URL (``http://<svc>.<ns>.svc:<port>/path``, or ``<svc>.<ns>``) rewritten to
        the loopback address of a ready pod behind that Service. Raises LookupError otherwise."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        labels = host.removesuffix(".cluster.local").removesuffix(".svc").split(".")
        if len(labels) != 2:
            raise LookupError(f"{url}: expected a host <service>.<namespace>[.svc[.cluster.local]]")
        name, namespace = labels
        service = self._get(SERVICES, namespace, name)
        if service is None:
            raise LookupError(f"{url}: Service {namespace}/{name} does not exist")
        ports = service.get("spec", {}).get("ports") or []
        port = parts.port or (80 if parts.scheme == "http" else 443)
        entry = next((p for p in ports if int(p.get("port", 0)) == port), None)
        if entry is None:
            raise LookupError(f"{url}: Service {namespace}/{name} has no port {port} (has {ports})")
        target = entry.get("targetPort", entry["port"])
        selector = service.get("spec", {}).get("selector") or {}
        for run in self.pods.values():
            labels_ = run.pod.get("metadata", {}).get("labels") or {}
            if run.namespace != namespace or not run.ready() or not _selector_matches(selector, labels_):
                continue
            container_port = self._container_port(run, target)
            if container_port is not None and container_port in run.ports:
                netloc = f"{LOOPBACK}:{run.ports[container_port]}"
                return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        raise LookupError(f"{url}: no ready pod behind Service {namespace}/{name}")

    def pod_names(self, namespace: str, **labels: str) -> list[str]:
        return sorted(
            run.name
            for run in self.pods.values()
            if run.namespace == namespace
            and all((run.pod["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
        )

    def processes(self, namespace: str, pod: str) -> list[psutil.Process]:
        """The live processes of a running pod (every container, descendants included)."""
        run = self.pods.get((namespace, pod))
        if run is None:
            return []
        out: list[psutil.Process] = []
        for container in run.all_containers():
            _track(container)
            out += [p for p in container.tree.values() if _alive(p)]
        return out

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        base = self.workdir / namespace / pod
        if container is None:
            logs = sorted(base.glob("*.log"))
            if not logs:
                raise LookupError(f"pod {namespace}/{pod} has no logs under {base}")
            return logs[0]
        return base / f"{container}.log"

    def dump_logs(self, lines: int = 60) -> str:
        """The last ``lines`` of every container log this kubelet wrote, for failure reports."""
        chunks: list[str] = []
        for path in sorted(self.workdir.glob("*/*/*.log"), key=lambda p: p.stat().st_mtime):
            text = path.read_text(errors="replace").splitlines()
            rel = path.relative_to(self.workdir)
            chunks.append(f"===== {rel} (last {min(lines, len(text))} of {len(text)} lines) =====")
            chunks += text[-lines:]
        if self.errors:
            chunks.append("===== executor errors =====")
            chunks += self.errors
        return "\n".join(chunks)

    # -- the API server

    def _objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        out = []
        for (r, ns, _), obj in list(self.kube.objects.items()):
            if r == res and not obj.deleted and (namespace is None or ns == namespace):
                out.append(copy.deepcopy(obj.raw))
        return out

    def _get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.kube.objects:
            return None
        obj = self.kube.objects[key]
        return None if obj.deleted else copy.deepcopy(obj.raw)

    @staticmethod
    def _path(resource: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        res = kmock.resource(resource)
        path = "/api/v1" if res.group == "" else f"/apis/{res.group}/{res.version}"
        path += (f"/namespaces/{namespace}" if namespace else "") + f"/{res.plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _send(self, method: str, path: str, body: Any, content_type: str | None = None) -> bool:
        headers = {"Content-Type": content_type} if content_type else None
        async with self.kube.request(method, path, json=body, headers=headers) as response:
            if response.status == 404:
                return False  # deleted meanwhile: nothing left to report on
            if response.status >= 400:
                text = await response.text()
                raise RuntimeError(f"{method} {path} -> {response.status}: {text[:500]}")
            return True

    async def _create(self, resource: str, manifest: dict[str, Any]) -> None:
        await self._send("POST", self._path(resource, manifest["metadata"]["namespace"]), manifest)

    async def _delete(self, resource: str, namespace: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        await self._send("DELETE", self._path(resource, namespace, name), body)

    async def _delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod and start terminating its processes at once, so that controllers count it
        as terminating from now on (the emulator removes objects without a grace period)."""
        await self._delete(PODS, namespace, name)
        run = self.pods.pop((namespace, name), None)
        if run is not None:
            self._terminating[run.uid] = run
            self._spawn(self._finish_termination(run))

    async def _patch_status(
        self, resource: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> bool:
        path = self._path(resource, namespace, name, "status")
        return await self._send("PATCH", path, {"status": dict(status)}, "application/merge-patch+json")

    # -- the control loop

    async def _loop(self) -> None:
        # Stopped by a flag, not by cancelling: Python 3.11's wait_for can swallow a cancellation.
        while not self._stopping:
            try:
                await self._sync_jobs()
                await self._sync_deployments()
                await self._sync_pods()
            except Exception as e:  # one bad sync must not stop the executor; tests see the log
                log.exception("executor sync failed")
                self.errors.append(f"{now()} sync failed: {type(e).__name__}: {e}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _poke(self) -> None:
        self._wake.set()

    def _owned_pods(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        return [p for p in self._objects(PODS, namespace) if _owned_by(p, uid)]

    def _terminating_count(self, uid: str) -> int:
        return sum(1 for run in self._terminating.values() if _owned_by(run.pod, uid))

    # -- Job controller

    async def _sync_jobs(self) -> None:
        for job in self._objects(JOBS):
            await self._sync_job(job)

    async def _sync_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        old = dict(job.get("status") or {})
        conditions = list(old.get("conditions") or [])
        pods = self._owned_pods(namespace, uid)
        phase = {p["metadata"]["name"]: (p.get("status") or {}).get("phase", "Pending") for p in pods}
        active = [p for p in pods if phase[p["metadata"]["name"]] not in ("Succeeded", "Failed")]
        succeeded = [p for p in pods if phase[p["metadata"]["name"]] == "Succeeded"]
        failed = [p for p in pods if phase[p["metadata"]["name"]] == "Failed"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 1)
        parallelism = _int(spec.get("parallelism"), 1)
        done = {_index(p) for p in succeeded} if indexed else set()
        status: dict[str, Any] = {}
        new_conditions: list[dict[str, Any]] = []

        if _is_true(conditions, "Complete") or _is_true(conditions, "Failed"):
            return  # finished Jobs are never touched again

        failure = _is_true(conditions, "FailureTarget")
        counted = 0
        if not failure:
            for pod in failed:
                action, why = _failure_action(spec, pod)
                if action == "FailJob":
                    new_conditions.append(condition("FailureTarget", True, "PodFailurePolicy", why))
                    failure = True
                    break
                if action == "Count":
                    counted += 1
            backoff = _int(spec.get("backoffLimit"), 6)
            if not failure and counted > backoff:
                why = "Job has reached the specified backoff limit"
                new_conditions.append(condition("FailureTarget", True, "BackoffLimitExceeded", why))
                failure = True
            deadline = spec.get("activeDeadlineSeconds")
            started = old.get("startTime")
            if not failure and deadline is not None and started and not spec.get("suspend"):
                elapsed = (
                    time.time()
                    - datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
                )
                if elapsed > float(deadline):
                    why = "Job was active longer than specified deadline"
                    new_conditions.append(condition("FailureTarget", True, "DeadlineExceeded", why))
                    failure = True

        complete = len(done) >= completions if indexed else len(succeeded) >= completions
        if failure or complete or spec.get("suspend"):
            for pod in active:
                await self._delete_pod(namespace, pod["metadata"]["name"])
            active = []
        terminating = self._terminating_count(uid)

        if failure:
            target = next((c for c in [*new_conditions, *conditions] if c["type"] == "FailureTarget"), None)
            if target is not None and terminating == 0:
                new_conditions.append(
                    condition("Failed", True, target.get("reason", ""), target.get("message", ""))
                )
        elif complete:
            if terminating == 0:
                new_conditions.append(
                    condition(
                        "SuccessCriteriaMet",
                        True,
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                )
                new_conditions.append(
                    condition(
                        "Complete", True, "CompletionsReached", "Reached expected number of succeeded pods"
                    )
                )
                status["completionTime"] = now()
        elif spec.get("suspend"):
            new_conditions.append(condition("Suspended", True, "JobSuspended", "Job suspended"))
            status["startTime"] = None
        else:
            if _is_true(conditions, "Suspended"):
                new_conditions.append(condition("Suspended", False, "JobResumed", "Job resumed"))
            if not old.get("startTime"):
                status["startTime"] = now()
            if terminating == 0 or spec.get("podReplacementPolicy") != "Failed":
                created = await self._create_job_pods(
                    job, active, done, indexed, completions, parallelism, len(succeeded)
                )
                active += created

        ready = sum(1 for p in active if _is_true((p.get("status") or {}).get("conditions"), "Ready"))
        status.update(
            {
                "active": len(active),
                "ready": ready,
                "succeeded": len(succeeded),
                "failed": len(failed),
                "terminating": terminating,
            }
        )
        if indexed:
            status["completedIndexes"] = format_indexes(done) or None
        if new_conditions:
            status["conditions"] = _merge_conditions(conditions, new_conditions)
        if any(old.get(k) != v for k, v in status.items()):
            await self._patch_status(JOBS, namespace, name, status)

    async def _create_job_pods(
        self,
        job: dict[str, Any],
        active: list[dict[str, Any]],
        done: set[int],
        indexed: bool,
        completions: int,
        parallelism: int,
        succeeded: int,
    ) -> list[dict[str, Any]]:
        created: list[dict[str, Any]] = []
        if indexed:
            running = {_index(p) for p in active}
            for index in range(completions):
                if len(active) + len(created) >= parallelism:
                    break
                if index in done or index in running:
                    continue
                created.append(self._job_pod(job, index))
        else:
            wanted = min(parallelism, completions - succeeded) - len(active)
            created = [self._job_pod(job, None) for _ in range(max(0, wanted))]
        for pod in created:
            await self._create(PODS, pod)
        return created

    def _job_pod(self, job: dict[str, Any], index: int | None) -> dict[str, Any]:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"]["template"])
        suffix = secrets.token_hex(3)[:5]
        name = f"{meta['name']}-{index}-{suffix}" if index is not None else f"{meta['name']}-{suffix}"
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update(
            {
                LABEL_CONTROLLER_UID: meta["uid"],
                LABEL_JOB_NAME: meta["name"],
                "controller-uid": meta["uid"],
                "job-name": meta["name"],
            }
        )
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        pod_spec = template.get("spec") or {}
        if index is not None:
            labels[LABEL_COMPLETION_INDEX] = str(index)
            annotations[ANNOTATION_COMPLETION_INDEX] = str(index)
            pod_spec["hostname"] = f"{meta['name']}-{index}"
            index_env = {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_COMPLETION_INDEX}']"}
                },
            }
            for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
                container["env"] = [index_env, *container.get("env", [])]
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner],
            },
            "spec": pod_spec,
        }

    # -- Deployment controller

    async def _sync_deployments(self) -> None:
        for deployment in self._objects(DEPLOYMENTS):
            await self._sync_deployment(deployment)

    async def _sync_deployment(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        template = spec.get("template") or {}
        template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        replicas = _int(spec.get("replicas"), 1)
        pods = self._owned_pods(namespace, uid)
        current = [
            p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_TEMPLATE_HASH) == template_hash
        ]
        old = [p for p in pods if p not in current]

        def ready(pod: Mapping[str, Any]) -> bool:
            return _is_true((pod.get("status") or {}).get("conditions"), "Ready")

        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        for pod in current[replicas:]:
            await self._delete_pod(namespace, pod["metadata"]["name"])
        current = current[:replicas]
        current_ready = sum(1 for p in current if ready(p))
        if old and (recreate or current_ready >= replicas):
            for pod in old:
                await self._delete_pod(namespace, pod["metadata"]["name"])
            old = []
        if not (recreate and (old or self._terminating_count(uid))):
            for _ in range(replicas - len(current)):
                pod = self._deployment_pod(deployment, template, template_hash)
                await self._create(PODS, pod)
                current.append(pod)

        all_pods = current + old
        ready_count = sum(1 for p in all_pods if ready(p))
        available = ready_count >= replicas
        progressing = current_ready >= replicas and not old
        status: dict[str, Any] = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(all_pods),
            "updatedReplicas": len(current),
            "readyReplicas": ready_count,
            "availableReplicas": ready_count,
            "unavailableReplicas": max(0, replicas - ready_count) or None,
        }
        conditions = (deployment.get("status") or {}).get("conditions") or []
        status["conditions"] = _merge_conditions(
            conditions,
            [
                condition(
                    "Available",
                    available,
                    "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                    "Deployment has minimum availability."
                    if available
                    else "Deployment does not have minimum availability.",
                ),
                condition(
                    "Progressing",
                    True,
                    "NewReplicaSetAvailable" if progressing else "ReplicaSetUpdated",
                    f'Pods of template "{template_hash}" are {"available" if progressing else "progressing"}.',
                ),
            ],
        )
        old_status = deployment.get("status") or {}
        if any(old_status.get(k) != v for k, v in status.items()):
            await self._patch_status(DEPLOYMENTS, namespace, name, status)

    def _deployment_pod(
        self, deployment: dict[str, Any], template: dict[str, Any], template_hash: str
    ) -> dict[str, Any]:
        meta = deployment["metadata"]
        labels = {**(template.get("metadata", {}).get("labels") or {}), LABEL_TEMPLATE_HASH: template_hash}
        owner = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{template_hash}-{secrets.token_hex(3)[:5]}",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                "ownerReferences": [owner],
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
        }

    # -- kubelet

    async def _sync_pods(self) -> None:
        live = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self._objects(PODS)}
        for key, run in list(self.pods.items()):
            pod = live.get(key)
            if pod is None or pod["metadata"].get("uid") != run.uid:
                del self.pods[key]
                self._terminating[run.uid] = run
                self._spawn(self._finish_termination(run))
        for key, pod in live.items():
            if key not in self.pods and pod["metadata"].get("uid") not in self._terminating:
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    continue  # a pod that ran (and ended) before this kubelet: nothing to run
                self._admit(pod)
        for key, run in list(self.pods.items()):
            for container in run.all_containers():
                if container.running:
                    _track(container)
            status = run.status()
            if status != run.written and key in live:
                run.written = copy.deepcopy(status)
                if not await self._patch_status(PODS, run.namespace, run.name, status):
                    run.written = None

    def _admit(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        root = self.workdir / namespace / name
        root.mkdir(parents=True, exist_ok=True)
        spec = pod.get("spec") or {}
        run = PodRun(
            namespace=namespace, name=name, uid=meta["uid"], pod=pod, root=root, ports=self._ports(pod)
        )

        def make(c: dict[str, Any], init: bool) -> ContainerRun:
            return ContainerRun(
                name=c["name"],
                spec=c,
                log_path=root / f"{c['name']}.log",
                termination_path=root / "containers" / c["name"] / "termination-log",
                init=init,
            )

        run.init_containers = [make(c, True) for c in spec.get("initContainers") or []]
        run.containers = [make(c, False) for c in spec.get("containers") or []]
        self.pods[(namespace, name)] = run
        run.task = asyncio.create_task(self._run_pod(run), name=f"pod {namespace}/{name}")

    def _ports(self, pod: Mapping[str, Any]) -> dict[int, int]:
        """One port mapping per owning Job (pods address each other by the same port), else per pod."""
        meta = pod["metadata"]
        refs = meta.get("ownerReferences") or []
        job_uid = next((r["uid"] for r in refs if r.get("kind") == "Job"), None)
        wanted = {
            int(p["containerPort"])
            for c in [*pod["spec"].get("initContainers", []), *pod["spec"].get("containers", [])]
            for p in c.get("ports") or []
        }
        if job_uid is None:
            return {p: free_port() for p in wanted}
        mapping = self._job_ports.setdefault(job_uid, {})
        for p in wanted - mapping.keys():
            mapping[p] = free_port()
        return mapping

    async def _run_pod(self, run: PodRun) -> None:
        try:
            while not run.terminating:
                try:
                    self._prepare(run)
                    break
                except ConfigError as e:
                    for c in run.all_containers():
                        c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                    self._poke()
                    await asyncio.sleep(max(self.poll_interval, 0.2))
            policy = run.spec.get("restartPolicy", "Always")
            for container in run.init_containers:
                while not run.terminating:
                    code = await self._run_once(run, container)
                    if code == 0 or policy == "Never" or run.terminating:
                        break
                    await self._backoff(container)
                if container.exit_code != 0:
                    run.phase = "Failed" if not run.terminating else run.phase
                    self._poke()
                    return
            if run.terminating:
                return
            run.phase = "Running"
            await asyncio.gather(*(self._run_container(run, c, policy) for c in run.containers))
            if not run.terminating:
                codes = [c.exit_code for c in run.containers]
                run.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("pod %s/%s failed in the executor", run.namespace, run.name)
            self.errors.append(f"{now()} pod {run.namespace}/{run.name}: {type(e).__name__}: {e}")
            for c in run.containers:
                if c.exit_code is None:
                    c.state = {
                        "terminated": {
                            "exitCode": 128,
                            "reason": "StartError",
                            "message": str(e),
                            "finishedAt": now(),
                        }
                    }
            run.phase = "Failed"
        finally:
            self._poke()

    async def _run_container(self, run: PodRun, container: ContainerRun, policy: str) -> None:
        while not run.terminating:
            code = await self._run_once(run, container)
            if run.terminating or policy == "Never" or (policy == "OnFailure" and code == 0):
                return
            await self._backoff(container)

    async def _backoff(self, container: ContainerRun) -> None:
        delay = min(0.5 * 2**container.restart_count, 5.0)
        container.last_state = {"terminated": container.state.get("terminated", {})}
        container.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay}s restarting failed container",
            }
        }
        container.restart_count += 1
        self._poke()
        await asyncio.sleep(delay)

    async def _run_once(self, run: PodRun, container: ContainerRun) -> int:
        """Start the container's process, probe it, and wait for it to end; returns its exit code."""
        container.termination_path.parent.mkdir(parents=True, exist_ok=True)
        container.termination_path.write_bytes(b"")
        executable = (
            shutil.which(container.argv[0], path=container.env.get("PATH")) if container.argv else None
        )
        started_at = now()
        if executable is None:
            why = f'exec: "{container.argv[0] if container.argv else ""}": executable file not found in $PATH'
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": why,
                    "startedAt": started_at,
                    "finishedAt": now(),
                }
            }
            self._poke()
            return 128
        with container.log_path.open("ab") as log_file:
            container.process = await asyncio.create_subprocess_exec(
                executable,
                *container.argv[1:],
                env=container.env,
                cwd=container.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        container.tree = {}
        _track(container)
        container.state = {"running": {"startedAt": started_at}}
        probes = None if container.init else asyncio.create_task(self._probe(run, container))
        container.started = probes is None or "startupProbe" not in container.spec
        container.oom_killed = False
        limit = ((container.spec.get("resources") or {}).get("limits") or {}).get("memory")
        memory = (
            asyncio.create_task(self._enforce_memory(container, memory_bytes(limit)))
            if limit is not None and self.enforce_memory_limits
            else None
        )
        self._poke()
        try:
            returncode = await container.process.wait()
        finally:
            for task in (probes, memory):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        # The container ends with its main process: whatever it left behind goes with it.
        _signal_tree(container, signal.SIGKILL)
        code = returncode if returncode >= 0 else 128 - returncode
        container.ready = False
        container.started = False
        reason = "Completed" if code == 0 else "Error"
        if container.oom_killed:
            code, reason = 137, "OOMKilled"
        container.state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "message": _read_message(container, code),
                "startedAt": started_at,
                "finishedAt": now(),
            }
        }
        if returncode < 0:
            container.state["terminated"]["signal"] = -returncode
        if not container.state["terminated"]["message"]:
            del container.state["terminated"]["message"]
        self._poke()
        return code

    async def _enforce_memory(self, container: ContainerRun, limit: int) -> None:
        """Kill the container's whole process tree once its resident memory exceeds ``limit``, as
        a cgroup's OOM killer does (memory.oom.group: the container goes, not one process)."""
        while container.running:
            if _tree_rss(container) > limit:
                container.oom_killed = True
                _signal_tree(container, signal.SIGKILL)
                return
            await asyncio.sleep(0.05)

    # -- probes

    async def _probe(self, run: PodRun, container: ContainerRun) -> None:
        spec = container.spec
        startup, readiness, liveness = (
            spec.get("startupProbe"),
            spec.get("readinessProbe"),
            spec.get("livenessProbe"),
        )
        if startup is not None and not await self._until(run, container, startup):
            return await self._restart(container, "startup probe failed")
        container.started = True
        if readiness is None:
            container.ready = True
            self._poke()
        period = min(float((readiness or liveness or {}).get("periodSeconds", 10)), self.probe_period_cap)
        if readiness is not None:
            await asyncio.sleep(min(float(readiness.get("initialDelaySeconds", 0)), self.probe_period_cap))
        if liveness is not None:
            await asyncio.sleep(min(float(liveness.get("initialDelaySeconds", 0)), self.probe_period_cap))
        ready_streak = fail_streak = live_fails = 0
        while container.running:
            if readiness is not None:
                ok = await self._check(run, container, readiness)
                ready_streak, fail_streak = (ready_streak + 1, 0) if ok else (0, fail_streak + 1)
                was = container.ready
                if ok and ready_streak >= int(readiness.get("successThreshold", 1)):
                    container.ready = True
                elif not ok and fail_streak >= int(readiness.get("failureThreshold", 3)):
                    container.ready = False
                if was != container.ready:
                    self._poke()
            if liveness is not None:
                live_fails = 0 if await self._check(run, container, liveness) else live_fails + 1
                if live_fails >= int(liveness.get("failureThreshold", 3)):
                    return await self._restart(container, "liveness probe failed")
            await asyncio.sleep(period)

    async def _until(self, run: PodRun, container: ContainerRun, probe: Mapping[str, Any]) -> bool:
        """Run a startup probe until it succeeds (True) or fails ``failureThreshold`` times."""
        await asyncio.sleep(min(float(probe.get("initialDelaySeconds", 0)), self.probe_period_cap))
        period = min(float(probe.get("periodSeconds", 10)), self.probe_period_cap)
        for _ in range(int(probe.get("failureThreshold", 3))):
            if not container.running:
                return False
            if await self._check(run, container, probe):
                return True
            await asyncio.sleep(period)
        return False

    async def _restart(self, container: ContainerRun, why: str) -> None:
        log.info("killing container %s: %s", container.name, why)
        _signal_tree(container, signal.SIGTERM)
        await asyncio.sleep(min(self.max_grace_seconds, 2.0))
        _signal_tree(container, signal.SIGKILL)

    async def _check(self, run: PodRun, container: ContainerRun, probe: Mapping[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                action = probe["httpGet"]
                port = self._host_port(run, container, action["port"])
                scheme = str(action.get("scheme", "HTTP")).lower()
                url = f"{scheme}://{LOOPBACK}:{port}{action.get('path', '/')}"
                assert self._http is not None
                headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
                client_timeout = aiohttp.ClientTimeout(total=timeout)
                async with self._http.get(url, headers=headers, timeout=client_timeout) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                port = self._host_port(run, container, probe["tcpSocket"]["port"])
                _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
                writer.close()
                return True
            if "exec" in probe:
                argv = Rewrites(ports=run.ports).argv(probe["exec"]["command"])
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=container.env,
                    cwd=container.cwd,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                try:
                    return await asyncio.wait_for(proc.wait(), timeout) == 0
                except TimeoutError:
                    proc.kill()
                    return False
        except (OSError, TimeoutError, aiohttp.ClientError, LookupError):
            return False
        return False

    def _container_port(self, run: PodRun, port: int | str) -> int | None:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for c in run.containers:
            for p in c.spec.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
        return None

    def _host_port(self, run: PodRun, container: ContainerRun, port: int | str) -> int:
        number = self._container_port(run, port)
        if number is None:
            raise LookupError(f"container {container.name} declares no port named {port!r}")
        return run.ports.get(number, number)

    # -- termination

    async def _finish_termination(self, run: PodRun) -> None:
        try:
            await self._terminate(run)
        finally:
            self._terminating.pop(run.uid, None)
            self._poke()

    async def _terminate(self, run: PodRun, grace: float | None = None) -> None:
        run.terminating = True
        if grace is None:
            grace = min(float(run.spec.get("terminationGracePeriodSeconds", 30)), self.max_grace_seconds)
        running = [c for c in run.all_containers() if c.running]
        for c in running:
            _signal_tree(c, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.running for c in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for c in run.all_containers():
            _signal_tree(c, signal.SIGKILL)
        if run.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(run.task), timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                run.task.cancel()

    # -- environment, volumes and rewriting

    def _prepare(self, run: PodRun) -> None:
        spec = run.spec
        volumes = self._volumes(run)
        hosts = self._cluster_hosts(run.namespace)
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            account = self._get(SERVICEACCOUNTS, run.namespace, spec.get("serviceAccountName") or "default")
            automount = (account or {}).get("automountServiceAccountToken", True)
        for container in run.all_containers():
            c = container.spec
            paths: dict[str, str] = {}
            for mount in c.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    raise ConfigError(
                        f"container {c['name']}: volumeMount {mount['name']!r} names no volume of the pod"
                    )
                target = volumes[mount["name"]] / mount.get("subPath", "")
                target.mkdir(parents=True, exist_ok=True)
                paths[mount["mountPath"]] = str(target)
            paths[c.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)] = str(
                container.termination_path
            )
            rewrites = Rewrites(paths=paths, hosts=hosts, ports=run.ports)
            raw_env = self._env(run, c)
            command = [expand(s, raw_env) for s in c.get("command") or []]
            args = [expand(s, raw_env) for s in c.get("args") or []]
            env = {
                "PATH": os.pathsep.join(self.image_path),
                "HOSTNAME": spec.get("hostname") or run.name,
                **self.base_env,
                **rewrites.env(raw_env),
            }
            if automount and self.kubeconfig is not None and "KUBECONFIG" not in raw_env:
                env["KUBECONFIG"] = str(self.kubeconfig)
            if self.termination_message_env:
                env[self.termination_message_env] = str(container.termination_path)
            if not command:
                raise ConfigError(f"container {c['name']}: no command (image entrypoints are not known here)")
            container.argv = rewrites.argv(command + args)
            container.env = env
            workdir = c.get("workingDir")
            container.cwd = (
                Path(rewrites.argv([workdir])[0]) if workdir else run.root / "containers" / c["name"]
            )
            container.cwd.mkdir(parents=True, exist_ok=True)

    def _volumes(self, run: PodRun) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for volume in run.spec.get("volumes") or []:
            path = run.root / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                pass
            elif "configMap" in volume or "secret" in volume:
                self._project(run.namespace, volume, path)
            else:
                self._other_volume(run, volume, path)
            out[volume["name"]] = path
        return out

    def _other_volume(self, run: PodRun, volume: Mapping[str, Any], path: Path) -> None:
        """A volume source beyond emptyDir, configMap and secret (a subclass may fill ``path``)."""
        kinds = sorted(k for k in volume if k != "name")
        raise ConfigError(
            f"volume {volume['name']!r}: unsupported source {kinds} (emptyDir, configMap, secret are)"
        )

    def _project(self, namespace: str, volume: Mapping[str, Any], path: Path) -> None:
        source = volume.get("configMap") or volume.get("secret") or {}
        is_secret = "secret" in volume
        name = source.get("secretName") if is_secret else source.get("name")
        obj = self._get(SECRETS if is_secret else CONFIGMAPS, namespace, str(name))
        if obj is None:
            if source.get("optional"):
                return
            raise ConfigError(
                f"{'Secret' if is_secret else 'ConfigMap'} {namespace}/{name} not found (volume {volume['name']!r})"
            )
        data = _data(obj, is_secret)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise ConfigError(f"volume {volume['name']!r}: key {item['key']!r} not in {namespace}/{name}")
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])

    def _namespace_pods(self, namespace: str) -> list[dict[str, Any]]:
        return self._objects(PODS, namespace)

    def _cluster_hosts(self, namespace: str) -> list[str]:
        """DNS names of pods with a hostname and subdomain in ``namespace`` (they all resolve here)."""
        hosts: list[str] = []
        for pod in self._namespace_pods(namespace):
            spec = pod.get("spec") or {}
            if spec.get("hostname") and spec.get("subdomain"):
                base = f"{spec['hostname']}.{spec['subdomain']}"
                hosts += [base, f"{base}.{namespace}.svc", f"{base}.{namespace}.svc.cluster.local"]
        return hosts

    def _env(self, run: PodRun, container: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef") or {}
            is_secret = "secretRef" in source
            obj = self._get(SECRETS if is_secret else CONFIGMAPS, run.namespace, ref.get("name", ""))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(
                    f"envFrom: {'Secret' if is_secret else 'ConfigMap'} {run.namespace}/{ref.get('name')} not found"
                )
            env.update({prefix + k: v.decode() for k, v in _data(obj, is_secret).items()})
        for var in container.get("env") or []:
            if "valueFrom" in var:
                value = self._value_from(run, var["name"], var["valueFrom"])
                if value is None:
                    continue
                env[var["name"]] = value
            else:
                env[var["name"]] = expand(str(var.get("value", "")), env)
        return env

    def _value_from(self, run: PodRun, name: str, source: Mapping[str, Any]) -> str | None:
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            is_secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
            kind = "Secret" if is_secret else "ConfigMap"
            obj = self._get(SECRETS if is_secret else CONFIGMAPS, run.namespace, ref["name"])
            data = _data(obj, is_secret) if obj is not None else None
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    return None
                what = f"{kind} {run.namespace}/{ref['name']}"
                raise ConfigError(
                    f"env {name}: {what} not found"
                    if data is None
                    else f"env {name}: key {ref['key']!r} not in {what}"
                )
            return data[ref["key"]].decode()
        if "fieldRef" in source:
            return self._field(run, source["fieldRef"]["fieldPath"])
        raise ConfigError(
            f"env {name}: unsupported valueFrom {sorted(source)} (secretKeyRef, configMapKeyRef, fieldRef are)"
        )

    def _field(self, run: PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.spec
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": LOOPBACK,
            "status.hostIP": LOOPBACK,
        }
        if path not in simple:
            raise ConfigError(f"fieldRef {path!r} is not supported here")
        return str(simple[path])


def _data(obj: Mapping[str, Any], is_secret: bool) -> dict[str, bytes]:
    """A Secret's or ConfigMap's values as bytes (``data`` of Secrets is base64)."""
    out: dict[str, bytes] = {}
    if is_secret:
        out.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        out.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        out.update({k: str(v).encode() for k, v in (obj.get("data") or {}).items()})
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _int(value: Any, default: int) -> int:
    """An integer field with its API default (0 is a value, not an absence)."""
    return default if value is None else int(value)


def _index(pod: Mapping[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(ANNOTATION_COMPLETION_INDEX, -1))


def _failure_action(spec: Mapping[str, Any], pod: Mapping[str, Any]) -> tuple[str, str]:
    """The podFailurePolicy action for a failed pod (``Count`` when no rule matches) and, for
    FailJob, the Job controller's message."""
    meta = pod["metadata"]
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    pod_conditions = (pod.get("status") or {}).get("conditions") or []
    for i, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
        on_codes = rule.get("onExitCodes")
        matched: tuple[str, int] | None = None
        if on_codes:
            values = {int(v) for v in on_codes.get("values") or []}
            for cs in statuses:
                if on_codes.get("containerName") not in (None, cs["name"]):
                    continue
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                if code is None:
                    continue
                hit = (
                    code in values
                    if on_codes.get("operator", "In") == "In"
                    else (code != 0 and code not in values)
                )
                if hit:
                    matched = (cs["name"], int(code))
                    break
        elif rule.get("onPodConditions"):
            for pattern in rule["onPodConditions"]:
                if any(
                    c.get("type") == pattern["type"] and c.get("status") == pattern.get("status", "True")
                    for c in pod_conditions
                ):
                    matched = ("", 0)
        if matched is None:
            continue
        action = str(rule["action"])
        if action == "FailJob":
            container, code = matched
            why = (
                f"Container {container} for pod {meta['namespace']}/{meta['name']} failed with exit code {code} "
                f"matching FailJob rule at index {i}"
            )
            return action, why
        return ("Count" if action == "FailIndex" else action), ""
    return "Count", ""
