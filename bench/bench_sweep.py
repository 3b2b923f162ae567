"""What early stopping saves a FineTuneSweep, and what a sweep costs each trial before it trains.

Runs local-mode sweeps (``kubetune run``'s :class:`~kubetune.local.sweep.SweepRunner`, trials as
local FineTuneJobs, one process each) of the quickstart's tiny causal LM, where the learning rate
decides the evaluation loss:

- **trial-steps**: the same sweep (random sampler, same seed, so the same trials in the same
  order) without early stopping and with each pruner asked for; the steps all its trials ran,
  and its best objective, which should be the unpruned sweep's (the pruners stop trials that are
  worse than others, and the winner is not among them);
- **overhead per trial**: seconds from a trial's creation to its first optimizer step, against
  the same FineTuneJob run alone by a :class:`~kubetune.local.runner.LocalRunner` (from the
  call to its first step), so the ratio is what the sweep adds around its trials.

    .venv/bin/python bench/bench_sweep.py [--trials 8] [--steps 12] [--seed 3] \\
        [--pruners median,successiveHalving]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from kubetune.api import FineTuneJob  # noqa: E402
from kubetune.api.sweep import FineTuneSweep  # noqa: E402
from kubetune.local.quickstart import prepare  # noqa: E402
from kubetune.local.runner import LocalRunner, RunOptions  # noqa: E402
from kubetune.local.sweep import SweepRunner  # noqa: E402

PRUNERS: dict[str, dict[str, Any]] = {
    "none": {"type": "none"},
    "median": {"type": "median", "startupTrials": 2, "warmupSteps": 0},
    # Rungs at steps 3, 9, ...: a trial goes on while it is in the best third of those that
    # reached the rung before it.
    "successiveHalving": {"type": "successiveHalving", "minResource": 3, "reductionFactor": 3},
}


def template(root: Path, model: Path, data: Path, steps: int) -> dict[str, Any]:
    return {
        "model": {"uri": model.as_uri()},
        "dataset": {"train": {"uri": data.as_uri()}, "evalFraction": 0.1, "format": "text"},
        "method": {"type": "full"},
        "hyperparameters": {
            "maxSteps": steps,
            "learningRate": 1e-5,
            "perDeviceBatchSize": 4,
            "maxSeqLength": 64,
            "evalEverySteps": 3,
            "loggingEverySteps": 3,
            "precision": "fp32",
        },
        "resources": {"workers": 1, "processesPerWorker": 1},
        "checkpoint": {"everySteps": 1000},
        "output": {"uri": (root / "out").as_uri()},
    }


def first_step_clock() -> tuple[dict[str, float], Callable[[str], Callable[[dict[str, Any]], None]]]:
    """When each job first reported a step (wall clock), and a hook factory that records it."""
    seen: dict[str, float] = {}
    lock = threading.Lock()

    def hook_for(name: str) -> Callable[[dict[str, Any]], None]:
        def hook(update: dict[str, Any]) -> None:
            step = update.get("step")
            if isinstance(step, int) and step >= 1:
                with lock:
                    seen.setdefault(name, time.time())

        return hook

    return seen, hook_for


class TimedSweepRunner(SweepRunner):
    """A SweepRunner that also notes when each trial first reports a step (its own hook still
    decides pruning, called first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_step, self._hook_for = first_step_clock()

    def _outcome(self, runner: LocalRunner, job: FineTuneJob, watch: Any) -> Any:
        clock = self._hook_for(str(job.metadata.name))

        def both(update: dict[str, Any]) -> None:
            clock(update)
            watch(update)

        return super()._outcome(runner, job, both)


def run_sweep(
    root: Path, base: dict[str, Any], pruner: str, trials: int, seed: int
) -> tuple[dict[str, Any], dict[str, float]]:
    out = root / f"sweep-{pruner}"
    spec = {
        "template": base | {"output": {"uri": out.as_uri()}},
        "parameters": [
            {"path": "hyperparameters.learningRate", "type": "float", "min": 1e-5, "max": 5e-2, "log": True}
        ],
        "objective": {"metric": "eval_loss", "direction": "minimize"},
        # Random: the trials do not depend on the others' results, so every variant runs the
        # same trials and only early stopping differs.
        "algorithm": {"type": "random", "seed": seed},
        "maxTrials": trials,
        "earlyStopping": PRUNERS[pruner],
    }
    sweep = FineTuneSweep.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneSweep",
            "metadata": {"name": "lr"},
            "spec": spec,
        }
    )
    options = RunOptions(workdir=root / f"work-{pruner}", serve=False, accelerator="cpu")
    quiet = Console(file=(root / f"sweep-{pruner}.log").open("w"), width=120)
    runner = TimedSweepRunner(LocalRunner(options, quiet), quiet, cores=1)
    runner.run(sweep)
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    overheads = {}
    for t in summary["trials"]:
        first = runner.first_step.get(t["name"])
        if first is not None and t["startTime"]:
            overheads[t["name"]] = first - datetime.fromisoformat(t["startTime"]).timestamp()
    return summary, overheads


