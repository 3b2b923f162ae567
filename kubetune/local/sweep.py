"""``kubetune run`` of a FineTuneSweep: its trials run as local FineTuneJobs, up to
``parallelism`` at once as far as the machine's cores allow.

The study is the operator's (:mod:`kubetune.sweep`): each trial's parameters come from the trials
before it (running ones included), its evaluations are read from its progress updates as it runs,
and a trial the pruner judges hopeless is stopped at once (its processes stopped as a pod's would
be, its checkpoints kept) and recorded as Pruned. Each trial runs in a thread of its own with its
own run directory and lock; its terminal output goes to ``<workdir>/finetunesweep-<name>/trial-<N>.log``
while the terminal shows a live table of every trial. A trial that fails is recorded as Failed
and its siblings go on. At the end ``<output>/sweep/summary.json`` and
``<output>/sweep/report.html`` (Optuna's figures) are written and the best trial is printed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.api.spec import Serve
from kubetune.api.sweep import FineTuneSweep, FineTuneSweepSpec, TrialState
from kubetune.local.runner import LOCAL_NAMESPACE, LocalRunner, ProgressHook, RunStopped, visible_gpus
from kubetune.run.plan import SWEEP_SEARCH_ANNOTATION, SweepRef
from kubetune.sweep import study
from kubetune.sweep.evaluations import objective_of, observe
from kubetune.sweep.report import render
from kubetune.sweep.space import search_of, trial_name, trial_output, trial_spec
from kubetune.sweep.study import TrialRecord

SUMMARY_FILE = "sweep/summary.json"
REPORT_FILE = "sweep/report.html"


class TrialPruned(Exception):
    """Raised from the progress hook to stop a running trial: the pruner judged it hopeless."""

    def __init__(self, step: int) -> None:
        super().__init__(f"pruned at step {step}")
        self.step = step


@dataclass
class LocalTrial:
    number: int
    name: str
    params: dict[str, Any]
    output_uri: str
    state: TrialState = TrialState.running
    evaluations: dict[int, float] = field(default_factory=dict)
    latest: float | None = None  # the objective of its latest evaluation
    step: int | None = None
    total_steps: int | None = None
    started: str | None = None  # RFC 3339, when its run began and ended
    finished: str | None = None

    def record(self) -> TrialRecord:
        value = self.latest if self.state == TrialState.complete else None
        return TrialRecord(
            self.number, self.params, self.state, dict(self.evaluations), value, self.total_steps
        )


@dataclass
class SweepOutcome:
    exit_code: int
    trials: list[LocalTrial]
    best: LocalTrial | None
    summary_uri: str
    report_uri: str
    server_url: str | None = None  # where the best trial is served (promote)
    answer: str | None = None  # its answer to the example request
    tracking_run_id: str | None = None  # the sweep's MLflow run (tracking)


@dataclass(frozen=True)
class Slots:
    """How many trials run at once on this machine, and why fewer than asked, if so."""

    trials: int
    cores_per_trial: int
    lowered: str | None = None
    devices: list[str] | None = None  # on GPUs: the CUDA_VISIBLE_DEVICES of each slot


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('s') else 's'}"


def trial_slots(spec: FineTuneSweepSpec, cores: int, gpus: list[str] | None = None) -> Slots:
    """``parallelism``, bounded by the cores: each process of a trial (workers x processes per
    worker) needs a core of its own, or parallel trials only slow each other down; on GPUs
    (``gpus``: the visible ones) each process also needs a GPU of its own, and each slot gets its
    GPUs, so two trials never share one."""
    per_trial = spec.template.resources.workers * spec.template.resources.processes
    fit = max(1, cores // per_trial)
    trials = min(spec.parallelism, fit)
    why = f"this machine has {_plural(cores, 'core')}"
    if gpus is not None and len(gpus) // per_trial < trials:
        trials = max(1, len(gpus) // per_trial)
        why = f"this machine shows {_plural(len(gpus), 'GPU')}"
    lowered = None
    if trials < spec.parallelism:
        lowered = (
            f"parallelism {spec.parallelism} lowered to {trials}: each trial runs "
            f"{_plural(per_trial, 'process')} and {why}"
        )
    devices = None
    if gpus is not None and len(gpus) >= per_trial:
        devices = [",".join(gpus[k * per_trial : (k + 1) * per_trial]) for k in range(trials)]
    return Slots(trials, max(1, cores // trials), lowered, devices)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def trial_job(sweep: FineTuneSweep, number: int, params: Mapping[str, Any]) -> FineTuneJob:
    """Trial ``number`` as the FineTuneJob the operator would create, owned by the sweep when it
    has a uid (local mode gives each run of a sweep one, so its trials' runs share a parent)."""
    spec = sweep.spec
    name = str(sweep.metadata.name)
    metadata: dict[str, Any] = {
        "name": trial_name(name, number),
        "annotations": {SWEEP_SEARCH_ANNOTATION: json.dumps(search_of(spec), sort_keys=True)},
    }
    if sweep.metadata.uid:
        metadata["ownerReferences"] = [
            {"apiVersion": API_VERSION, "kind": "FineTuneSweep", "name": name, "uid": sweep.metadata.uid}
        ]
    return FineTuneJob.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "FineTuneJob",
            "metadata": metadata,
            "spec": trial_spec(spec, params, trial_output(spec, number)).to_wire(),
        }
    )


