"""The ``serve`` command line (kubetune.trainer.serve)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.trainer.serve import build_parser, cpu_budget

pytestmark = pytest.mark.unit


def test_defaults_match_the_documented_contract() -> None:
    args = build_parser().parse_args(["--model", "s3://bucket/run/model"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert (args.max_batch_size, args.max_queue, args.max_tokens_limit) == (16, 256, 1024)
    assert args.max_prompt_tokens is None
    assert (args.max_request_bytes, args.max_request_tokens) == (8 * 1024 * 1024, None)
    assert (args.device, args.dtype, args.grace_period) == ("auto", "auto", 25.0)
    assert args.adapter is None
    assert isinstance(args.scratch_dir, Path)


@pytest.mark.parametrize(
    "flag", ["--max-batch-size", "--max-queue", "--max-tokens-limit", "--threads", "--max-request-bytes"]
)
def test_counts_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--model", "m", flag, "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_model_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
    assert "--model" in capsys.readouterr().err


def test_cpu_budget_never_exceeds_the_cpus_this_process_may_run_on() -> None:
    assert 1 <= cpu_budget() <= len(os.sched_getaffinity(0))
