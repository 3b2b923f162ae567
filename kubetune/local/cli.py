"""``kubetune run FILE.yaml``: the command line of local mode."""

from __future__ import annotations

import argparse
import dataclasses
import signal
from pathlib import Path

from rich.console import Console

from kubetune.api.sweep import FineTuneSweep
from kubetune.api.validation import load_resources
from kubetune.local import processes
from kubetune.local.runner import LocalRunner, RunOptions
from kubetune.local.sweep import SweepRunner, trial_job

DEFAULT_WORKDIR = Path(".kubetune/runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", type=Path, help="manifest with FineTuneJob, CompressJob and/or FineTuneSweep documents"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="plans, logs and scratch space")
    parser.add_argument(
        "--no-serve", action="store_true", help="do not serve the result even if spec.serve is on"
    )
    parser.add_argument(
        "--exit-after-serve-check",
        "--detach",
        dest="exit_after_serve_check",
        action="store_true",
        help="start the server, send one example request, print the answer and exit (for scripts)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port of the local server (default: a free one)"
    )
    parser.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], default="auto")


def run(args: argparse.Namespace) -> int:
    console = Console()
    # Raises InvalidInputError listing every problem (file:line, field path, what is allowed);
    # the CLI prints it and exits with code 2, exactly like `kubetune validate`.
    resources = load_resources(args.file)
    runner = LocalRunner(
        RunOptions(
            workdir=args.workdir.resolve(),
            serve=not args.no_serve,
            exit_after_serve_check=args.exit_after_serve_check,
            port=args.port,
            accelerator=args.accelerator,
        ),
        console,
    )
    # Trials are compared, not served: a sweep's promote serves the best one (through `runner`).
    trial_runner = LocalRunner(dataclasses.replace(runner.options, serve=False), console)
    try:
        with processes.stop_on_termination():
            for resource in resources:
                if isinstance(resource, FineTuneSweep):
                    outcome = SweepRunner(trial_runner, console, server=runner).run(resource)
                    code = outcome.exit_code
                    if outcome.best is not None:
                        # A CompressJob later in the file may compress the winner (fromFineTuneSweep).
                        winner = trial_job(resource, outcome.best.number, outcome.best.params)
                        runner.sweep_winners[str(resource.metadata.name)] = winner
                else:
                    code = runner.run(resource).exit_code
                if code != 0:
                    return code
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, processes.Terminated) else signal.SIGINT
        console.print(
            f"[yellow]{signal.Signals(signum).name}: every process was stopped; run again to resume "
            "from the last checkpoint"
        )
        return 128 + signum
    return 0
