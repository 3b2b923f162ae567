"""Unusable input ends the fine-tuning process with the exit-code contract and a message that names
the problem (the data teammate's tests cover malformed data; these cover the model and the output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_finetune_support import run_single, tiny_causal_lm, write_plan

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_model_directory_without_weights_is_invalid_input(tmp_path: Path) -> None:
    base, data = tiny_causal_lm(tmp_path)
    (base / "model.safetensors").unlink()
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=data.as_uri(),
        output_uri=(tmp_path / "out").as_uri(),
        processes=1,
    )

    result = run_single(plan, tmp_path)

    assert result.returncode == 2, result.stderr[-3000:]
    assert f"model {base.as_uri()}: cannot load it for causal-lm" in result.stderr
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith("InvalidInput: model ")


def test_a_missing_model_is_a_storage_error(tmp_path: Path) -> None:
    _, data = tiny_causal_lm(tmp_path)
    missing = (tmp_path / "no-such-model").as_uri()
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=missing,
        train_uri=data.as_uri(),
        output_uri=(tmp_path / "out").as_uri(),
        processes=1,
    )

    result = run_single(plan, tmp_path)

    assert result.returncode == 3, result.stderr[-3000:]
    assert "no-such-model" in (tmp_path / "termination-log").read_text()


def test_an_output_prefix_of_another_job_is_never_overwritten(tmp_path: Path) -> None:
    base, data = tiny_causal_lm(tmp_path)
    output = tmp_path / "out"
    (output / "model").mkdir(parents=True)
    (output / "model" / "model.safetensors").write_bytes(b"someone else's weights")
    record = {"job": {"namespace": "team-a", "name": "their-job", "uid": "uid-a"}, "status": "succeeded"}
    (output / "run.json").write_text(json.dumps(record))
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=base.as_uri(),
        train_uri=data.as_uri(),
        output_uri=output.as_uri(),
        processes=1,
    )

    result = run_single(plan, tmp_path)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds the outputs of job team-a/their-job (uid uid-a)" in result.stderr
    assert (tmp_path / "termination-log").read_text().startswith("OutputConflict: ")
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
    assert (output / "model" / "model.safetensors").read_bytes() == b"someone else's weights"
