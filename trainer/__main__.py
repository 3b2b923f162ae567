"""Entry point of every workload container: ``python -m kubetune.trainer <command> ...``.

Each command lives in its own module and is imported only when chosen, so ``serve`` never pays
for DeepSpeed's import and ``validate`` can run on a small CPU pod.
"""

from __future__ import annotations

import importlib
import sys

from kubetune.run.sweep_summary import RUNTIME_SWEEP_SUMMARY
from kubetune.run.workloads import (
    RUNTIME_COMPRESS,
    RUNTIME_FINETUNE,
    RUNTIME_LAUNCH,
    RUNTIME_SERVE,
    RUNTIME_VALIDATE,
)

# The runtimes the workloads of kubetune.run.workloads name.
COMMANDS = {
    RUNTIME_LAUNCH: (
        "kubetune.trainer.launch",
        "torchrun that keeps the workers' exit-code contract (2, 3).",
    ),
    RUNTIME_FINETUNE: (
        "kubetune.trainer.finetune",
        "Fine-tune a model from a run plan (launched by torchrun).",
    ),
    RUNTIME_VALIDATE: (
        "kubetune.trainer.validate",
        "Check that a plan's model and data are reachable and well-formed.",
    ),
    RUNTIME_COMPRESS: ("kubetune.trainer.compress", "Quantize, prune or distill a model from a run plan."),
    RUNTIME_SERVE: ("kubetune.trainer.serve", "Serve a model over an OpenAI-compatible HTTP API."),
    RUNTIME_SWEEP_SUMMARY: (
        "kubetune.trainer.sweep_summary",
        "Log a finished FineTuneSweep's best trial to its MLflow run and end it.",
    ),
}


# The runtimes whose output is kept under <output>/logs/attempt-<N>/ (kubetune.run.logs); the
# launcher's own lines are in its workers' logs, and a server's are not an attempt's.
KEPT_LOGS = (RUNTIME_VALIDATE, RUNTIME_FINETUNE, RUNTIME_COMPRESS)


def usage() -> str:
    lines = ["usage: python -m kubetune.trainer <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Before the command imports torch, transformers and DeepSpeed: pod logs and local logs then
    # start with the runtime's own lines.
    from kubetune.trainer.quiet import silence_known_library_noise

    silence_known_library_noise()
    module = importlib.import_module(COMMANDS[command][0])
    if command not in KEPT_LOGS:
        result: int = module.main(rest)
        return result
    from kubetune.trainer.process_logs import kept_logs

    with kept_logs(command, rest):
        result = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