class SweepRunner:
    """Runs one FineTuneSweep through a :class:`LocalRunner` (which should not serve trials):
    each trial gets a runner of its own, with its options, on a console writing to its log.
    ``server`` serves the best trial when the sweep's promote asks (None: never)."""

    TICK_SECONDS = 0.5

    def __init__(
        self,
        runner: LocalRunner,
        console: Console | None = None,
        cores: int | None = None,
        server: LocalRunner | None = None,
    ) -> None:
        self.runner = runner
        self.server = server
        self.console = console or runner.console
        self.cores = cores or os.cpu_count() or 1
        # Guards the trials list and their fields: trial threads write them, the study reads them.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._free: list[str | None] = []  # set by run()

    def run(self, sweep: FineTuneSweep) -> SweepOutcome:
        # Each local run of a sweep is a sweep of its own, as a resource created anew would be:
        # its uid ties its trials' MLflow runs to one parent run.
        if not sweep.metadata.uid:
            meta = sweep.metadata.model_copy(update={"uid": str(uuid.uuid4())})
            sweep = sweep.model_copy(update={"metadata": meta})
        spec = sweep.spec
        gpus = visible_gpus() if self.runner.accelerator == "cuda" else None
        slots = trial_slots(spec, self.cores, gpus)
        # The GPUs of the slots no trial holds (on CPUs, one "slot" of no particular device each).
        self._free = list(slots.devices) if slots.devices else [None] * slots.trials
        if slots.lowered:
            self.console.print(f"[yellow]{slots.lowered}", highlight=False)
        trials: list[LocalTrial] = []
        running: dict[int, threading.Thread] = {}
        with Live(trials_table(spec, trials), console=self.console, refresh_per_second=2) as live:
            try:
                while True:
                    with self._lock:
                        while len(running) < slots.trials and self._may_start(spec, trials):
                            trial, job = self._next_trial(sweep, trials)
                            thread = threading.Thread(
                                target=self._run_trial,
                                args=(sweep, trial, job, trials, slots.cores_per_trial),
                                name=f"trial-{trial.number}",
                                daemon=True,
                            )
                            running[trial.number] = thread
                            thread.start()
                        more = self._may_start(spec, trials)
                    for number, thread in list(running.items()):
                        if not thread.is_alive():
                            thread.join()
                            del running[number]
                    with self._lock:
                        live.update(trials_table(spec, trials))
                    if not running and not more:
                        break
                    time.sleep(self.TICK_SECONDS)
            except BaseException:
                # Ctrl-C or SIGTERM: every running trial stops its processes before we go.
                self._stop.set()
                for thread in running.values():
                    thread.join()
                raise
        return self._finish(sweep, trials)

    @staticmethod
    def _may_start(spec: FineTuneSweepSpec, trials: list[LocalTrial]) -> bool:
        """Whether another trial may start: trials left, and no more failures than allowed."""
        records = [t.record() for t in trials]
        failed = sum(t.state == TrialState.failed for t in trials)
        return not study.exhausted(spec, records) and failed <= spec.max_failed_trials

    def _next_trial(self, sweep: FineTuneSweep, trials: list[LocalTrial]) -> tuple[LocalTrial, FineTuneJob]:
        """The next trial, its parameters sampled from every trial so far (running ones too),
        added to ``trials``."""
        records = [t.record() for t in trials]
        number = study.next_number(records)
        params = study.next_parameters(sweep.spec, records)
        job = trial_job(sweep, number, params)
        trial = LocalTrial(number, str(job.metadata.name), params, job.spec.output.uri, started=_now())
        trials.append(trial)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.console.print(
            f"[bold]trial {number}[/]: {shown}   output: {self._trial_log(sweep, number)}", highlight=False
        )
        return trial, job

    def _trial_log(self, sweep: FineTuneSweep, number: int) -> Path:
        return self.runner.options.workdir / f"finetunesweep-{sweep.metadata.name}" / f"trial-{number}.log"

    def _run_trial(
        self, sweep: FineTuneSweep, trial: LocalTrial, job: FineTuneJob, trials: list[LocalTrial], cores: int
    ) -> None:
        """One trial, in its own thread: what it prints goes to its log, what it reports to ``trial``."""
        spec = sweep.spec
        log = self._trial_log(sweep, trial.number)
        log.parent.mkdir(parents=True, exist_ok=True)

        def watch(update: dict[str, Any]) -> None:
            with self._lock:
                step = update.get("step")
                trial.step = step if isinstance(step, int) else trial.step
                total = update.get("totalSteps")
                trial.total_steps = total if isinstance(total, int) else trial.total_steps
                objective = objective_of(spec.objective.metric, update)
                trial.latest = objective if objective is not None else trial.latest
                seen = observe(trial.evaluations, trial.step, objective)
                if seen == trial.evaluations:
                    return
                trial.evaluations = seen
                prune = trial.number in study.to_prune(spec, [t.record() for t in trials])
            if prune:
                raise TrialPruned(max(seen))

        with self._lock:
            devices = self._free.pop(0)
        try:
            with log.open("a", encoding="utf-8") as out:
                options = dataclasses.replace(self.runner.options, cores=cores, devices=devices)
                runner = LocalRunner(options, Console(file=out, width=120, soft_wrap=True))
                state, note = self._outcome(runner, job, watch)
        finally:
            with self._lock:
                self._free.append(devices)
        with self._lock:
            trial.finished = _now()
            trial.state = state
            if state == TrialState.complete and trial.latest is None:
                # Nothing to rank it by: the template never evaluates (no eval data?).
                trial.state, note = TrialState.failed, f"reported no {spec.objective.metric}"
        self._announce(spec.objective.metric, trial, note, log)

    def _outcome(self, runner: LocalRunner, job: FineTuneJob, watch: ProgressHook) -> tuple[TrialState, str]:
        try:
            outcome = runner.run(job, on_progress=watch, stop=self._stop)
        except TrialPruned as pruned:
            return TrialState.pruned, f"at step {pruned.step}"
        except RunStopped:
            return TrialState.failed, "stopped"
        except Exception as exc:  # one trial's trouble is not its siblings'
            return TrialState.failed, f"{type(exc).__name__}: {exc}"
        if outcome.exit_code != 0:
            return TrialState.failed, f"exit code {outcome.exit_code}"
        return TrialState.complete, ""

    def _announce(self, metric: str, trial: LocalTrial, note: str, log: Path) -> None:
        latest = "-" if trial.latest is None else f"{trial.latest:.4g}"
        if trial.state == TrialState.pruned:
            self.console.print(
                f"[yellow]✂ trial {trial.number} pruned {note}: {metric} {latest} is worse than the "
                f"other trials' at this step; its checkpoints are kept in {trial.output_uri}",
                highlight=False,
            )
        elif trial.state == TrialState.failed:
            self.console.print(
                f"[red]✗ trial {trial.number} failed ({note}); its output: {log}", highlight=False
            )
        else:
            self.console.print(
                f"[green]✓[/] trial {trial.number} complete: {metric} {latest}", highlight=False
            )

    def _finish(self, sweep: FineTuneSweep, trials: list[LocalTrial]) -> SweepOutcome:
        from kubetune.storage import StorageConfig, open_store

        spec = sweep.spec
        records = [t.record() for t in trials]
        winner = study.best(spec, records)
        best = next((t for t in trials if winner and t.number == winner.number), None)
        base = spec.template.output.uri.rstrip("/")
        summary_uri, report_uri = f"{base}/{SUMMARY_FILE}", f"{base}/{REPORT_FILE}"
        store = open_store(
            base, StorageConfig(endpoint=spec.template.storage.endpoint, region=spec.template.storage.region)
        )
        title = f"FineTuneSweep {sweep.metadata.name}"
        store.write_bytes(report_uri, render(title, spec, records).encode())
        summary = summarise(sweep, trials, best, report_uri)
        store.write_bytes(summary_uri, json.dumps(summary, indent=2, sort_keys=True).encode())
        if best is None:
            self.console.print("[red]✗ no trial completed")
        else:
            self.console.print(
                f"[green]★ best trial {best.number}[/]: {spec.objective.metric} {best.latest:.6g} "
                f"with {json.dumps(best.params)}; model in {best.output_uri}",
                highlight=False,
            )
        self.console.print(f"report: {report_uri}\nsummary: {summary_uri}", highlight=False)
        outcome = SweepOutcome(0 if best else 1, trials, best, summary_uri, report_uri)
        outcome.tracking_run_id = self._track(sweep, summary)
        if (
            best is not None
            and spec.promote.enabled
            and self.server is not None
            and self.server.options.serve
        ):
            self._promote(sweep, best, outcome)
        return outcome

    def _track(self, sweep: FineTuneSweep, summary: dict[str, Any]) -> str | None:
        """The summary on the sweep's MLflow run, when the sweep (or its template) is tracked."""
        tracking = sweep.spec.tracking or sweep.spec.template.tracking
        if tracking is None or tracking.mlflow is None:
            return None
        from kubetune.trainer.tracking.sweep import finish_sweep

        name = str(sweep.metadata.name)
        target = tracking.mlflow.target(LOCAL_NAMESPACE, name)
        ref = SweepRef(name=name, uid=str(sweep.metadata.uid), search=search_of(sweep.spec))

        def degraded(message: str) -> None:
            self.console.print(
                f"[yellow]MLflow at {target.uri}: {message}; the sweep's summary is not in MLflow (the sweep "
                "itself is unaffected)",
                highlight=False,
            )

        run_id: str | None = finish_sweep(target, ref, LOCAL_NAMESPACE, summary, degraded)
        if run_id is not None:
            self.console.print(
                f"MLflow: sweep run {run_id} in experiment {target.experiment!r} at {target.uri}",
                highlight=False,
            )
        return run_id

    def _promote(self, sweep: FineTuneSweep, best: LocalTrial, outcome: SweepOutcome) -> None:
        """Serve the best trial's model with the promote's serving options, as a FineTuneJob's
        end serves its own."""
        assert self.server is not None
        job = trial_job(sweep, best.number, best.params)
        serve = Serve.model_validate({**sweep.spec.promote.to_wire(), "enabled": True})
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"serve": serve})})
        self.console.print(
            f"[bold]promoting trial {best.number}[/]: serving {best.output_uri}", highlight=False
        )
        served = self.server.serve_finished(job)
        outcome.server_url, outcome.answer = served.server_url, served.answer
        if served.exit_code != 0:
            outcome.exit_code = served.exit_code


