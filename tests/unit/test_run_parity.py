"""Local mode runs what the operator renders: for every shipped example and every golden rendering
case, both sides plan the job identically, describe the same workloads (kubetune.run.workloads),
and each translates those workloads faithfully, the operator into containers and local mode into
processes: the same runtime and arguments, the contract's environment, a gang or one process,
the same served model and adapter."""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.spec import ServeRuntime
from kubetune.api.validation import load_documents
from kubetune.local import launcher
from kubetune.local.runner import LOCAL_NAMESPACE, JobWorkloads, LocalRunner, RunOptions
from kubetune.operator import render, render_cli
from kubetune.operator.settings import Settings
from kubetune.run.artifacts import AdapterOnlyUpstream, compressible_model_uri
from kubetune.run.plan import RunPlan
from kubetune.run.workloads import (
    EXIT_INVALID_INPUT,
    PROGRESS_TO_STATUS_AND_LOG,
    Rendezvous,
    Workload,
    main_workload,
    progress_to_file,
    validate_workload,
)
from tests.unit.test_render import CASES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
# Local mode knows no default storage endpoint, so the operator renders without one here too.
SETTINGS = Settings()
RUN_DIR = Path("/work/runs/job")
PLAN_PATH = RUN_DIR / "plan.json"
PROGRESS = RUN_DIR / "progress.jsonl"
MASTER_PORT = 40123
SERVE_PORT = 40124

Job = FineTuneJob | CompressJob
Manifest = dict[str, Any]


@dataclass(frozen=True)
class Case:
    job: Job
    upstreams: list[FineTuneJob]  # the FineTuneJobs that ran before it


def example_cases() -> dict[str, Case]:
    """Every job of the examples; a chained CompressJob's upstream is the example FineTuneJob it
    names (compress-from-finetune.yaml follows finetune-lora-causal-lm.yaml)."""
    jobs = {
        f"{path.stem}/{job.metadata.name}": job
        for path in EXAMPLES
        for job in render_cli.load_jobs(load_documents(path.read_text()), str(path))
    }
    finetunes = [job for job in jobs.values() if isinstance(job, FineTuneJob)]
    return {case_id: Case(job, finetunes) for case_id, job in jobs.items()}


CASES_BY_ID = {**example_cases(), **{f"golden/{name}": Case(job, []) for name, job in CASES.items()}}


# --- each side's view of one job --------------------------------------------------------------------


def local_side(case: Case) -> tuple[RunPlan, JobWorkloads]:
    """What `kubetune run` plans and launches, after the upstream jobs ran earlier in the file."""
    runner = LocalRunner(
        RunOptions(workdir=RUN_DIR.parent, accelerator="cpu"), Console(file=None, quiet=True)
    )
    runner.finished.update({up.metadata.name or "": up for up in case.upstreams})
    plan = runner.plan_for(case.job)
    return plan, runner.workloads_for(case.job, plan)


def operator_plan(case: Case) -> RunPlan:
    """The plan the operator puts in the job's ConfigMap (a chained CompressJob resolved as
    `kubetune render` resolves it)."""
    job = case.job
    model_uri = (
        render_cli.resolve_model(job, [*case.upstreams], None) if isinstance(job, CompressJob) else None
    )
    return render.render_plan(job, SETTINGS, LOCAL_NAMESPACE, model_uri)


def operator_workloads(case: Case, plan: RunPlan) -> JobWorkloads:
    serves = case.job.spec.serve.enabled
    return JobWorkloads(
        validate=validate_workload(plan),
        main=main_workload(plan),
        serve=render.serving_workload(case.job, SETTINGS) if serves else None,
    )


def env_of(container: Manifest) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def contract_env(workload: Workload, *, plan_path: str, progress: str) -> dict[str, str]:
    return {
        **dict(workload.environment(plan_path=plan_path, progress=progress)),
        **dict(workload.storage_env),
    }


def rendered(case: Case, plan: RunPlan) -> dict[str, Manifest]:
    """The operator's validation Job, gang Job and serving Deployment of the job, by component."""
    model_uri = plan.model_uri if isinstance(case.job, CompressJob) else None
    children = render.render_all(case.job, SETTINGS, LOCAL_NAMESPACE, model_uri=model_uri)
    return {
        child["metadata"]["labels"][render.LABEL_COMPONENT]: child
        for child in children
        if child["kind"] in ("Job", "Deployment")
    }


def pod(manifest: Manifest) -> Manifest:
    spec: Manifest = manifest["spec"]["template"]["spec"]
    return spec


# --- the specification ------------------------------------------------------------------------------


@pytest.fixture(params=sorted(CASES_BY_ID), name="case")
def case_fixture(request: pytest.FixtureRequest) -> Case:
    return CASES_BY_ID[request.param]


def test_every_example_is_covered() -> None:
    files = {case_id.split("/")[0] for case_id in CASES_BY_ID}
    with_jobs = {
        p.stem
        for p in EXAMPLES
        if "kind: FineTuneJob" in p.read_text() or "kind: CompressJob" in p.read_text()
    }
    assert files >= with_jobs


def test_local_mode_and_the_operator_plan_the_same_workloads(case: Case) -> None:
    local_plan, local = local_side(case)
    plan = operator_plan(case)
    assert local_plan == plan
    assert local == operator_workloads(case, plan)


