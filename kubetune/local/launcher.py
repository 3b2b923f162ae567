"""Command lines and environments of the local processes that stand in for pods.

Pure functions: local mode launches exactly the runtime entry points a cluster runs
(``python -m kubetune.trainer ...``), with one torchrun (``launch``) playing each pod.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.api.spec import MethodType
from kubetune.plan import ADAPTER_DIR, MODEL_DIR, RunPlan


@dataclass(frozen=True)
class ProcessSpec:
    """One local process: what a container would run."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def runtime_env(*, accelerator: str, progress_file: Path | None, scratch: Path) -> dict[str, str]:
    """Environment shared by every runtime process of a local run."""
    env = {
        "PYTHONUNBUFFERED": "1",
        # Keep caches out of the user's home and away from each other's runs.
        "HF_HOME": str(scratch / "hf-home"),
        "TRITON_CACHE_DIR": str(scratch / "triton"),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if progress_file is not None:
        env["KUBETUNE_PROGRESS"] = f"file:{progress_file}"
    # Where a pod's container would write its one-line failure reason (terminationMessagePath).
    env["KUBETUNE_TERMINATION_LOG"] = str(scratch / "termination-log")
    return env


def cpu_threads_per_process(processes: int, cores: int | None = None) -> int:
    """Split the machine's cores between the training processes so they do not oversubscribe."""
    available = cores or os.cpu_count() or 1
    return max(1, available // max(1, processes))


def validate_process(plan_path: Path, env: dict[str, str], scratch: Path) -> ProcessSpec:
    argv = [sys.executable, *_runtime_args("validate", plan_path, scratch / "validate")]
    return ProcessSpec(name="validate", argv=argv, env=env)


def _runtime_args(command: str, plan_path: Path, scratch: Path) -> list[str]:
    """``-m kubetune.trainer COMMAND --plan ... --scratch-dir ...``: how every runtime is started."""
    return ["-m", "kubetune.trainer", command, "--plan", str(plan_path), "--scratch-dir", str(scratch)]


def training_processes(
    plan: RunPlan,
    plan_path: Path,
    *,
    command: str,
    scratch: Path,
    master_port: int,
    env: dict[str, str],
    cpu_threads: int,
) -> list[ProcessSpec]:
    """One torchrun per worker, like one pod per worker of the Indexed Job.

    Workers rendezvous on 127.0.0.1 the way pods rendezvous on ``<job>-0.<service>``.
    """
    world = plan.world
    specs = []
    for rank in range(world.workers):
        argv = [
            sys.executable,
            "-m",
            "kubetune.trainer",
            "launch",
            f"--nnodes={world.workers}",
            f"--node_rank={rank}",
            f"--nproc_per_node={world.processes_per_worker}",
            "--master_addr=127.0.0.1",
            f"--master_port={master_port}",
            *_runtime_args(command, plan_path, scratch / f"worker-{rank}"),
        ]
        worker_env = dict(env)
        worker_env["OMP_NUM_THREADS"] = str(cpu_threads)
        specs.append(ProcessSpec(name=f"worker-{rank}", argv=argv, env=worker_env))
    return specs


def single_process(plan_path: Path, *, command: str, scratch: Path, env: dict[str, str]) -> ProcessSpec:
    """A runtime that needs no process group (quantization, pruning)."""
    argv = [sys.executable, *_runtime_args(command, plan_path, scratch / "worker-0")]
    return ProcessSpec(name="worker-0", argv=argv, env=env)


def serve_process(
    plan: RunPlan, *, port: int, scratch: Path, env: dict[str, str], served_name: str, max_batch_size: int
) -> ProcessSpec:
    # An unmerged LoRA run has no full model of its own: serve the base with the adapter.
    merged = plan.method is None or plan.method.type == MethodType.full or plan.method.merges
    model_args = (
        ["--model", plan.output(MODEL_DIR)]
        if merged
        else ["--model", plan.model_uri, "--adapter", plan.output(ADAPTER_DIR)]
    )
    argv = [
        sys.executable,
        "-m",
        "kubetune.trainer",
        "serve",
        *model_args,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--scratch-dir",
        str(scratch / "serve"),
        "--max-batch-size",
        str(max_batch_size),
    ]
    if plan.storage.endpoint:
        argv += ["--storage-endpoint", plan.storage.endpoint]
    if plan.storage.region:
        argv += ["--storage-region", plan.storage.region]
    return ProcessSpec(name="serve", argv=argv, env=env)