def alone(root: Path, base: dict[str, Any], repeats: int) -> list[float]:
    """Seconds from LocalRunner.run to the first step of the template run as a FineTuneJob."""
    times = []
    for n in range(repeats):
        job = FineTuneJob.model_validate(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": f"alone-{n}"},
                "spec": base | {"output": {"uri": (root / f"alone-{n}").as_uri()}},
            }
        )
        seen, hook_for = first_step_clock()
        options = RunOptions(workdir=root / "work-alone", serve=False, accelerator="cpu")
        runner = LocalRunner(options, Console(file=(root / f"alone-{n}.log").open("w"), width=120))
        start = time.time()
        outcome = runner.run(job, hook_for(job.metadata.name))
        assert outcome.exit_code == 0, f"the FineTuneJob alone failed: {root / f'alone-{n}.log'}"
        times.append(seen[str(job.metadata.name)] - start)
    return times


def steps_of(summary: dict[str, Any]) -> int:
    return sum(t["step"] or 0 for t in summary["trials"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--pruners", default="median,successiveHalving")
    parser.add_argument("--alone", type=int, default=2, help="runs of the FineTuneJob alone")
    args = parser.parse_args()
    pruners = [p for p in args.pruners.split(",") if p]
    unknown = set(pruners) - set(PRUNERS)
    if unknown:
        parser.error(f"--pruners: unknown {sorted(unknown)}; known: {sorted(PRUNERS)}")

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        model, data = prepare(root / "quickstart")
        base = template(root, model, data, args.steps)
        began = time.time()
        print(
            f"{args.trials} trials of {args.steps} steps, random sampler seed {args.seed}, tiny causal LM, CPU",
            flush=True,
        )
        baseline_alone = alone(root, base, args.alone)
        alone_s = statistics.median(baseline_alone)
        print(f"a FineTuneJob alone: {alone_s:.2f} s from its run to its first step", flush=True)
        print(f"{'early stopping':<18} {'trial-steps':>11} {'fewer':>7} {'pruned':>6} {'best eval_loss':>15}")
        in_sweep: list[float] = []
        reference: dict[str, Any] = {}
        for name in ["none", *pruners]:
            summary, overheads = run_sweep(root, base, name, args.trials, args.seed)
            in_sweep += overheads.values()
            reference = reference or summary
            ref_steps, ref_best = steps_of(reference), reference["bestTrial"]["objective"]
            steps = steps_of(summary)
            pruned = sum(t["state"] == "Pruned" for t in summary["trials"])
            best = summary["bestTrial"]["objective"] if summary["bestTrial"] else float("nan")
            same = "same as none" if best == ref_best else f"none: {ref_best:.6g}"
            print(
                f"{name:<18} {steps:>11} {1 - steps / ref_steps:>7.0%} {pruned:>6} {best:>15.6g}  ({same})",
                flush=True,
            )
        sweep_s = statistics.median(in_sweep)
        print(
            f"creation to first step: in a sweep {sweep_s:.2f} s (median of {len(in_sweep)} trials), "
            f"a FineTuneJob alone {alone_s:.2f} s (median of {len(baseline_alone)}); "
            f"ratio {sweep_s / alone_s:.2f}, overhead {sweep_s - alone_s:+.2f} s per trial"
        )
        print(f"wall time {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
