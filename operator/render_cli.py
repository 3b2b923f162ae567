"""``kubetune render FILE.yaml``: print the children the operator would create, as YAML.

Like ``helm template``: for reviews in GitOps pipelines and for debugging. It runs the same pure
renderers as the operator, with the operator's settings from the environment
(``KUBETUNE_TRAINER_IMAGE``...). Documents of other kinds in the file are skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from kubetune.api import KINDS, CompressJob, FineTuneJob
from kubetune.api.validation import load_documents
from kubetune.errors import describe_validation_error
from kubetune.operator import admission, render
from kubetune.operator.settings import Settings, SettingsError
from kubetune.run.artifacts import AdapterOnlyUpstream
from kubetune.run.upstream import UpstreamNotFound, compress_model_uri

PHASES = ("all", "base", "validate", "train", "serve")


class RenderInputError(ValueError):
    """The input file cannot be rendered."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="YAML file with FineTuneJob/CompressJob documents ('-' reads stdin)")
    parser.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace of jobs that do not name one (default: default)",
    )
    parser.add_argument(
        "--phase",
        choices=PHASES,
        default="all",
        help="all: every child over the job's life (serving only with serve.enabled); base: plan and "
        "ServiceAccount; validate: the validation Job; train: the gang's rendezvous Service, status "
        "Role and RoleBinding and the training (or compression) Job; serve: the serving Deployment and Service",
    )
    parser.add_argument("--attempt", type=int, default=0, help="restart number of the rendered gang Job")
    parser.add_argument(
        "--model-uri",
        help="model of a CompressJob whose model.fromFineTuneJob is not in the file, or whose "
        "model.fromFineTuneSweep the operator would resolve (the sweep's best trial's model)",
    )


def load_jobs(documents: Iterable[Any], source: str) -> list[FineTuneJob | CompressJob]:
    jobs: list[FineTuneJob | CompressJob] = []
    for number, doc in enumerate(documents, start=1):
        if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
            continue
        try:
            jobs.append(KINDS[doc["kind"]].model_validate(doc))
        except ValidationError as exc:
            name = (doc.get("metadata") or {}).get("name", "?")
            problems = describe_validation_error(exc, limit=5)
            raise RenderInputError(
                f"{source}: document {number} ({doc['kind']} {name}): {problems}"
            ) from None
    return jobs


def resolve_model(job: CompressJob, jobs: list[FineTuneJob | CompressJob], model_uri: str | None) -> str:
    """The model a CompressJob compresses: its own, its upstream FineTuneJob's from the same file,
    else ``--model-uri``."""
    try:
        return compress_model_uri(job, [other for other in jobs if isinstance(other, FineTuneJob)])
    except AdapterOnlyUpstream as refusal:
        raise RenderInputError(f"CompressJob {job.metadata.name}: {refusal}") from None
    except UpstreamNotFound as missing:
        if model_uri:
            return model_uri
        if missing.kind == "FineTuneSweep":
            raise RenderInputError(
                f"CompressJob {job.metadata.name}: {missing.field} {missing.name!r} is resolved by the "
                "operator from the sweep's best trial; pass --model-uri URI to render it"
            ) from None
        raise RenderInputError(
            f"CompressJob {job.metadata.name}: {missing.field} {missing.name!r} is not in the input; "
            "add it to the file or pass --model-uri URI"
        ) from None


def render_job(
    job: FineTuneJob | CompressJob,
    settings: Settings,
    namespace: str,
    phase: str,
    attempt: int,
    model_uri: str | None,
) -> list[dict[str, Any]]:
    ns = render.job_namespace(job, namespace)
    if phase == "all":
        return render.render_all(job, settings, ns, model_uri=model_uri, attempt=attempt)
    if phase == "serve":
        return render.render_serving(job, settings, ns)
    plan = render.render_plan(job, settings, ns, model_uri)
    if phase == "base":
        return render.render_base(job, plan, ns)
    if phase == "validate":
        return [render.render_validation_job(job, settings, plan, ns)]
    return [*render.render_gang_support(job, ns), render.render_main_job(job, settings, plan, ns, attempt)]


def render_documents(
    text: str, args: argparse.Namespace, settings: Settings, source: str
) -> list[dict[str, Any]]:
    try:
        # Read as `kubetune validate` reads it: duplicate keys and alias bombs are refused.
        documents = load_documents(text)
    except yaml.YAMLError as exc:
        raise RenderInputError(f"{source}: not valid YAML: {exc}") from None
    jobs = load_jobs(documents, source)
    if not jobs:
        raise RenderInputError(f"{source}: no FineTuneJob or CompressJob documents")
    children: list[dict[str, Any]] = []
    for job in jobs:
        # What the operator refuses before creating anything, refused here too.
        problems = admission.child_problems(job)
        if images := admission.disallowed_images(job, settings):
            problems.append(admission.images_message(images, settings))
        if problems:
            raise RenderInputError(
                f"{source}: {type(job).kind_name} {job.metadata.name}: {'; '.join(problems)}"
            )
        model_uri = resolve_model(job, jobs, args.model_uri) if isinstance(job, CompressJob) else None
        children += render_job(job, settings, args.namespace, args.phase, args.attempt, model_uri)
    return children


def run(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    try:
        settings = Settings.from_env()
        if args.file == "-":
            text, source = sys.stdin.read(), "<stdin>"
        else:
            with open(args.file, encoding="utf-8") as handle:
                text, source = handle.read(), args.file
        children = render_documents(text, args, settings, source)
    except (RenderInputError, render.RenderError, SettingsError, OSError) as exc:
        print(f"kubetune render: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump_all(children, out, sort_keys=False, default_flow_style=False, width=1000)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune render", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
