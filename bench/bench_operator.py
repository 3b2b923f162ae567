"""Operator scale benchmark: FineTuneJobs created at once, against KMock's emulator or a real API server.

``--server emulator`` (the default): the emulator (tests/kube.py) runs in this process.
``--server real``: a real control plane (etcd, kube-apiserver, kube-controller-manager and
kube-scheduler built from source, tests/cluster/controlplane.py), kubetune installed with
``kubectl apply -k manifests``; the requests of the benchmark itself are made as the cluster admin,
the operator authenticates with a token of its own ServiceAccount, so the real RBAC authorizer and
admission chain judge every request it makes. No kubelet: Jobs are created, not run, and the
controller manager and scheduler are stopped once kubetune is installed, so only the operator and
this script load the API server (``--with-controllers`` keeps them: the Job controller then creates
every job's pod, which stays Pending, under Pod Security ``restricted``). Requests the server
refused the operator are counted from the audit log and printed.

Either way the operator runs as its own process (``python -m kubetune.operator`` against the
emulator, ``kubetune operator`` against the real server, as in a cluster). For every job the clock
runs from its creation request to (a) its first workload Job -- the validation Job, which always
comes first -- and (b) its first status write (phase Validating). Reported: throughput until every
job has both, p50/p99 create-to-Job latency, and the operator's peak RSS (VmHWM).

Baseline, measured in the same run against the same server with the operator stopped: a plain
client creating the same jobs, the same children and status writes directly (no watch, no
decisions), i.e. what the API server alone costs; the ratio is the operator's overhead on top.

    .venv/bin/python bench/bench_operator.py [--server emulator|real [--with-controllers]] [--jobs 1000]
        [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the installed kubetune (with kubetune.operator) must win over the
# source folder of the same name; only ``tests`` is taken from the checkout.
sys.path.append(str(ROOT))

import kmock  # noqa: E402

from kubetune.operator.settings import Settings  # noqa: E402
from tests.cluster.conftest import (  # noqa: E402
    OPERATOR_NAMESPACE,
    OPERATOR_USER,
    RESTRICTED,
    OperatorProcess,
    operator_env,
)
from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.kube import KubeEmulator, api_path, finetunejob, write_kubeconfig  # noqa: E402

FTJ = "kubetune.io/v1alpha1/finetunejobs"
GOALS = {
    "emulator": {"jobs_per_second": 20.0, "p99_seconds": 5.0, "rss_mb": 300.0},
    "real": {"jobs_per_second": 50.0, "p99_seconds": 5.0, "rss_mb": 300.0},
}

# method, API path, body -> the decoded response; raises on an error status.
Send = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def emulator_sender(kube: KubeEmulator) -> Send:
    async def send(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else None
        async with kube.request(method, path, json=body, headers=headers) as response:
            payload = await response.read()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status}")
            decoded: dict[str, Any] = json.loads(payload or b"{}")
            return decoded

    return send


async def create_jobs(send: Send, namespace: str, count: int, concurrency: int) -> dict[str, float]:
    created: dict[str, float] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        name = f"bench-{i:04d}"
        async with gate:
            created[name] = time.monotonic()
            await send("POST", api_path(FTJ, namespace), finetunejob(name, namespace))

    await asyncio.gather(*(one(i) for i in range(count)))
    return created


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def baseline(send: Send, namespace: str, count: int, concurrency: int) -> float:
    """The same API traffic per job without the operator: the job, its first-step children (plan,
    ServiceAccount, validation Job) and one status patch."""
    from kubetune.api import FineTuneJob
    from kubetune.operator import render
    from kubetune.operator.kube import PLURALS

    settings = Settings()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        manifest = finetunejob(f"base-{i:04d}", namespace)
        async with gate:
            # Rendered from what the server returned, so the children are owned (uid) as the
            # operator's are.
            job = FineTuneJob.model_validate(await send("POST", api_path(FTJ, namespace), manifest))
            plan = render.render_plan(job, settings, namespace)
            children = [
                *render.render_base(job, plan, namespace),
                render.render_validation_job(job, settings, plan, namespace),
            ]
            for child in children:
                plural = PLURALS[child["kind"]]
                version = child["apiVersion"]
                await send("POST", api_path(f"{version}/{plural}", namespace), child)
            status = {"status": {"phase": "Validating", "restarts": 0}}
            await send("PATCH", api_path(FTJ, namespace, manifest["metadata"]["name"], "status"), status)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.monotonic() - started


@dataclass
class Measurement:
    """What one operator run produced, for :func:`report`; filled in as the run goes."""

    server: str
    count: int
    concurrency: int
    create_seconds: float = float("nan")
    finished: bool = False
    started: float = float("nan")
    created: dict[str, float] = field(default_factory=dict)
    job_at: dict[str, float] = field(default_factory=dict)
    status_at: dict[str, float] = field(default_factory=dict)
    rss_mb: float = float("nan")
    rss_idle_mb: float = float("nan")
    cpu: dict[str, float] = field(default_factory=dict)
    baseline_seconds: float = float("nan")
    notes: list[str] = field(default_factory=list)


def report(m: Measurement) -> int:
    goals = GOALS[m.server]
    latencies = [m.job_at[n] - t for n, t in m.created.items() if n in m.job_at]
    complete = [max(m.job_at[n], m.status_at[n]) for n in m.created if n in m.job_at and n in m.status_at]
    total = (max(complete) - m.started) if complete else float("nan")
    rate = len(complete) / total if complete else 0.0
    p50, p99 = (percentile(latencies, 0.5), percentile(latencies, 0.99)) if latencies else (float("nan"),) * 2
    print(f"server:                      {m.server}")
    print(f"jobs created:                {m.count} in {m.create_seconds:.1f}s (concurrency {m.concurrency})")
    print(f"jobs with Job and status:    {len(complete)}/{m.count}{'' if m.finished else ' (timed out)'}")
    print(
        f"time until all handled:      {total:.1f}s  -> {rate:.1f} jobs/s   (goal >= {goals['jobs_per_second']:.0f})"
    )
    print(
        f"create-to-Job latency:       p50 {p50:.2f}s  p99 {p99:.2f}s  (goal p99 < {goals['p99_seconds']:.0f}s)"
    )
    print(
        f"operator peak RSS:           {m.rss_mb:.0f} MB (idle after warm-up {m.rss_idle_mb:.0f} MB; goal < {goals['rss_mb']:.0f} MB)"
    )
    print("CPU seconds meanwhile:       " + ", ".join(f"{k} {v:.1f}" for k, v in m.cpu.items()))
    print(
        f"baseline, plain client:      {m.baseline_seconds:.1f}s for the same jobs, children and status writes"
    )
    print(
        f"operator / baseline:         {total / m.baseline_seconds:.2f}x  "
        f"(baseline {m.count / m.baseline_seconds:.1f} jobs/s)"
    )
    if latencies:
        print(f"mean latency:                {statistics.fmean(latencies):.2f}s")
    for note in m.notes:
        print(note)
    ok = (
        m.finished
        and rate >= goals["jobs_per_second"]
        and p99 < goals["p99_seconds"]
        and m.rss_mb < goals["rss_mb"]
    )
    print("goals met" if ok else "goals NOT met")
    return 0


# --- the emulator -------------------------------------------------------------------------------


async def run_emulator(count: int, concurrency: int, timeout: float) -> Measurement:
    m = Measurement("emulator", count, concurrency)
    async with KubeEmulator() as kube, kmock.Server(kube):
        kube.register_resources()
        send = emulator_sender(kube)
        workdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
        kubeconfig = write_kubeconfig(workdir / "kubeconfig", str(kube.url).rstrip("/"))
        env = os.environ | {
            "KUBECONFIG": str(kubeconfig),
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_LOG_FORMAT": "text",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        log = (workdir / "operator.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                *os.environ.get("KUBETUNE_BENCH_PYTHON_ARGS", "").split(),
                "-m",
                "kubetune.operator",
            ],
            env=env,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            # Warm-up: one job through to its validation Job, so the operator is watching.
            await send("POST", api_path(FTJ, "warmup"), finetunejob("warmup", "warmup"))
            if not await wait_until(lambda: bool(kube.get("batch/v1/jobs", "warmup", "warmup-validate")), 60):
                raise SystemExit(f"operator did not start; see {workdir / 'operator.log'}")
            m.rss_idle_mb = peak_rss_mb(proc.pid)
            cpu_operator_before = cpu_seconds(proc.pid)
            cpu_emulator_before = cpu_seconds(os.getpid())

            ns = "bench"
            journal_start = len(kube.journal)
            m.started = time.monotonic()
            m.created = await create_jobs(send, ns, count, concurrency)
            m.create_seconds = time.monotonic() - m.started

            seen_jobs: set[str] = set()
            seen_status: set[str] = set()
            position = journal_start

            def done() -> bool:
                nonlocal position
                entries, position = kube.journal[position:], len(kube.journal)
                for _, action, plural, namespace, name in entries:
                    if namespace == ns and action == "create" and plural == "jobs":
                        seen_jobs.add(name)
                    elif namespace == ns and action == "update" and plural == "finetunejobs/status":
                        seen_status.add(name)
                return len(seen_jobs) >= count and len(seen_status) >= count

            m.finished = await wait_until(done, timeout)
            m.rss_mb = peak_rss_mb(proc.pid)
            m.cpu = {
                "operator": cpu_seconds(proc.pid) - cpu_operator_before,
                "emulator+client": cpu_seconds(os.getpid()) - cpu_emulator_before,
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

        job_at: dict[str, float] = {}
        status_at: dict[str, float] = {}
        for at, action, plural, namespace, name in kube.journal[journal_start:]:
            if namespace != ns:
                continue
            if action == "create" and plural == "jobs" and name.endswith("-validate"):
                job_at.setdefault(name.removesuffix("-validate"), at)
            elif action == "update" and plural == "finetunejobs/status":
                status_at.setdefault(name, at)
        m.job_at, m.status_at = job_at, status_at
        m.baseline_seconds = await baseline(send, "baseline", count, concurrency)
        return m


# --- a real API server --------------------------------------------------------------------------


class RealAPI:
    """aiohttp against kube-apiserver as the cluster admin (client certificate)."""

    def __init__(self, plane: ControlPlane, connections: int) -> None:
        context = ssl.create_default_context(cafile=str(plane.ca_file))
        context.load_cert_chain(str(plane.admin.cert), str(plane.admin.key))
        self.server = plane.server
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=connections),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def send(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        async with self.session.request(
            method, self.server + path, data=json.dumps(body), headers={"Content-Type": content_type}
        ) as response:
            payload = await response.read()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {payload[:500]!r}")
            decoded: dict[str, Any] = json.loads(payload or b"{}")
            return decoded

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.session.get(self.server + path) as response:
            return response.status, json.loads(await response.read() or b"{}")

    async def watch(
        self, path: str, seen: dict[str, float], wanted: Callable[[dict[str, Any]], bool]
    ) -> None:
        """Record when each object named in the collection ``path`` first matched ``wanted``
        (receipt time of the watch event), until cancelled."""
        _, listing = await self.get(path)
        version = listing["metadata"]["resourceVersion"]
        while True:
            url = f"{self.server}{path}?watch=1&resourceVersion={version}&timeoutSeconds=3600"
            async with self.session.get(url) as response:
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    now = time.monotonic()
                    for line in lines:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            raise RuntimeError(f"watch {path}: {event['object']}")
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if wanted(obj):
                            seen.setdefault(obj["metadata"]["name"], now)

    async def close(self) -> None:
        await self.session.close()


@asynccontextmanager
async def watching(api: RealAPI, namespace: str) -> AsyncIterator[tuple[dict[str, float], dict[str, float]]]:
    """First validation Job per job (by job name) and first status phase per job, as they arrive."""
    jobs: dict[str, float] = {}
    phases: dict[str, float] = {}
    tasks = [
        asyncio.create_task(
            api.watch(
                api_path("batch/v1/jobs", namespace),
                jobs,
                lambda obj: obj["metadata"]["name"].endswith("-validate"),
            )
        ),
        asyncio.create_task(
            api.watch(api_path(FTJ, namespace), phases, lambda obj: bool(obj.get("status", {}).get("phase")))
        ),
    ]
    await asyncio.sleep(0.5)  # both watches listed and open before anything is created
    try:
        yield jobs, phases
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def install_kubetune(plane: ControlPlane) -> None:
    """As a user installs it; the Deployment scaled to zero (this script runs the operator)."""
    plane.kubectl("apply", "--server-side", "-k", str(ROOT / "manifests"))
    for crd in ("finetunejobs.kubetune.io", "compressjobs.kubetune.io"):
        plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    plane.kubectl("scale", "deployment/kubetune-operator", "-n", OPERATOR_NAMESPACE, "--replicas=0")


def refused_operator_requests(plane: ControlPlane) -> Counter[str]:
    """The operator's requests the server answered with an error, by code, verb and resource."""
    refused: Counter[str] = Counter()
    for event in plane.audit_events():
        code = event.get("responseStatus", {}).get("code", 0)
        if event.get("user", {}).get("username") == OPERATOR_USER and code >= 400:
            ref = event.get("objectRef", {})
            resource = "/".join(filter(None, (ref.get("resource"), ref.get("subresource"))))
            refused[f"{code} {event.get('verb')} {resource}"] += 1
    return refused