def test_the_operator_runs_its_workloads_in_its_pods(case: Case) -> None:
    plan = operator_plan(case)
    work = operator_workloads(case, plan)
    children = rendered(case, plan)
    names = render.child_names(case.job)

    validate = pod(children[work.validate.name])["containers"][0]
    assert validate["command"] == ["python", *work.validate.argv(plan_path=render.PLAN_PATH)]
    pod_env = contract_env(work.validate, plan_path=render.PLAN_PATH, progress=PROGRESS_TO_STATUS_AND_LOG)
    assert env_of(validate).items() >= pod_env.items()

    gang = children[work.main.name]
    main = pod(gang)["containers"][0]
    rendezvous = Rendezvous(render.NODE_RANK_OF_INDEXED_POD, f"{names.main(0)}-0.{names.workers}")
    expected = work.main.argv(
        plan_path=render.PLAN_PATH, rendezvous=rendezvous if work.main.distributed else None
    )
    assert [*main["command"], *main["args"]] == ["python", *expected]
    pod_env = contract_env(work.main, plan_path=render.PLAN_PATH, progress=PROGRESS_TO_STATUS_AND_LOG)
    assert env_of(main).items() >= pod_env.items()
    assert {(p["name"], p["containerPort"]) for p in main["ports"]} == set(work.main.ports)
    nodes = work.main.gang.nodes if work.main.gang else 1
    assert (gang["spec"]["completions"], gang["spec"]["parallelism"]) == (nodes, nodes)

    if work.serve is None:
        assert render.COMPONENT_SERVE not in children
        return
    serving = pod(children[work.serve.name])
    served = work.serve.served
    assert served is not None
    if case.job.spec.serve.runtime == ServeRuntime.vllm:
        fetch = serving["initContainers"][0]
        assert fetch["args"][fetch["args"].index("--model") + 1] == served.model_uri
        assert ("--adapter" in fetch["args"]) == (served.adapter_uri is not None)
        assert env_of(fetch).items() >= dict(work.serve.storage_env).items()
    else:
        server = serving["containers"][0]
        assert [*server["command"], *server["args"]] == ["python", *work.serve.argv()]
        assert env_of(server).items() >= dict(work.serve.storage_env).items()
        assert {(p["name"], p["containerPort"]) for p in server["ports"]} == set(work.serve.ports)


def test_local_mode_runs_its_workloads_in_its_processes(case: Case) -> None:
    _, work = local_side(case)
    env = launcher.runtime_env(accelerator="cpu", scratch=RUN_DIR)
    local_env = contract_env(work.validate, plan_path=str(PLAN_PATH), progress=progress_to_file(PROGRESS))

    validate = launcher.validate_process(
        work.validate, plan_path=PLAN_PATH, progress_file=PROGRESS, scratch=RUN_DIR, env=env
    )
    assert validate.argv == [
        sys.executable,
        *work.validate.argv(plan_path=str(PLAN_PATH), scratch_dir=str(RUN_DIR / "validate")),
    ]
    assert validate.env.items() >= local_env.items()

    workers = launcher.main_processes(
        work.main,
        plan_path=PLAN_PATH,
        progress_file=PROGRESS,
        scratch=RUN_DIR,
        master_port=MASTER_PORT,
        env=env,
    )
    assert len(workers) == (work.main.gang.nodes if work.main.gang else 1)
    for rank, worker in enumerate(workers):
        rendezvous = (
            Rendezvous(str(rank), launcher.LOCAL_HOST, MASTER_PORT) if work.main.distributed else None
        )
        scratch = str(RUN_DIR / f"worker-{rank}")
        argv = work.main.argv(plan_path=str(PLAN_PATH), scratch_dir=scratch, rendezvous=rendezvous)
        assert worker.argv == [sys.executable, *argv]
        assert worker.env.items() >= local_env.items()

    if work.serve is None:
        return
    server = launcher.serve_process(work.serve, port=SERVE_PORT, scratch=RUN_DIR, env=env)
    argv = work.serve.argv(host=launcher.LOCAL_HOST, port=SERVE_PORT, scratch_dir=str(RUN_DIR / "serve"))
    assert server.argv == [sys.executable, *argv]
    assert server.env.items() >= dict(work.serve.storage_env).items()


def test_local_mode_refuses_an_adapter_only_upstream_as_the_operator_does(tmp_path: Path) -> None:
    lora = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "support-lora"},
            "spec": {
                "model": {"uri": "s3://models/base"},
                "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction"},
                "method": {"type": "lora", "mergeAdapter": False},
                "hyperparameters": {"epochs": 1},
                "output": {"uri": "s3://runs/support"},
            },
        }
    )
    compress = CompressJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "CompressJob",
            "metadata": {"name": "support-w8"},
            "spec": {
                "model": {"fromFineTuneJob": "support-lora"},
                "dataset": {"train": {"uri": "s3://data/support.jsonl"}, "format": "instruction"},
                "quantization": {"method": "rtn", "scheme": "W8A16"},
                "output": {"uri": "s3://runs/support-w8"},
            },
        }
    )
    with pytest.raises(AdapterOnlyUpstream) as refusal:
        compressible_model_uri(lora)  # what the operator fails the CompressJob with
    with pytest.raises(render_cli.RenderInputError, match=re.escape(str(refusal.value))):
        render_cli.resolve_model(compress, [lora], None)

    out = io.StringIO()
    runner = LocalRunner(
        RunOptions(workdir=tmp_path, serve=False, accelerator="cpu"), Console(file=out, width=400)
    )
    runner.finished[lora.metadata.name or ""] = lora
    outcome = runner.run(compress)
    assert outcome.exit_code == EXIT_INVALID_INPUT
    assert str(refusal.value) in " ".join(out.getvalue().split())
    assert not any(tmp_path.iterdir()), "refused before anything started"