def summarise(
    sweep: FineTuneSweep, trials: list[LocalTrial], best: LocalTrial | None, report_uri: str
) -> dict[str, Any]:
    """The sweep's summary.json: its objective, every trial with its evaluations, the best one."""

    def row(t: LocalTrial) -> dict[str, Any]:
        return {
            "number": t.number,
            "name": t.name,
            "parameters": t.params,
            "state": str(t.state),
            "objective": t.latest,
            "step": t.step,
            "outputUri": t.output_uri,
            "startTime": t.started,
            "completionTime": t.finished,
            "evaluations": {str(step): value for step, value in sorted(t.evaluations.items())},
        }

    return {
        "name": sweep.metadata.name,
        "objective": sweep.spec.objective.to_wire(),
        "trials": [row(t) for t in trials],
        "bestTrial": row(best) if best else None,
        "report": report_uri,
    }


def trials_table(spec: FineTuneSweepSpec, trials: list[LocalTrial]) -> Table:
    """Every trial so far, its parameters, state and objective; the best one starred."""
    winner = study.best(spec, [t.record() for t in trials])
    table = Table(title="trials", title_justify="left")
    table.add_column("#", justify="right")
    for p in spec.parameters:
        table.add_column(p.path.rsplit(".", 1)[-1])
    table.add_column("state")
    table.add_column("step", justify="right")
    table.add_column(spec.objective.metric, justify="right")
    colours = {TrialState.complete: "green", TrialState.pruned: "yellow", TrialState.failed: "red"}
    for t in trials:
        star = " ★" if winner and winner.number == t.number else ""
        values = [t.params.get(p.path) for p in spec.parameters]
        table.add_row(
            f"{t.number}{star}",
            *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values),
            f"[{colours.get(t.state, 'white')}]{t.state}[/]",
            "-" if t.step is None else str(t.step),
            "-" if t.latest is None else f"{t.latest:.4g}",
        )
    return table
