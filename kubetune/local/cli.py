"""``kubetune run FILE.yaml``: the command line of local mode."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import ValidationError
from rich.console import Console

from kubetune.api import KINDS, CompressJob, FineTuneJob
from kubetune.errors import EXIT_INVALID_INPUT
from kubetune.local.runner import LocalRunner, RunOptions

DEFAULT_WORKDIR = Path(".kubetune/runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="manifest with FineTuneJob and/or CompressJob documents")
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


def load_jobs(path: Path, console: Console) -> list[FineTuneJob | CompressJob] | None:
    """The kubetune documents of ``path``, validated as the API server would; None on errors."""
    jobs: list[FineTuneJob | CompressJob] = []
    ok = True
    for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
            continue
        try:
            jobs.append(KINDS[doc["kind"]].model_validate(doc))
        except ValidationError as exc:
            ok = False
            for error in exc.errors():
                loc = ".".join(str(part) for part in error["loc"])
                field = (error.get("ctx") or {}).get("field")
                if field:
                    loc = f"{loc}.{field}"
                console.print(f"[red]{path}[{index}] {doc['kind']}: {loc}: {error['msg']}", highlight=False)
    if ok and not jobs:
        console.print(f"[red]{path}: no FineTuneJob or CompressJob documents found")
        return None
    return jobs if ok else None


def run(args: argparse.Namespace) -> int:
    console = Console()
    jobs = load_jobs(args.file, console)
    if jobs is None:
        return EXIT_INVALID_INPUT
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
    try:
        for job in jobs:
            outcome = runner.run(job)
            if outcome.exit_code != 0:
                return outcome.exit_code
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted: every process was stopped; run again to resume from the last checkpoint"
        )
        return 130
    return 0
