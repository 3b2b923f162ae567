"""The ``kubetune`` command line.

Every subcommand is a module exposing two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...          # the exit status

and one line in :data:`COMMANDS` naming that module. A command's module is imported only when the
command runs (or its ``--help`` is asked for), so ``kubetune validate`` never pays for torch, kopf
or boto3, and a command whose extra is not installed fails with a clear message instead of
breaking every other command. ``run`` returns an exit status; it raises
:class:`kubetune.errors.KubetuneError` for failures with a defined exit code, which ``main``
prints as one line.

Small commands about the API itself (``crds``, ``validate``, ``version``) live in this module
as classes with the same two functions.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubetune import __version__
from kubetune.errors import KubetuneError


class CommandModule(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


@dataclass(frozen=True)
class Command:
    help: str
    module: str
    """Module (or ``module:Class``) exposing ``add_arguments`` and ``run``."""

    def load(self) -> CommandModule:
        module_name, _, attribute = self.module.partition(":")
        module = importlib.import_module(module_name)
        loaded: CommandModule = getattr(module, attribute) if attribute else module
        return loaded


COMMANDS: dict[str, Command] = {
    "run": Command("run a FineTuneJob or CompressJob on this machine (local mode)", "kubetune.local.cli"),
    "quickstart-data": Command(
        "write the quickstart's tiny base model and dataset to a local store", "kubetune.local.quickstart"
    ),
    "logs": Command(
        "the process logs of a job's attempt: from its pods while they exist, then from its output",
        "kubetune.logs_command",
    ),
    "plan": Command(
        "the memory plan of each fine-tuning job in a file, and whether it fits its GPUs and limits",
        "kubetune.plan_command",
    ),
    "validate": Command(
        "validate kubetune manifests offline, as the API server would", "kubetune.cli:Validate"
    ),
    "render": Command(
        "print the Kubernetes objects the operator creates for a job", "kubetune.operator.render_cli"
    ),
    "operator": Command("run the kubetune operator (kopf)", "kubetune.operator.cli"),
    "crds": Command("generate the CustomResourceDefinitions from the API models", "kubetune.cli:Crds"),
    "docs": Command("write docs/reference.md from the API models", "kubetune.api.reference"),
    "version": Command("print the kubetune and API versions", "kubetune.cli:Version"),
}


class Version:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        del parser

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from kubetune.api import API_VERSION

        print(f"kubetune {__version__} (API {API_VERSION})")
        return 0


class Validate:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Check FineTuneJob and CompressJob documents with the same rules as the CRDs "
            "(types, enums, ranges, URI schemes and the CEL cross-field rules). Exits 1 when any "
            "document is invalid."
        )
        parser.add_argument(
            "files", nargs="+", metavar="FILE", help="YAML files, multi-document; - for stdin"
        )
        parser.add_argument(
            "--strict",
            action="store_true",
            help="treat documents of other APIs as errors instead of skipping them",
        )
        parser.add_argument("--output", "-o", choices=["text", "json"], default="text", help="output format")
        parser.add_argument("--quiet", "-q", action="store_true", help="print errors only (text output)")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from kubetune.api.validation import format_reports, reports_to_json, validate_paths

        reports = validate_paths(args.files, strict=args.strict)
        if args.output == "json":
            print(json.dumps(reports_to_json(reports), indent=2))
        else:
            sys.stdout.write(format_reports(reports, quiet=args.quiet))
        return 1 if any(r.status == "invalid" for r in reports) else 0


class Crds:
    # One generator for every copy, so kustomize's and Helm's CRDs never drift from the models.
    DEFAULT_OUT = ("crds", "manifests/crds", "charts/kubetune/crds")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Write the CRDs generated from kubetune.api. By default they go to crds/, "
            "manifests/crds/ (which kustomize builds) and charts/kubetune/crds/ (which Helm "
            "installs), relative to the current directory."
        )
        parser.add_argument(
            "--out",
            action="append",
            metavar="DIR",
            help="output directory (repeatable; default: crds, manifests/crds and charts/kubetune/crds)",
        )
        parser.add_argument(
            "--check", action="store_true", help="write nothing; exit 1 with a diff when the files differ"
        )
        parser.add_argument("--stdout", action="store_true", help="print the CRDs as one YAML stream instead")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from kubetune.api import GROUP
        from kubetune.api.crd import render_crds

        rendered = render_crds()
        if args.stdout:
            sys.stdout.write("---\n".join(rendered.values()))
            return 0
        drift = False
        for out in [Path(d) for d in (args.out or Crds.DEFAULT_OUT)]:
            # Files of kinds that no longer exist are stale too.
            stale = sorted(p.name for p in out.glob(f"*.{GROUP}.yaml") if p.name not in rendered)
            if args.check:
                for name, text in rendered.items():
                    path = out / name
                    current = path.read_text() if path.exists() else ""
                    if current != text:
                        drift = True
                        sys.stdout.writelines(
                            difflib.unified_diff(
                                current.splitlines(keepends=True),
                                text.splitlines(keepends=True),
                                fromfile=str(path),
                                tofile=f"{path} (generated)",
                            )
                        )
                for name in stale:
                    drift = True
                    print(f"{out / name}: not generated from the models any more; delete it")
                continue
            out.mkdir(parents=True, exist_ok=True)
            for name, text in rendered.items():
                (out / name).write_text(text)
            for name in stale:
                (out / name).unlink()
            print(f"wrote {', '.join(str(out / n) for n in rendered)}")
        if drift:
            print(
                "CRDs differ from the API models; run `kubetune crds` (or `make crds`) and commit",
                file=sys.stderr,
            )
            return 1
        return 0


def build_parser(command: str | None = None, module: CommandModule | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module adds its arguments (the others are listed
    without being imported)."""
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Kubernetes-native fine-tuning and model compression.",
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            (module or spec.load()).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    if command not in COMMANDS:
        # No or an unknown command: argparse prints the usage and exits 2.
        build_parser().parse_args(args_list)
        return 2
    try:
        module = COMMANDS[command].load()
    except ImportError as exc:
        hint = (
            ""
            if (exc.name or "").startswith("kubetune")
            else "; install the extra it needs, e.g. pip install 'kubetune[operator]' or 'kubetune[trainer]'"
        )
        print(f"kubetune {command}: not available in this installation ({exc}){hint}", file=sys.stderr)
        return 2
    args = build_parser(command, module).parse_args(args_list)
    try:
        return module.run(args)
    except KubetuneError as exc:
        print(f"kubetune {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
