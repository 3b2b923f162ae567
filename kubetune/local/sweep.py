"""``kubetune run`` of a FineTuneSweep: its trials run one after another as local FineTuneJobs.

The study is the operator's (:mod:`kubetune.sweep`): each trial's parameters come from the trials
before it, its evaluations are read from its progress updates as it runs, and a trial the pruner
judges hopeless is stopped at once (its processes stopped as a pod's would be, its checkpoints
kept) and recorded as Pruned. At the end ``<output>/sweep/summary.json`` and
``<output>/sweep/report.html`` (Optuna's figures) are written and the best trial is printed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.api.sweep import FineTuneSweep, FineTuneSweepSpec, TrialState
from kubetune.local.runner import LocalRunner
from kubetune.sweep import study
from kubetune.sweep.evaluations import objective_of, observe
from kubetune.sweep.report import render
from kubetune.sweep.space import trial_name, trial_output, trial_spec
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

    def record(self) -> TrialRecord:
        value = self.latest if self.state == TrialState.complete else None
        return TrialRecord(self.number, self.params, self.state, dict(self.evaluations), value)


@dataclass
class SweepOutcome:
    exit_code: int
    trials: list[LocalTrial]
    best: LocalTrial | None
    summary_uri: str
    report_uri: str


def trial_job(sweep: FineTuneSweep, number: int, params: Mapping[str, Any]) -> FineTuneJob:
    """Trial ``number`` as the FineTuneJob the operator would create (without its owner)."""
    spec = sweep.spec
    return FineTuneJob.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "FineTuneJob",
            "metadata": {"name": trial_name(str(sweep.metadata.name), number)},
            "spec": trial_spec(spec, params, trial_output(spec, number)).to_wire(),
        }
    )


class SweepRunner:
    """Runs one FineTuneSweep through a :class:`LocalRunner` (which should not serve trials)."""

    def __init__(self, runner: LocalRunner, console: Console | None = None) -> None:
        self.runner = runner
        self.console = console or runner.console

    def run(self, sweep: FineTuneSweep) -> SweepOutcome:
        spec = sweep.spec
        trials: list[LocalTrial] = []
        while not study.exhausted(spec, [t.record() for t in trials]):
            if sum(t.state == TrialState.failed for t in trials) > spec.max_failed_trials:
                break
            trials.append(self._run_trial(sweep, trials))
            self.console.print(trials_table(spec, trials))
        return self._finish(sweep, trials)

    def _run_trial(self, sweep: FineTuneSweep, done: list[LocalTrial]) -> LocalTrial:
        spec = sweep.spec
        records = [t.record() for t in done]
        number = study.next_number(records)
        params = study.next_parameters(spec, records)
        job = trial_job(sweep, number, params)
        trial = LocalTrial(number, str(job.metadata.name), params, job.spec.output.uri)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.console.print(f"[bold]trial {number}[/]: {shown}", highlight=False)

        def watch(update: dict[str, Any]) -> None:
            step = update.get("step")
            trial.step = step if isinstance(step, int) else trial.step
            objective = objective_of(spec.objective.metric, update)
            trial.latest = objective if objective is not None else trial.latest
            seen = observe(trial.evaluations, trial.step, objective)
            if seen == trial.evaluations:
                return
            trial.evaluations = seen
            if trial.number in study.to_prune(spec, [*records, trial.record()]):
                raise TrialPruned(max(seen))

        try:
            outcome = self.runner.run(job, on_progress=watch)
        except TrialPruned as pruned:
            trial.state = TrialState.pruned
            self.console.print(
                f"[yellow]✂ trial {number} pruned at step {pruned.step}: {spec.objective.metric} "
                f"{trial.latest:.4g} is worse than the earlier trials' at this step; its checkpoints are "
                f"kept in {trial.output_uri}",
                highlight=False,
            )
            return trial
        trial.state = TrialState.complete if outcome.exit_code == 0 else TrialState.failed
        if trial.state == TrialState.complete and trial.latest is None:
            # Nothing to rank it by: the template never evaluates (no eval data?).
            self.console.print(f"[red]trial {number} reported no {spec.objective.metric}")
            trial.state = TrialState.failed
        return trial

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
        return SweepOutcome(0 if best else 1, trials, best, summary_uri, report_uri)


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
