"""Operator scale benchmark: 1000 FineTuneJobs created at once against the Kubernetes emulator.

The operator runs as its own process (``python -m kubetune.operator``, as in a cluster); the
emulator (tests/kube.py) runs in this process. For every job the clock runs from its creation
request to (a) its first workload Job -- the validation Job, which always comes first -- and (b)
its first status write (phase Validating). Reported: throughput until every job has both, p50/p99
create-to-Job latency, and the operator's peak RSS (VmHWM).

Baseline, measured in the same run: a plain client creating the same children and status writes
directly (no watch, no decisions), i.e. what the emulator alone costs; the ratio is the operator's
overhead on top of the API.

    .venv/bin/python bench/bench_operator.py [--jobs 1000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the installed kubetune (with kubetune.operator) must win over the
# source folder of the same name; only ``tests`` is taken from the checkout.
sys.path.append(str(ROOT))

import kmock  # noqa: E402

from tests.kube import KubeEmulator, api_path, finetunejob, write_kubeconfig  # noqa: E402

FTJ = "kubetune.io/v1alpha1/finetunejobs"
GOALS = {"jobs_per_second": 20.0, "p99_seconds": 5.0, "rss_mb": 300.0}


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


async def post(kube: KubeEmulator, path: str, body: dict[str, Any], method: str = "POST") -> None:
    headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else None
    async with kube.request(method, path, json=body, headers=headers) as response:
        await response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status}")


async def create_jobs(kube: KubeEmulator, namespace: str, count: int, concurrency: int) -> dict[str, float]:
    created: dict[str, float] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        name = f"bench-{i:04d}"
        async with gate:
            created[name] = time.monotonic()
            await post(kube, api_path(FTJ, namespace), finetunejob(name, namespace))

    await asyncio.gather(*(one(i) for i in range(count)))
    return created


async def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


async def baseline(kube: KubeEmulator, count: int, concurrency: int) -> float:
    """The same API traffic per job without the operator: the job, its first-step children (plan,
    ServiceAccount, validation Job) and one status patch."""
    from kubetune.api import FineTuneJob
    from kubetune.operator import render
    from kubetune.operator.kube import PLURALS
    from kubetune.operator.settings import Settings

    namespace = "baseline"
    settings = Settings()
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        manifest = finetunejob(f"base-{i:04d}", namespace)
        async with gate:
            await post(kube, api_path(FTJ, namespace), manifest)
            job = FineTuneJob.model_validate(manifest)
            plan = render.render_plan(job, settings, namespace)
            children = [
                *render.render_base(job, plan, namespace),
                render.render_validation_job(job, settings, plan, namespace),
            ]
            for child in children:
                plural = PLURALS[child["kind"]]
                version = child["apiVersion"]
                await post(kube, api_path(f"{version}/{plural}", namespace), child)
            status = {"status": {"phase": "Validating", "restarts": 0}}
            await post(
                kube, api_path(FTJ, namespace, manifest["metadata"]["name"], "status"), status, "PATCH"
            )

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.monotonic() - started


async def main(count: int, concurrency: int, timeout: float) -> int:
    async with KubeEmulator() as kube, kmock.Server(kube):
        kube.register_resources()
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
            await post(kube, api_path(FTJ, "warmup"), finetunejob("warmup", "warmup"))
            if not await wait_until(lambda: kube.get("batch/v1/jobs", "warmup", "warmup-validate"), 60):
                print(f"operator did not start; see {workdir / 'operator.log'}")
                return 1
            rss_idle = peak_rss_mb(proc.pid)
            cpu_operator_before = cpu_seconds(proc.pid)
            cpu_emulator_before = cpu_seconds(os.getpid())

            ns = "bench"
            journal_start = len(kube.journal)
            started = time.monotonic()
            created = await create_jobs(kube, ns, count, concurrency)
            create_seconds = time.monotonic() - started

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

            finished = await wait_until(done, timeout)
            rss = peak_rss_mb(proc.pid)
            cpu_operator = cpu_seconds(proc.pid) - cpu_operator_before
            cpu_emulator = cpu_seconds(os.getpid()) - cpu_emulator_before
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
        latencies = [job_at[n] - t for n, t in created.items() if n in job_at]
        complete = [max(job_at[n], status_at.get(n, job_at[n])) for n in created if n in job_at]
        total = (max(complete) - started) if complete else float("nan")
        base = await baseline(kube, count, concurrency)

        rate = len(complete) / total if complete else 0.0
        p50, p99 = (
            (percentile(latencies, 0.5), percentile(latencies, 0.99)) if latencies else (float("nan"),) * 2
        )
        print(f"jobs created:                {count} in {create_seconds:.1f}s (concurrency {concurrency})")
        print(f"jobs with Job and status:    {len(complete)}/{count}{'' if finished else ' (timed out)'}")
        print(
            f"time until all handled:      {total:.1f}s  -> {rate:.1f} jobs/s   (goal >= {GOALS['jobs_per_second']:.0f})"
        )
        print(
            f"create-to-Job latency:       p50 {p50:.2f}s  p99 {p99:.2f}s  (goal p99 < {GOALS['p99_seconds']:.0f}s)"
        )
        print(
            f"operator peak RSS:           {rss:.0f} MB (idle after warm-up {rss_idle:.0f} MB; goal < {GOALS['rss_mb']:.0f} MB)"
        )
        print(f"CPU seconds meanwhile:       operator {cpu_operator:.1f}, emulator+client {cpu_emulator:.1f}")
        print(f"baseline, plain client:      {base:.1f}s for the same children and status writes")
        print(f"operator / baseline:         {total / base:.2f}x")
        print(f"mean latency:                {statistics.fmean(latencies):.2f}s" if latencies else "")
        ok = (
            finished
            and rate >= GOALS["jobs_per_second"]
            and p99 < GOALS["p99_seconds"]
            and rss < GOALS["rss_mb"]
        )
        print("goals met" if ok else "goals NOT met")
        return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.jobs, args.concurrency, args.timeout)))
