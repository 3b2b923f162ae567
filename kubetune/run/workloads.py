"""The workloads of a job: what each of its processes runs, the same in a pod and on a laptop.

A job runs as up to three workloads: ``validate`` (one process, before anything expensive),
the main workload (``train`` or ``compress``: a torchrun gang, or one process when nothing trains)
and ``serve``. Each :class:`Workload` is a pure function of the run plan (serving: of the job's
artifacts) and says everything the operator and local mode must agree on: the runtime and its
arguments, the contract's environment, whether it runs distributed, its ports, and (through
:mod:`kubetune.errors`) what its exit codes mean.

Where a workload runs adds only what differs between a pod and a local process, passed to
:meth:`Workload.argv` and :meth:`Workload.environment`: the plan's path, where progress goes,
the scratch directory, how a gang's nodes find node 0, the address a server listens on.
``operator/render.py`` translates workloads into Kubernetes objects, ``kubetune/local/launcher.py``
into local processes; neither decides anything a workload says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune.api.resources import CompressJob, FineTuneJob

# The exit-code contract is kubetune.errors' (the runtimes raise its errors); part of every workload.
from kubetune.errors import EXIT_INVALID_INPUT as EXIT_INVALID_INPUT
from kubetune.errors import EXIT_OK as EXIT_OK
from kubetune.errors import EXIT_STORAGE as EXIT_STORAGE
from kubetune.errors import NON_RETRIABLE_EXIT_CODES as NON_RETRIABLE_EXIT_CODES
from kubetune.errors import TERMINATION_LOG as TERMINATION_LOG
from kubetune.run.artifacts import ServedModel, artifacts_of
from kubetune.run.plan import RunPlan, StoragePlan

# Every runtime is started as `python -m kubetune.trainer <runtime> ...`.
TRAINER_MODULE: Final = "kubetune.trainer"
RUNTIME_VALIDATE: Final = "validate"
RUNTIME_FINETUNE: Final = "finetune"
RUNTIME_COMPRESS: Final = "compress"
RUNTIME_SERVE: Final = "serve"
# torchrun that keeps the workers' exit codes 2 and 3 (plain torchrun turns them into 1).
RUNTIME_LAUNCH: Final = "launch"
_PLAN_RUNTIMES: Final = (RUNTIME_VALIDATE, RUNTIME_FINETUNE, RUNTIME_COMPRESS)

# The workloads of a job, named as the operator's children are (kubetune.io/component).
VALIDATE: Final = "validate"
TRAIN: Final = "train"
COMPRESS: Final = "compress"
SERVE: Final = "serve"

# Ports a workload listens on, by name.
RENDEZVOUS_PORT_NAME: Final = "rendezvous"
HTTP_PORT_NAME: Final = "http"
MASTER_PORT: Final = 29500  # node 0 of a gang (torchrun's c10d store)
SERVE_PORT: Final = 8000

# Environment variables of the contract: set where a workload runs, read by the runtimes.
ENV_JOB_KIND: Final = "KUBETUNE_JOB_KIND"
ENV_JOB_NAMESPACE: Final = "KUBETUNE_JOB_NAMESPACE"
ENV_JOB_NAME: Final = "KUBETUNE_JOB_NAME"
ENV_PLAN: Final = "KUBETUNE_PLAN"
# Where rank 0 reports progress: a comma-separated list of "kubernetes", "file:/path" and "log".
ENV_PROGRESS: Final = "KUBETUNE_PROGRESS"
ENV_SCRATCH_DIR: Final = "KUBETUNE_SCRATCH_DIR"
# Overrides where the one-line failure reason goes (TERMINATION_LOG in pods).
ENV_TERMINATION_LOG: Final = "KUBETUNE_TERMINATION_LOG"
# Which attempt of the job a process belongs to (0 first): its logs go to <output>/logs/attempt-<N>/.
ENV_ATTEMPT: Final = "KUBETUNE_ATTEMPT"
ENV_SERVE_API_KEY: Final = "KUBETUNE_SERVE_API_KEY"
# DeepSpeed's own: "cpu" keeps it from probing for GPUs a process does not have.
ENV_DS_ACCELERATOR: Final = "DS_ACCELERATOR"
# The non-secret S3 settings (boto3's and the AWS CLI's names); the keys come from elsewhere.
ENV_AWS_ENDPOINT_URL: Final = "AWS_ENDPOINT_URL"
ENV_AWS_REGION: Final = "AWS_REGION"
ENV_AWS_DEFAULT_REGION: Final = "AWS_DEFAULT_REGION"

# Progress in a pod: status.progress of the job through the runner ServiceAccount, and the same
# lines in the log for `kubectl logs`.
PROGRESS_TO_STATUS_AND_LOG: Final = "kubernetes,log"

Env = tuple[tuple[str, str], ...]


def progress_to_file(path: str | Path) -> str:
    """``KUBETUNE_PROGRESS`` for JSON lines appended to ``path`` (local mode's progress bar)."""
    return f"file:{path}"


@dataclass(frozen=True)
class Gang:
    """A torchrun gang: ``nodes`` (the pods of an Indexed Job, or local launchers), each running
    ``processes_per_node`` workers."""

    nodes: int
    processes_per_node: int


@dataclass(frozen=True)
class Rendezvous:
    """How one node of a gang finds node 0: the only part of a gang that differs by place."""

    node_rank: str  # "$(JOB_COMPLETION_INDEX)" in an Indexed Job's pod
    master_addr: str
    master_port: int = MASTER_PORT


@dataclass(frozen=True)
class Workload:
    """One workload of a job, independent of where it runs."""

    name: str  # VALIDATE, TRAIN, COMPRESS or SERVE
    runtime: str  # python -m kubetune.trainer <runtime>
    args: tuple[str, ...] = ()  # the runtime's arguments that are the same everywhere
    gang: Gang | None = None  # None: one plain process
    job_env: Env = ()  # which job this is, for the runtime's logs and reports
    storage_env: Env = ()
    ports: tuple[tuple[str, int], ...] = ()
    served: ServedModel | None = None  # what a serving workload loads

    @property
    def distributed(self) -> bool:
        return self.gang is not None

    @property
    def reads_plan(self) -> bool:
        return self.runtime in _PLAN_RUNTIMES

    def port(self, name: str) -> int:
        return dict(self.ports)[name]

    def argv(
        self,
        *,
        plan_path: str | None = None,
        scratch_dir: str | None = None,
        rendezvous: Rendezvous | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> list[str]:
        """The arguments of ``python``: the runtime, under ``kubetune.trainer launch`` (torchrun)
        for a gang. ``scratch_dir`` defaults to the runtime's ``KUBETUNE_SCRATCH_DIR``, ``host`` to
        every address and ``port`` to the workload's own."""
        runtime = ["-m", TRAINER_MODULE, self.runtime]
        if self.reads_plan:
            if plan_path is None:
                raise ValueError(f"the {self.name} workload reads a plan: pass plan_path")
            runtime += ["--plan", plan_path]
        if self.served is not None:
            runtime += ["--model", self.served.model_uri]
            if self.served.adapter_uri:
                runtime += ["--adapter", self.served.adapter_uri]
            if host is not None:
                runtime += ["--host", host]
            runtime += ["--port", str(port if port is not None else self.port(HTTP_PORT_NAME))]
        runtime += self.args
        if scratch_dir is not None:
            runtime += ["--scratch-dir", scratch_dir]
        if self.gang is None:
            return runtime
        if rendezvous is None:
            raise ValueError(f"the {self.name} workload runs as a gang: pass its rendezvous")
        return [
            "-m",
            TRAINER_MODULE,
            RUNTIME_LAUNCH,
            f"--nnodes={self.gang.nodes}",
            f"--nproc_per_node={self.gang.processes_per_node}",
            f"--node_rank={rendezvous.node_rank}",
            f"--master_addr={rendezvous.master_addr}",
            f"--master_port={rendezvous.master_port}",
            *runtime,
        ]

    def environment(self, *, plan_path: str | None = None, progress: str | None = None) -> Env:
        """The contract's environment, in the order pods list it: the job, then for a runtime
        that reads a plan where the plan is and where progress goes."""
        env = list(self.job_env)
        if self.reads_plan:
            if plan_path is None or progress is None:
                raise ValueError(f"the {self.name} workload reads a plan: pass plan_path and progress")
            env += [(ENV_PLAN, plan_path), (ENV_PROGRESS, progress)]
        return tuple(env)


def runs_distributed(plan: RunPlan) -> bool:
    """Whether the main workload is a torchrun gang: whatever trains (fine-tuning, distillation)
    is; quantization and pruning run in one process."""
    return plan.kind == "finetune" or (
        plan.compression is not None and plan.compression.distillation is not None
    )


def storage_environment(storage: StoragePlan) -> Env:
    """The object-storage settings every workload gets (credentials never: they come from the
    user's Secret in a pod, from the user's own environment locally)."""
    env: list[tuple[str, str]] = []
    if storage.endpoint:
        env.append((ENV_AWS_ENDPOINT_URL, storage.endpoint))
    if storage.region:
        env += [(ENV_AWS_REGION, storage.region), (ENV_AWS_DEFAULT_REGION, storage.region)]
    return tuple(env)


def _job_environment(plan: RunPlan) -> Env:
    return (
        (ENV_JOB_KIND, plan.job.kind),
        (ENV_JOB_NAMESPACE, plan.job.namespace),
        (ENV_JOB_NAME, plan.job.name),
    )


def validate_workload(plan: RunPlan) -> Workload:
    """The pre-flight check of model and data: one process, no accelerator needed."""
    return Workload(
        name=VALIDATE,
        runtime=RUNTIME_VALIDATE,
        job_env=_job_environment(plan),
        storage_env=storage_environment(plan.storage),
    )


def main_workload(plan: RunPlan) -> Workload:
    """Training (``finetune``) or compression: a gang over the plan's world when it trains."""
    finetune = plan.kind == "finetune"
    world = plan.world
    return Workload(
        name=TRAIN if finetune else COMPRESS,
        runtime=RUNTIME_FINETUNE if finetune else RUNTIME_COMPRESS,
        gang=Gang(world.workers, world.processes_per_worker) if runs_distributed(plan) else None,
        job_env=_job_environment(plan),
        storage_env=storage_environment(plan.storage),
        # Published for every main workload: the gang's headless Service names this port.
        ports=((RENDEZVOUS_PORT_NAME, MASTER_PORT),),
    )


def serve_workload(job: FineTuneJob | CompressJob, storage: StoragePlan) -> Workload:
    """The OpenAI-compatible server of a job's result (``RunArtifacts.served``), answering to the
    job's name. ``storage`` is the job's :func:`~kubetune.run.plan.storage_plan`."""
    served = artifacts_of(job).served
    name = job.metadata.name or ""
    args = ["--served-model-name", name, "--max-batch-size", str(job.spec.serve.max_batch_size)]
    if storage.endpoint:
        args += ["--storage-endpoint", storage.endpoint]
    return Workload(
        name=SERVE,
        runtime=RUNTIME_SERVE,
        args=tuple(args),
        storage_env=storage_environment(storage),
        ports=((HTTP_PORT_NAME, SERVE_PORT),),
        served=served,
    )
