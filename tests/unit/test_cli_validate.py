"""`kubetune validate FILE...`: offline validation for pre-commit hooks and CI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kubetune.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))

ZERO_STAGE_7 = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: bad-zero
spec:
  model:
    uri: s3://models/base
  dataset:
    train:
      uri: s3://data/train.jsonl
  hyperparameters:
    maxSteps: 10
  deepspeed:
    zeroStage: 7
  output:
    uri: s3://runs/bad-zero
"""

TWO_DOCUMENTS = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: unrelated
---
apiVersion: kubetune.io/v1alpha1
kind: CompressJob
metadata:
  name: no-steps
spec:
  model:
    fromFineTuneJob: llama
  dataset:
    train:
      uri: s3://data/train.jsonl
  output:
    uri: s3://runs/no-steps
---
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_shipped_example_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    assert "0 invalid" in out
    assert "Secret/s3-credentials (document 1): skipped (not a kubetune kind: v1/Secret)" in out


def test_zero_stage_7_fails_naming_the_field_line_and_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ZERO_STAGE_7)
    assert main(["validate", path]) == 1
    out = capsys.readouterr().out
    assert (
        f"{path}:14: FineTuneJob/bad-zero (document 1): spec.deepspeed.zeroStage: 7 is out of range; "
        "allowed: an integer from 0 to 3"
    ) in out
    assert "0 valid, 1 invalid, 0 skipped" in out


def test_cross_field_rule_is_reported_at_its_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, TWO_DOCUMENTS)
    assert main(["validate", "--quiet", path]) == 1
    out = capsys.readouterr().out
    assert out == (
        f"{path}:10: CompressJob/no-steps (document 2): spec.quantization: set at least one compression "
        "step: distillation, pruning or quantization\n"
    )


def test_strict_turns_foreign_documents_into_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, TWO_DOCUMENTS.split("---")[0])
    assert main(["validate", path]) == 0
    assert main(["validate", "--strict", path]) == 1
    assert "not a kubetune document (v1/ConfigMap)" in capsys.readouterr().out


def test_json_output_for_machines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, TWO_DOCUMENTS)
    assert main(["validate", "--output", "json", path]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    skipped, invalid = report["documents"]
    assert (skipped["status"], skipped["kind"]) == ("skipped", "ConfigMap")
    assert invalid["name"] == "no-steps"
    assert invalid["index"] == 2
    assert invalid["errors"] == [
        {
            "path": "spec.quantization",
            "message": "set at least one compression step: distillation, pruning or quantization",
            "allowed": None,
            "line": 10,
            "type": "cel_rule",
        }
    ]


def test_reads_standard_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(ZERO_STAGE_7))
    assert main(["validate", "-"]) == 1
    assert (
        "<stdin>:14: FineTuneJob/bad-zero (document 1): spec.deepspeed.zeroStage" in capsys.readouterr().out
    )


def test_unknown_version_of_our_group_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ZERO_STAGE_7.replace("v1alpha1", "v1beta1").replace("FineTuneJob", "TrainJob"))
    assert main(["validate", "-q", path]) == 1
    out = capsys.readouterr().out
    assert "apiVersion: 'kubetune.io/v1beta1' is not served by kubetune; allowed: kubetune.io/v1alpha1" in out
    assert "kind: 'TrainJob' is not a kubetune kind; allowed: FineTuneJob or CompressJob" in out


def test_yaml_syntax_error_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "apiVersion: kubetune.io/v1alpha1\nkind: [FineTuneJob\n")
    assert main(["validate", path]) == 1
    assert f"{path}:3: not valid YAML" in capsys.readouterr().out


def test_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 1
    assert "absent.yaml: cannot read file: No such file or directory" in capsys.readouterr().out


def test_unknown_field_line_points_at_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ZERO_STAGE_7.replace("    zeroStage: 7", "    zeroStage: 1\n    stage3: true"))
    assert main(["validate", "-q", path]) == 1
    assert f"{path}:15: FineTuneJob/bad-zero (document 1): spec.deepspeed.stage3: unknown field" in (
        capsys.readouterr().out
    )


def test_version_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == "kubetune 0.1.0 (API kubetune.io/v1alpha1)\n"


def test_no_command_prints_usage() -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
