"""Local processes from a job's workloads (:mod:`kubetune.run.workloads`): what stands in for pods.

Pure functions: local mode launches exactly the workloads a cluster runs, with one torchrun
(``launch``) playing each pod of a gang. What is local's own is only what differs between a pod
and a process on this machine: paths under the run directory, caches, the accelerator this
machine has, and free ports (the processes share one network namespace, pods do not).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kubetune.run.workloads import (
    ENV_DS_ACCELERATOR,
    ENV_TERMINATION_LOG,
    Rendezvous,
    Workload,
    progress_to_file,
)

# Every node of a local gang finds node 0 on this machine, as pods find <job>-0.<service>.
LOCAL_HOST: Final = "127.0.0.1"
TERMINATION_LOG_FILE: Final = "termination-log"


@dataclass(frozen=True)
class ProcessSpec:
    """One local process: what a container would run."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def termination_log(run_dir: Path) -> Path:
    """Where a local run's processes write their one-line failure reason (a pod's
    terminationMessagePath)."""
    return run_dir / TERMINATION_LOG_FILE


def runtime_env(*, accelerator: str, scratch: Path, devices: str | None = None) -> dict[str, str]:
    """Environment every process of a local run shares, whatever its workload; ``devices``: the
    GPUs it may use (``CUDA_VISIBLE_DEVICES``; default: what this machine shows it)."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # Keep caches out of the user's home and away from each other's runs.
        "HF_HOME": str(scratch / "hf-home"),
        "TRITON_CACHE_DIR": str(scratch / "triton"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if accelerator == "cpu":
        env[ENV_DS_ACCELERATOR] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    env[ENV_TERMINATION_LOG] = str(termination_log(scratch))
    return env


def cpu_threads_per_process(processes: int, cores: int | None = None) -> int:
    """Split the machine's cores between the training processes so they do not oversubscribe."""
    available = cores or os.cpu_count() or 1
    return max(1, available // max(1, processes))


def workload_env(
    workload: Workload,
    env: dict[str, str],
    *,
    plan_path: Path | None = None,
    progress_file: Path | None = None,
) -> dict[str, str]:
    """``env`` with the workload's own environment: the job, the plan, progress, storage."""
    progress = progress_to_file(progress_file) if progress_file is not None else None
    plan = str(plan_path) if plan_path is not None else None
    return {
        **env,
        **dict(workload.environment(plan_path=plan, progress=progress)),
        **dict(workload.storage_env),
    }


def validate_process(
    workload: Workload, *, plan_path: Path, progress_file: Path, scratch: Path, env: dict[str, str]
) -> ProcessSpec:
    argv = [sys.executable, *workload.argv(plan_path=str(plan_path), scratch_dir=str(scratch / "validate"))]
    return ProcessSpec(
        name="validate",
        argv=argv,
        env=workload_env(workload, env, plan_path=plan_path, progress_file=progress_file),
    )


def main_processes(
    workload: Workload,
    *,
    plan_path: Path,
    progress_file: Path,
    scratch: Path,
    master_port: int,
    env: dict[str, str],
    cores: int | None = None,
) -> list[ProcessSpec]:
    """One torchrun per node of a gang, like one pod per node of the Indexed Job; a workload that
    runs in one process (quantization, pruning) is that process. ``cores``: the cores this gang
    may use (default: the machine's; a sweep's parallel trials share them)."""
    process_env = workload_env(workload, env, plan_path=plan_path, progress_file=progress_file)
    gang = workload.gang
    if gang is None:
        argv = workload.argv(plan_path=str(plan_path), scratch_dir=str(scratch / "worker-0"))
        return [ProcessSpec(name="worker-0", argv=[sys.executable, *argv], env=process_env)]
    threads = cpu_threads_per_process(gang.nodes * gang.processes_per_node, cores)
    specs = []
    for rank in range(gang.nodes):
        rendezvous = Rendezvous(node_rank=str(rank), master_addr=LOCAL_HOST, master_port=master_port)
        argv = workload.argv(
            plan_path=str(plan_path), scratch_dir=str(scratch / f"worker-{rank}"), rendezvous=rendezvous
        )
        worker_env = {**process_env, "OMP_NUM_THREADS": str(threads)}
        specs.append(ProcessSpec(name=f"worker-{rank}", argv=[sys.executable, *argv], env=worker_env))
    return specs


def serve_process(workload: Workload, *, port: int, scratch: Path, env: dict[str, str]) -> ProcessSpec:
    """The server, listening on this machine only."""
    argv = workload.argv(host=LOCAL_HOST, port=port, scratch_dir=str(scratch / "serve"))
    return ProcessSpec(name="serve", argv=[sys.executable, *argv], env=workload_env(workload, env))
