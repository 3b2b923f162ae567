"""``python -m kubetune.trainer launch [torchrun options] -m kubetune.trainer finetune ...``

torchrun, keeping the exit-code contract. torchrun itself exits 1 whenever a worker fails, so
a worker's 2 (invalid input) or 3 (storage) would look retriable to the pod failure policy and
the operator. This runs torchrun's own launcher in-process and exits with the contract code of
the failed workers when there is one (invalid input before storage), else with torchrun's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from kubetune.errors import NON_RETRIABLE_EXIT_CODES


def gang_exit_code(worker_exit_codes: Iterable[int]) -> int:
    """The pod's exit code for a gang whose workers exited with these codes."""
    codes = [c for c in worker_exit_codes if c != 0]
    if not codes:
        return 0
    for contract in NON_RETRIABLE_EXIT_CODES:  # invalid input first, then storage
        if contract in codes:
            return contract
    # Everything else is retriable; a worker killed by a signal reports a negative code.
    return next((c for c in codes if c > 0), 1)


def keep_killed_workers_logs(argv: list[str]) -> None:
    """A worker killed outright (the OOM killer's SIGKILL) could not keep its own log: keep what
    its copy holds (:mod:`kubetune.trainer.process_logs`)."""
    from pathlib import Path

    from kubetune.trainer.process_logs import keep_leftovers, plan_argument

    plan = plan_argument(argv)
    if plan is not None and Path(plan).is_file():
        for uri in keep_leftovers(Path(plan)):
            print(f"kubetune launch: kept a killed worker's log at {uri}", file=sys.stderr)


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)  # type: ignore[no-untyped-call]
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as e:
        code = gang_exit_code(failure.exitcode for failure in e.failures.values())
        print(f"kubetune launch: workers failed ({e.name}); exiting with {code}", file=sys.stderr)
        keep_killed_workers_logs(argv)
        return code
    return 0