async def run_real(count: int, concurrency: int, timeout: float, with_controllers: bool) -> Measurement:
    m = Measurement("real", count, concurrency)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    plane = ControlPlane(workdir / "control-plane")
    print(f"control plane and operator logs: {workdir}")
    api: RealAPI | None = None
    try:
        plane.start()
        install_kubetune(plane)
        if not with_controllers:
            # Creating a Job needs neither: without them nothing else loads the API server (the
            # Job controller would create every job's pod at its own 20 requests/s meanwhile).
            for component in plane.components:
                if component.name in ("kube-controller-manager", "kube-scheduler"):
                    component.stop()
        for namespace in ("warmup", "bench", "baseline"):
            manifest = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "labels": RESTRICTED},
            }
            status, body = plane.request("POST", "/api/v1/namespaces", manifest)
            if status != 201:
                raise SystemExit(f"creating namespace {namespace}: {status} {body}")
        # The Deployment's settings (not the test tier's fast clock), ports of our choosing.
        deployment_env = operator_env(KUBETUNE_RESYNC_SECONDS=str(Settings().resync_seconds))
        operator = OperatorProcess(plane, workdir, deployment_env)
        api = RealAPI(plane, concurrency + 4)
        server_pids = {c.name: c.process.pid for c in plane.components if c.process is not None and c.alive()}
        try:
            operator.start()
            assert operator.process is not None
            pid = operator.process.pid
            await api.send("POST", api_path(FTJ, "warmup"), finetunejob("warmup", "warmup"))

            async def warmed() -> bool:
                status, _ = await api.get(api_path("batch/v1/jobs", "warmup", "warmup-validate"))
                return status == 200

            deadline = time.monotonic() + 120
            while not await warmed():
                if time.monotonic() > deadline or not operator.alive():
                    raise SystemExit(f"the operator did not create the warm-up Job; see {operator.log}")
                await asyncio.sleep(0.2)
            m.rss_idle_mb = peak_rss_mb(pid)
            before = {"operator": cpu_seconds(pid)} | {n: cpu_seconds(p) for n, p in server_pids.items()}
            before["bench client"] = cpu_seconds(os.getpid())

            async with watching(api, "bench") as (jobs, phases):
                m.started = time.monotonic()
                m.created = await create_jobs(api.send, "bench", count, concurrency)
                m.create_seconds = time.monotonic() - m.started
                m.finished = await wait_until(
                    lambda: len(jobs) >= count and len(phases) >= count and set(m.created) <= set(phases),
                    timeout,
                )
            m.rss_mb = peak_rss_mb(pid)
            after = {"operator": cpu_seconds(pid)} | {n: cpu_seconds(p) for n, p in server_pids.items()}
            after["bench client"] = cpu_seconds(os.getpid())
        finally:
            operator.stop()
        job_at = {name.removesuffix("-validate"): at for name, at in jobs.items()}
        m.job_at, m.status_at = job_at, dict(phases)
        m.cpu = {name: after[name] - before[name] for name in before}
        m.baseline_seconds = await baseline(api.send, "baseline", count, concurrency)
        refused = refused_operator_requests(plane)
        m.notes.append(
            "requests of the operator the server refused: "
            + (", ".join(f"{n}x {what}" for what, n in refused.most_common()) or "none")
        )
        if with_controllers:
            _, pods = plane.request("GET", "/api/v1/namespaces/bench/pods")
            phases_of_pods = Counter(pod["status"].get("phase", "?") for pod in pods.get("items", []))
            m.notes.append(
                f"pods the Job controller created in namespace bench (Pod Security restricted): "
                f"{dict(phases_of_pods) or 'none'}"
            )
        return m
    finally:
        if api is not None:
            await api.close()
        plane.stop()
        shutil.rmtree(plane.directory / "etcd", ignore_errors=True)  # the logs stay


async def main(server: str, count: int, concurrency: int, timeout: float, with_controllers: bool) -> int:
    if server == "real":
        return report(await run_real(count, concurrency, timeout, with_controllers))
    return report(await run_emulator(count, concurrency, timeout))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", choices=("emulator", "real"), default="emulator")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--with-controllers",
        action="store_true",
        help="--server real: keep kube-controller-manager and kube-scheduler running (pods get created)",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.server, args.jobs, args.concurrency, args.timeout, args.with_controllers)))
