"""``kubetune run``: a FineTuneJob or CompressJob executed on this machine, no cluster needed.

Same validation as the API server, same run plan as the operator, same runtime entry points as
the pods: only the process launcher differs (local processes instead of an Indexed Job).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from kubetune.api import CompressJob, FineTuneJob
from kubetune.api.spec import TaskType
from kubetune.errors import KubetuneError
from kubetune.local import launcher, processes
from kubetune.local.display import (
    ProgressFile,
    TrainingProgress,
    classification_table,
    flatten,
    summary_table,
    usage_rows,
)
from kubetune.run.artifacts import RUN_RECORD_FILE, AdapterOnlyUpstream
from kubetune.run.logs import attempt_logs_uri, attempts_in
from kubetune.run.plan import RunPlan, plan_compress, plan_finetune
from kubetune.run.upstream import UpstreamNotFound, compress_model_uri
from kubetune.run.workloads import (
    ENV_ATTEMPT,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_STORAGE,
    NON_RETRIABLE_EXIT_CODES,
    Workload,
    main_workload,
    serve_workload,
    validate_workload,
)

LOCAL_NAMESPACE = "local"
ProgressHook = Callable[[dict[str, Any]], None]
EXAMPLE_PROMPT_ANNOTATION = "kubetune.io/example-prompt"
DEFAULT_PROMPT = "The"


@dataclass
class RunOptions:
    workdir: Path
    serve: bool = True
    exit_after_serve_check: bool = False
    port: int | None = None
    accelerator: str = "auto"
    verbose: bool = False
    cores: int | None = None  # the cores its processes share (default: the machine's)
    devices: str | None = None  # the GPUs they may use, as CUDA_VISIBLE_DEVICES (default: all)


@dataclass(frozen=True)
class JobWorkloads:
    """What local mode runs for one job, in order: the same workloads the operator renders."""

    validate: Workload
    main: Workload
    serve: Workload | None


class RunStopped(Exception):
    """The run was asked to stop (``stop`` set): its processes were stopped, its checkpoints kept."""


@dataclass
class RunOutcome:
    exit_code: int
    plan: RunPlan | None = None
    timings: dict[str, float] = field(default_factory=dict)
    server_url: str | None = None
    answer: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def visible_gpus() -> list[str]:
    """The GPUs processes started here may use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU
    ``nvidia-smi -L`` lists (none without it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    count = sum(line.startswith("GPU ") for line in listing.splitlines())  # not its MIG lines
    return [str(i) for i in range(count)]


def detect_accelerator(requested: str) -> str:
    if requested != "auto":
        return requested
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


class LocalRunner:
    """Runs the jobs of one manifest file in order (a CompressJob may use an earlier FineTuneJob)."""

    def __init__(self, options: RunOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.accelerator = detect_accelerator(options.accelerator)
        self.finished: dict[str, FineTuneJob] = {}
        # The best trial's FineTuneJob of each sweep run in this invocation, by sweep name.
        self.sweep_winners: dict[str, FineTuneJob] = {}

    # --- plans ----------------------------------------------------------------------------

    def plan_for(self, job: FineTuneJob | CompressJob) -> RunPlan:
        """The job's run plan. Raises :class:`LookupError` for a CompressJob whose upstream has not
        run here yet, :class:`~kubetune.run.artifacts.AdapterOnlyUpstream` for one whose upstream
        wrote only an adapter (the operator refuses it with the same message)."""
        if isinstance(job, FineTuneJob):
            return plan_finetune(job, namespace=LOCAL_NAMESPACE)
        try:
            model_uri = compress_model_uri(job, self.finished.values(), self.sweep_winners)
        except UpstreamNotFound as missing:
            if missing.kind == "FineTuneSweep":
                raise LookupError(
                    f"spec.{missing.field}: FineTuneSweep {missing.name!r} has not run in this invocation "
                    "with a completed trial; put it before the CompressJob in the same file, or use "
                    "spec.model.uri (a sweep's best trial is bestTrial in its <output>/sweep/summary.json)"
                ) from None
            raise LookupError(
                f"spec.model.fromFineTuneJob: FineTuneJob {missing.name!r} has not run in this "
                "invocation; put it before the CompressJob in the same file, or use spec.model.uri"
            ) from None
        return plan_compress(job, model_uri=model_uri, namespace=LOCAL_NAMESPACE)

    def workloads_for(self, job: FineTuneJob | CompressJob, plan: RunPlan) -> JobWorkloads:
        serves = self.options.serve and job.spec.serve.enabled
        return JobWorkloads(
            validate=validate_workload(plan),
            main=main_workload(plan),
            serve=serve_workload(job, plan.storage) if serves else None,
        )

    # --- one job --------------------------------------------------------------------------

    def run(
        self,
        job: FineTuneJob | CompressJob,
        on_progress: ProgressHook | None = None,
        stop: threading.Event | None = None,
    ) -> RunOutcome:
        """Run ``job``; ``on_progress`` sees every progress update of its main processes, in order,
        and may stop them by raising (the processes are stopped, the exception propagates).
        Setting ``stop`` (from another thread) stops them too and raises :class:`RunStopped`."""
        name = job.metadata.name or "job"
        kind = type(job).kind_name
        try:
            plan = self.plan_for(job)
        except (LookupError, AdapterOnlyUpstream) as exc:
            self.console.print(f"[red]{kind}/{name}: {exc}")
            return RunOutcome(EXIT_INVALID_INPUT)
        with self._holding_run_dir(kind, name) as run_dir:
            if run_dir is None:
                return RunOutcome(EXIT_INVALID_INPUT, plan)
            return self._run_locked(job, plan, run_dir, on_progress, stop)

    @contextlib.contextmanager
    def _holding_run_dir(self, kind: str, name: str) -> Iterator[Path | None]:
        """The job's run directory, held by this process inside the block; None (said on the
        console) while another run of the same job holds it."""
        run_dir = self.options.workdir / f"{kind.lower()}-{name}"
        try:
            processes.lock_run_dir(run_dir)
        except processes.RunDirLocked as exc:
            self.console.print(f"[red]✗ {kind}/{name}: {exc}", highlight=False)
            yield None
            return
        try:
            yield run_dir
        finally:
            processes.unlock_run_dir()

    def _run_locked(
        self,
        job: FineTuneJob | CompressJob,
        plan: RunPlan,
        run_dir: Path,
        on_progress: ProgressHook | None,
        stop: threading.Event | None,
    ) -> RunOutcome:
        def check_stop() -> None:
            if stop is not None and stop.is_set():
                raise RunStopped(f"{plan.job.name} was asked to stop")

        name = job.metadata.name or "job"
        kind = type(job).kind_name
        try:
            changes = resume_changes(plan)
        except KubetuneError as exc:
            self.console.print(f"[red]✗ {kind}/{name}: {exc}", highlight=False)
            return RunOutcome(exc.exit_code, plan)
        if changes:
            self.console.print(
                f"[red]✗ {kind}/{name}: {plan.output_uri} holds an earlier run of this job with another "
                "training spec, and a run resumes from its own checkpoints (a cluster forbids editing the "
                "training spec of a started job):",
                highlight=False,
            )
            for change in changes:
                self.console.print(f"  {change}", markup=False, highlight=False)
            self.console.print(
                f"to start over, delete {plan.output_uri} (or choose another output.uri or job name) and run "
                "the command again; to resume, restore the earlier spec",
                highlight=False,
            )
            return RunOutcome(EXIT_INVALID_INPUT, plan)
        self._run_dir = run_dir
        launcher.termination_log(run_dir).unlink(missing_ok=True)
        plan_path = run_dir / "plan.json"
        plan_path.write_text(plan.to_json())
        progress_path = run_dir / "progress.jsonl"
        progress_path.unlink(missing_ok=True)
        env = launcher.runtime_env(
            accelerator=self.accelerator, scratch=run_dir, devices=self.options.devices
        )
        # Each local run of a job is one attempt, as each gang of a cluster's job is.
        attempt = next_attempt(plan)
        env[ENV_ATTEMPT] = str(attempt)
        work = self.workloads_for(job, plan)
        logs = run_dir / "logs"
        outcome = RunOutcome(EXIT_OK, plan)
        self.console.rule(f"{kind} {name}")
        self.console.print(f"plan: {plan_path}   logs: {logs}   output: {plan.output_uri}")
        self.console.print(f"kept logs: {attempt_logs_uri(plan.output_uri, attempt)}", highlight=False)

        started = time.monotonic()
        with self.console.status("validating model and data..."):
            result = processes.run_gang(
                [
                    launcher.validate_process(
                        work.validate,
                        plan_path=plan_path,
                        progress_file=progress_path,
                        scratch=run_dir,
                        env=env,
                    )
                ],
                logs,
                on_tick=check_stop,
            )
        outcome.timings["validate"] = time.monotonic() - started
        if result.exit_code != 0:
            return self._failed(outcome, result, "validation")
        self.console.print(f"[green]✓[/] model and data valid ({outcome.timings['validate']:.1f}s)")

        started = time.monotonic()
        specs = launcher.main_processes(
            work.main,
            plan_path=plan_path,
            progress_file=progress_path,
            scratch=run_dir,
            master_port=free_port(),
            env=env,
            cores=self.options.cores,
        )
        follower = ProgressFile(progress_path)
        label = "training" if plan.kind == "finetune" else "compressing"
        with TrainingProgress(self.console, label) as bar:

            def tick() -> None:
                check_stop()
                if follower.poll() is not None:
                    bar.update(follower.latest)
                    if on_progress is not None:
                        for update in follower.updates:
                            on_progress(update)

            result = processes.run_gang(specs, logs, on_tick=tick)
        outcome.timings[label] = time.monotonic() - started
        if result.exit_code != 0:
            return self._failed(outcome, result, label)
        self._summarise(plan, outcome)
        if isinstance(job, FineTuneJob):
            self.finished[name] = job
        if work.serve is not None:
            return self._serve(job, plan, work.serve, run_dir, env, outcome)
        return outcome

    def serve_finished(self, job: FineTuneJob) -> RunOutcome:
        """Serve a FineTuneJob that already ran (its model is in its output) as the end of its run
        would: the server, an example request and its answer (a sweep's promote of its best trial)."""
        name = job.metadata.name or "job"
        plan = self.plan_for(job)
        with self._holding_run_dir(FineTuneJob.kind_name, name) as run_dir:
            if run_dir is None:
                return RunOutcome(EXIT_INVALID_INPUT, plan)
            self._run_dir = run_dir
            env = launcher.runtime_env(accelerator=self.accelerator, scratch=run_dir)
            workload = serve_workload(job, plan.storage)
            return self._serve(job, plan, workload, run_dir, env, RunOutcome(EXIT_OK, plan))

    def _failed(self, outcome: RunOutcome, result: processes.GangResult, stage: str) -> RunOutcome:
        proc = result.failed
        what = {EXIT_INVALID_INPUT: "invalid input", EXIT_STORAGE: "storage error"}.get(
            result.exit_code, "failure"
        )
        self.console.print(f"[red]✗ {stage} failed ({what}, exit code {result.exit_code})")
        reason = self._termination_reason()
        if reason:
            self.console.print(f"[red]{reason}", highlight=False)
        if proc is not None:
            self.console.print(f"[dim]last lines of {proc.log_path}:[/]")
            self.console.print(proc.tail(), markup=False, highlight=False)
        if result.exit_code not in NON_RETRIABLE_EXIT_CODES:
            self.console.print("run the same command again to resume from the newest committed checkpoint")
        outcome.exit_code = result.exit_code or 1
        return outcome

    def _termination_reason(self) -> str:
        path = launcher.termination_log(self._run_dir)
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def _summarise(self, plan: RunPlan, outcome: RunOutcome) -> None:
        from kubetune.storage import StorageConfig, open_store

        config = StorageConfig(endpoint=plan.storage.endpoint, region=plan.storage.region)
        artifacts = plan.artifacts
        results_uri = artifacts.report_uri or artifacts.metrics_uri
        try:
            results = json.loads(open_store(results_uri, config).read_bytes(results_uri))
        except Exception as exc:  # the summary is a courtesy; the run itself succeeded
            self.console.print(f"[yellow]could not read {results_uri}: {exc}")
            results = {}
        usage = results.pop("usage", None)
        report = results.pop("classification_report", None)
        rows: dict[str, Any] = {k: v for k, v in flatten(results).items() if isinstance(v, int | float | str)}
        rows.update({f"time.{k}": f"{v:.1f}s" for k, v in outcome.timings.items()})
        rows["artifacts"] = plan.output_uri
        self.console.print(summary_table("results", rows))
        if isinstance(report, dict):
            self.console.print(classification_table(report))
        if isinstance(usage, dict):
            self.console.print(summary_table("resource use", usage_rows(usage)))

    # --- serving --------------------------------------------------------------------------

    def _serve(
        self,
        job: FineTuneJob | CompressJob,
        plan: RunPlan,
        workload: Workload,
        run_dir: Path,
        env: dict[str, str],
        outcome: RunOutcome,
    ) -> RunOutcome:
        port = self.options.port or free_port()
        name = job.metadata.name or "model"
        spec = launcher.serve_process(workload, port=port, scratch=run_dir, env=env)
        base = f"http://{launcher.LOCAL_HOST}:{port}"
        served = workload.served.model_uri if workload.served else plan.output_uri
        with processes.background(spec, run_dir / "logs") as server:
            with self.console.status(f"starting the server for {served}..."):
                ready = wait_ready(base, server)
            if not ready:
                self.console.print(
                    f"[red]✗ the server did not become ready; last lines of {server.log_path}:"
                )
                self.console.print(server.tail(), markup=False, highlight=False)
                outcome.exit_code = server.popen.poll() or 1
                return outcome
            outcome.server_url = f"{base}/v1"
            self.console.print(f"[green]✓[/] serving [bold]{name}[/] at {outcome.server_url}")
            prompt = (job.metadata.annotations or {}).get(EXAMPLE_PROMPT_ANNOTATION, DEFAULT_PROMPT)
            path, body = example_request(plan, name, prompt)
            self.console.print("example request:")
            self.console.print(
                f"  curl -s {base}{path} -H 'Content-Type: application/json' -d '{json.dumps(body)}'",
                markup=False,
                highlight=False,
            )
            answer = post_json(base + path, body)
            outcome.answer = extract_answer(answer)
            self.console.print(f"answer: [bold]{outcome.answer}[/]")
            if self.options.exit_after_serve_check:
                return outcome
            self.console.print("serving until Ctrl-C")
            try:
                server.popen.wait()
            except KeyboardInterrupt:
                self.console.print("stopping the server")
        return outcome


# Plan fields that are not part of the training spec: who runs it (a trial's sweep is a new one at
# each local run of it) and how storage is reached.
_NOT_TRAINING_SPEC = ("plan_version", "job", "storage", "output_uri", "sweep")


def next_attempt(plan: RunPlan) -> int:
    """The attempt a new local run of ``plan``'s job is: one after the newest whose logs its
    output keeps, 0 for the first."""
    from kubetune.storage import StorageConfig, open_store

    logs_uri = plan.artifacts.logs_uri
    config = StorageConfig(endpoint=plan.storage.endpoint, region=plan.storage.region)
    try:
        keys = [info.key for info in open_store(logs_uri, config).list(logs_uri)]
    except KubetuneError:
        keys = []  # an output that cannot be listed yet has no attempts; the run itself will say why
    found = attempts_in(keys)
    return found[-1] + 1 if found else 0


def resume_changes(plan: RunPlan) -> list[str]:
    """What differs between ``plan`` and the plan of the earlier run recorded in
    ``<output>/run.json`` (``"hyperparameters.learning_rate: 0.0001 -> 0.001"``), for an earlier run of
    this same job; ``[]`` when there is none or nothing differs."""
    from kubetune.storage import StorageConfig, open_store

    record_uri = plan.output(RUN_RECORD_FILE)
    config = StorageConfig(endpoint=plan.storage.endpoint, region=plan.storage.region)
    store = open_store(record_uri, config)
    if not store.exists(record_uri):
        return []
    try:
        record = json.loads(store.read_bytes(record_uri))
    except ValueError:
        return []  # the runtime refuses it with the reason (not a run record)
    previous = record.get("plan") if isinstance(record, dict) else None
    job = record.get("job") if isinstance(record, dict) else None
    if not isinstance(previous, dict) or not isinstance(job, dict):
        return []
    if (job.get("namespace"), job.get("name")) != (plan.job.namespace, plan.job.name):
        return []  # another job's: the runtime refuses the output (OutputConflict)
    # Read through today's plan model: a field a newer kubetune added (with its default) is not
    # a change the user made, so an upgrade does not refuse to resume an earlier run.
    # A plan today's model cannot read is compared as it was written.
    with contextlib.suppress(ValidationError):
        previous = json.loads(RunPlan.model_validate(previous).to_json())
    current = json.loads(plan.to_json())
    old = {k: v for k, v in _leaves(previous).items() if k.split(".")[0] not in _NOT_TRAINING_SPEC}
    new = {k: v for k, v in _leaves(current).items() if k.split(".")[0] not in _NOT_TRAINING_SPEC}
    return [
        f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists kept whole as values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    text = "(unset)" if value is None else json.dumps(value)
    return text if len(text) <= 80 else text[:79] + "…"


def wait_ready(base: str, server: processes.RunningProcess, timeout: float = 600.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def example_request(plan: RunPlan, model: str, prompt: str) -> tuple[str, dict[str, Any]]:
    if plan.task.type == TaskType.sequence_classification:
        return "/v1/classifications", {"model": model, "input": prompt}
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0}


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result
    except urllib.error.HTTPError as exc:
        return {"error": exc.read().decode(errors="replace")}


def extract_answer(response: dict[str, Any]) -> str:
    if response.get("choices"):
        choice = response["choices"][0]
        text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
        return str(text).strip() or "(empty)"
    if "data" in response:
        return json.dumps(response["data"])
    return json.dumps(response)
