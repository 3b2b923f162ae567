"""The pre-flight validation step: ``python -m kubetune.trainer validate --plan PLAN``.

Run as the operator's validation Job runs it (a subprocess) on good and bad plans over file:// and
the S3 test server: the exit code says ok (0), invalid input (2) or missing storage (3), and the
report lists every problem, not only the first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.resources import FineTuneJob
from kubetune.errors import InvalidInputError, RetriableError, StorageAccessError
from kubetune.run.plan import plan_finetune
from kubetune.trainer import validate
from kubetune.trainer.runtime import run_main
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus
from tests.s3server import S3Bucket
from tests.tinymodels import build_tiny_classifier

pytestmark = pytest.mark.integration

LABELS = ["negative", "neutral", "positive"]
CLASSIFICATION = {"type": "sequence-classification", "numLabels": 3, "labels": LABELS}


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("causal") / "model", sample_corpus(300))


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_classifier(
        tmp_path_factory.mktemp("classifier") / "model", sample_corpus(300), 3, labels=LABELS
    )


def write_plan(
    path: Path,
    *,
    model: str,
    train: str,
    fmt: str = "text",
    task: dict[str, Any] | None = None,
    eval_uri: str | None = None,
    eval_fraction: float | None = None,
    max_seq_length: int = 32,
) -> Path:
    dataset: dict[str, Any] = {"train": {"uri": train}, "format": fmt}
    if eval_uri is not None:
        dataset["eval"] = {"uri": eval_uri}
    if eval_fraction is not None:
        dataset["evalFraction"] = eval_fraction
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "preflight", "namespace": "ml"},
            "spec": {
                "model": {"uri": model},
                "task": task or {"type": "causal-lm"},
                "dataset": dataset,
                "output": {"uri": "file:///unused/output"},
                "hyperparameters": {"epochs": 1, "maxSeqLength": max_seq_length, "perDeviceBatchSize": 4},
            },
        }
    )
    path.write_text(plan_finetune(job).to_json())
    return path


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f"file://{path}"


def texts(count: int) -> list[dict[str, str]]:
    lines = sample_corpus(count)
    return [{"text": line} for line in lines]


def run_validate(plan: Path, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    """Run the step as a pod does; returns (exit code, stdout, termination message)."""
    termination = tmp_path / "termination-log"
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(termination), "KUBETUNE_SCRATCH_DIR": str(tmp_path)}
    # cwd outside the checkout, so the installed package is what runs (as in the image).
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "validate", "--plan", str(plan), *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = termination.read_text() if termination.exists() else ""
    return result.returncode, result.stdout, message


# --- as a subprocess ------------------------------------------------------------------------------


def test_a_good_plan_passes_with_a_length_summary(tmp_path: Path, causal_model: Path) -> None:
    train = write_jsonl(tmp_path / "data" / "train.jsonl", texts(40))
    plan = write_plan(tmp_path / "plan.json", model=f"file://{causal_model}", train=train, eval_fraction=0.1)

    code, out, message = run_validate(plan, tmp_path)

    assert code == 0, out
    assert ": OK" in out
    assert "llama (LlamaForCausalLM); 1 weight file(s)" in out
    assert "36 usable" in out  # 40 records, 4 held out for evaluation
    assert "longer than maxSeqLength 32 (truncated)" in out
    assert message == "validation passed: model and data are usable (36 training records)\n"


def test_bad_data_reports_every_problem_and_exits_2(tmp_path: Path, classifier_model: Path) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "good", "label": "positive"},
            '{"text": "broken", "label": ',
            {"body": "no text field", "label": "negative"},
            {"text": "odd label", "label": "angry"},
            {"text": "good", "label": 1},
            {"text": "id out of range", "label": 7},
        ],
    )
    plan = write_plan(
        tmp_path / "plan.json",
        model=f"file://{classifier_model}",
        train=train,
        fmt="classification",
        task=CLASSIFICATION,
        eval_fraction=0.2,
    )

    code, out, message = run_validate(plan, tmp_path)

    assert code == 2, out
    assert f"{train}:2: malformed JSON" in out
    assert f"{train}:3: field 'text' is missing (the record has: body, label)" in out
    assert f"{train}:4: unknown label 'angry'; allowed: 'negative', 'neutral', 'positive'" in out
    assert f"{train}:6: unknown label 7" in out
    assert "problems (4):" in out
    assert message.startswith(f"validation failed with 4 problems: {train}:2: malformed JSON")
    assert message.count("\n") == 1


def test_a_missing_model_exits_3_and_still_checks_the_data(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"txt": "not fine"}])
    plan = write_plan(tmp_path / "plan.json", model=f"file://{tmp_path}/no-such-model", train=train)

    code, out, message = run_validate(plan, tmp_path, "--json")

    assert code == 3
    report = json.loads(out)
    assert report["exit_code"] == 3
    assert [p["kind"] for p in report["problems"]] == ["model", "missing-field"]
    assert report["problems"][0]["message"].startswith(
        f"model.uri file://{tmp_path}/no-such-model: no objects"
    )
    assert report["problems"][0]["storage"] is True
    assert "no-such-model" in message


def test_a_good_plan_on_s3_passes(tmp_path: Path, causal_model: Path, s3_bucket: S3Bucket) -> None:
    client = s3_bucket.client()
    for file in causal_model.iterdir():
        client.upload_file(str(file), s3_bucket.name, f"models/tiny/{file.name}")
    for name, rows in (("part-0.jsonl", texts(20)), ("part-1.jsonl", texts(30)[20:])):
        body = "".join(json.dumps(r) + "\n" for r in rows)
        client.put_object(Bucket=s3_bucket.name, Key=f"data/train/{name}", Body=body.encode())
    client.put_object(Bucket=s3_bucket.name, Key="data/eval.jsonl", Body=b'{"text": "held out"}\n')
    plan = write_plan(
        tmp_path / "plan.json",
        model=f"{s3_bucket.uri}/models/tiny",
        train=f"{s3_bucket.uri}/data/train/",
        eval_uri=f"{s3_bucket.uri}/data/eval.jsonl",
    )

    code, out, _ = run_validate(plan, tmp_path)  # the fixture put the endpoint in the environment

    assert code == 0, out
    assert f"train  {s3_bucket.uri}/data/train/" in out
    assert "2 file(s), 30 records read, 30 usable" in out
    assert "1 file(s), 1 records read, 1 usable" in out


# --- in process (same code, cheaper) ------------------------------------------------------------


def run_in_process(plan: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = validate.main(["--plan", str(plan), "--json"])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, report


def messages(report: dict[str, Any]) -> list[str]:
    return [p["message"] for p in report["problems"]]


def test_missing_data_on_s3_exits_3(
    tmp_path: Path, causal_model: Path, s3_bucket: S3Bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(
        tmp_path / "plan.json", model=f"file://{causal_model}", train=f"{s3_bucket.uri}/data/missing.jsonl"
    )
    code, report = run_in_process(plan, capsys)
    assert code == 3
    assert messages(report) == [
        f"{s3_bucket.uri}/data/missing.jsonl: no such data file, and no data files under it as a prefix"
    ]


def test_a_model_without_weights_is_invalid(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(causal_model, model, ignore=shutil.ignore_patterns("*.safetensors"))
    train = write_jsonl(tmp_path / "train.jsonl", texts(4))
    code, report = run_in_process(
        write_plan(tmp_path / "plan.json", model=f"file://{model}", train=train), capsys
    )
    assert code == 2
    [problem] = messages(report)
    assert problem.startswith(f"model.uri file://{model}: no weight files (*.safetensors or *.bin) found")


def test_a_weight_index_naming_missing_shards_is_invalid(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(causal_model, model)
    index = {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    train = write_jsonl(tmp_path / "train.jsonl", texts(4))
    code, report = run_in_process(
        write_plan(tmp_path / "plan.json", model=f"file://{model}", train=train), capsys
    )
    assert code == 2
    assert messages(report) == [
        f"model.uri file://{model}: model.safetensors.index.json names 1 shard(s) that are not there: "
        "model-00002-of-00002.safetensors"
    ]


def test_a_classification_head_with_another_label_count_is_invalid(
    tmp_path: Path, classifier_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "yes", "label": 1}, {"text": "no", "label": 0}])
    task = {"type": "sequence-classification", "numLabels": 2}
    plan = write_plan(
        tmp_path / "plan.json",
        model=f"file://{classifier_model}",
        train=train,
        fmt="classification",
        task=task,
    )
    code, report = run_in_process(plan, capsys)
    assert code == 2
    assert any(
        "already has a classification head with 3 labels but task.numLabels is 2" in m
        for m in messages(report)
    )


def test_chat_data_needs_a_tokenizer_with_a_chat_template(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(causal_model, model, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": conversation}])
    plan = write_plan(tmp_path / "plan.json", model=f"file://{model}", train=train, fmt="chat")
    code, report = run_in_process(plan, capsys)
    assert code == 2
    assert any("dataset.format chat needs a tokenizer with a chat template" in m for m in messages(report))


def test_an_empty_eval_file_is_invalid(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", texts(4))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [])
    plan = write_plan(
        tmp_path / "plan.json", model=f"file://{causal_model}", train=train, eval_uri=evaluation
    )
    code, report = run_in_process(plan, capsys)
    assert code == 2
    assert messages(report) == [f"dataset.eval {evaluation} has no records (files: {evaluation})"]


def test_problems_are_capped_per_kind_but_all_counted(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ["{oops"] * 70 + [json.dumps({"text": "fine"})])
    code, report = run_in_process(
        write_plan(tmp_path / "plan.json", model=f"file://{causal_model}", train=train), capsys
    )
    assert code == 2
    assert report["problem_counts"] == {"malformed-record": 70}
    assert len(report["problems"]) == validate.PROBLEMS_PER_KIND
    text = validate.render_text(
        validate.Report(**{**report, "model": None, "train": None, "eval": None, "memory": None})
    )
    assert "... and 20 more" in text


def test_sequences_longer_than_the_models_positions_are_invalid(
    tmp_path: Path, causal_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny model has 256 positions; its tokenizer declares no limit of its own.
    model = tmp_path / "model"
    shutil.copytree(causal_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(sample_corpus(60))}, {"text": "short"}])
    plan = write_plan(tmp_path / "plan.json", model=f"file://{model}", train=train, max_seq_length=1024)
    code, report = run_in_process(plan, capsys)
    assert code == 2
    assert any(
        "but the model has only 256 positions; set maxSeqLength to at most 256" in m for m in messages(report)
    )


def test_an_unreadable_plan_is_invalid_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text('{"kind": "finetune"}')
    code = validate.main(["--plan", str(plan), "--json"])
    assert code == 2
    report = json.loads(capsys.readouterr().out)
    assert report["summary"].startswith(f"the run plan {plan} is invalid: ")


# --- the exit-code contract every runtime entry point shares ------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (InvalidInputError("bad spec"), 2, "InvalidInput: bad spec"),
        (StorageAccessError("s3://b/k: access denied"), 3, "StorageError: s3://b/k: access denied"),
        (RetriableError("peer lost"), 1, "TransientError: peer lost"),
        (RuntimeError("boom\nsecond line"), 1, "RuntimeError: boom second line"),
    ],
)
def test_run_main_maps_errors_to_exit_codes_and_one_line_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, code: int, message: str
) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))

    def entry_point() -> int:
        raise error

    assert run_main(entry_point) == code
    assert termination.read_text() == message + "\n"


def test_run_main_returns_what_the_entry_point_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    assert run_main(lambda: 0) == 0
    assert not (tmp_path / "termination-log").exists()
