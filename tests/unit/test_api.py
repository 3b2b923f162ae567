"""The API models reject what the API server would reject, naming the field in manifest terms
and saying what is allowed; they accept and default every shipped example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import API_VERSION, CompressJob, FineTuneJob
from kubetune.api.resources import MAX_NAME_LENGTH
from kubetune.api.spec import MethodType, TaskType
from kubetune.api.validation import (
    MAX_DOCUMENT_NODES,
    FieldError,
    ManifestYAMLError,
    load_documents,
    parse_resource,
    validate_document,
)
from kubetune.cli import main
from kubetune.errors import InvalidInputError
from tests.documents import edited, example

pytestmark = pytest.mark.unit


LORA = example("finetune-lora-causal-lm.yaml")
CLASSIFIER = example("finetune-full-classification.yaml")
COMPRESS = example("compress-from-finetune.yaml")


# (id, document, field path, words the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    ("zeroStage 7", edited(LORA, spec__deepspeed__zeroStage=7), "spec.deepspeed.zeroStage", ("7", "0 to 3")),
    (
        "zeroStage -1",
        edited(LORA, spec__deepspeed__zeroStage=-1),
        "spec.deepspeed.zeroStage",
        ("-1", "0 to 3"),
    ),
    (
        "zeroStage text",
        edited(LORA, spec__deepspeed__zeroStage="two"),
        "spec.deepspeed.zeroStage",
        ("integer", "0 to 3"),
    ),
    (
        "unknown method",
        edited(LORA, spec__method__type="qlora"),
        "spec.method.type",
        ("'qlora'", "one of full, lora"),
    ),
    (
        "unknown task",
        edited(LORA, spec__task__type="seq2seq"),
        "spec.task.type",
        ("'seq2seq'", "causal-lm, sequence-classification"),
    ),
    (
        "unknown data format",
        edited(LORA, spec__dataset__format="alpaca"),
        "spec.dataset.format",
        ("one of text, instruction, chat, classification",),
    ),
    (
        "unknown quantization scheme",
        edited(COMPRESS, spec__quantization__scheme="W3A16"),
        "spec.quantization.scheme",
        ("'W3A16'", "W4A16"),
    ),
    (
        "learning rate 0",
        edited(LORA, spec__hyperparameters__learningRate=0),
        "spec.hyperparameters.learningRate",
        ("greater than 0",),
    ),
    ("workers 0", edited(LORA, spec__resources__workers=0), "spec.resources.workers", ("1 to 1024",)),
    (
        "LoRA dropout 1",
        edited(LORA, spec__method__lora__dropout=1.0),
        "spec.method.lora.dropout",
        ("less than 1",),
    ),
    (
        "evalFraction 0.7",
        edited(LORA, spec__dataset__evalFraction=0.7),
        "spec.dataset.evalFraction",
        ("at most 0.5",),
    ),
    (
        "sparsity 0",
        edited(COMPRESS, spec__pruning={"sparsity": 0}),
        "spec.pruning.sparsity",
        ("greater than 0", "less than 1"),
    ),
    (
        "sparsity 1",
        edited(COMPRESS, spec__pruning={"sparsity": 1}),
        "spec.pruning.sparsity",
        ("less than 1",),
    ),
    (
        "gs:// model",
        edited(LORA, spec__model__uri="gs://bucket/model"),
        "spec.model.uri",
        ("scheme 'gs' is not supported", "s3://bucket/prefix", "hf://org/name"),
    ),
    (
        "hf:// output",
        edited(LORA, spec__output__uri="hf://org/model"),
        "spec.output.uri",
        ("scheme 'hf' is not supported", "s3://bucket/prefix, file:///absolute/path"),
    ),
    (
        "relative file URI",
        edited(LORA, spec__dataset__train__uri="file://data.jsonl"),
        "spec.dataset.train.uri",
        ("not a well-formed URI",),
    ),
    (
        "unknown field",
        edited(LORA, spec__hyperparameters__lr=0.1),
        "spec.hyperparameters.lr",
        ("unknown field", "learningRate"),
    ),
    (
        "snake_case field",
        edited(LORA, spec__deepspeed__zero_stage=3),
        "spec.deepspeed.zero_stage",
        ("unknown field", "zeroStage"),
    ),
    ("missing output", edited(LORA, spec__output=None), "spec.output", ("required",)),
    ("missing model uri", edited(LORA, spec__model={}), "spec.model.uri", ("required",)),
    ("missing spec", edited(LORA, spec=None), "spec", ("required",)),
    (
        "bad quantity",
        edited(LORA, spec__resources__requests__memory="32GB"),
        "spec.resources.requests.memory",
        ("'32GB'", "8Gi"),
    ),
    (
        "bad scratch size",
        edited(LORA, spec__resources__scratchSize="lots"),
        "spec.resources.scratchSize",
        ("quantity",),
    ),
    (
        "bad toleration effect",
        edited(LORA, spec__resources__tolerations=[{"key": "gpu", "effect": "Never"}]),
        "spec.resources.tolerations[0].effect",
        ("NoSchedule, PreferNoSchedule, NoExecute",),
    ),
    (
        "secret name with capitals",
        edited(LORA, spec__storage__secretRef__name="S3Creds"),
        "spec.storage.secretRef.name",
        ("'S3Creds' has the wrong form", "DNS subdomain"),
    ),
    (
        "endpoint without scheme",
        edited(LORA, spec__storage__endpoint="minio:9000"),
        "spec.storage.endpoint",
        ("'minio:9000'", "http:// or https:// URL"),
    ),
    (
        "lora settings with full",
        edited(LORA, spec__method__type="full", spec__method__mergeAdapter=None),
        "spec.method.lora",
        ("only allowed with method type lora",),
    ),
    (
        "epochs and maxSteps",
        edited(LORA, spec__hyperparameters__maxSteps=100),
        "spec.hyperparameters.maxSteps",
        ("exactly one of epochs and maxSteps",),
    ),
    (
        "classification without numLabels",
        edited(CLASSIFIER, spec__task__numLabels=None, spec__task__labels=None),
        "spec.task.numLabels",
        ("numLabels is required",),
    ),
    (
        "offloadParams with ZeRO 2",
        edited(LORA, spec__deepspeed__offloadParams=True),
        "spec.deepspeed.offloadParams",
        ("zeroStage 3",),
    ),
    (
        "early stopping without evaluation",
        edited(LORA, spec__dataset__evalFraction=None, spec__hyperparameters__earlyStopping={}),
        "spec.hyperparameters.earlyStopping",
        ("needs evaluation", "dataset.evalFraction"),
    ),
    (
        "early stopping on a metric nobody reports",
        edited(LORA, spec__hyperparameters__earlyStopping={"metric": "loss"}),
        "spec.hyperparameters.earlyStopping.metric",
        ("wrong form", "^eval_"),
    ),
    (
        "eval and evalFraction",
        edited(LORA, spec__dataset__eval={"uri": "s3://data/eval.jsonl"}),
        "spec.dataset.evalFraction",
        ("not both",),
    ),
    (
        "vllm without GPUs",
        edited(LORA, spec__serve__runtime="vllm", spec__serve__gpus=0),
        "spec.serve.gpus",
        ("gpus >= 1",),
    ),
    (
        "format against task",
        edited(LORA, spec__dataset__format="classification"),
        "spec.dataset.format",
        ("must be classification",),
    ),
    (
        "uri and fromFineTuneJob",
        edited(COMPRESS, spec__model__uri="s3://models/x"),
        "spec.model.uri",
        ("exactly one of uri, fromFineTuneJob and fromFineTuneSweep",),
    ),
    (
        "fromFineTuneJob and fromFineTuneSweep",
        edited(COMPRESS, spec__model__fromFineTuneSweep="sweep-support-lora"),
        "spec.model.uri",
        ("exactly one of uri, fromFineTuneJob and fromFineTuneSweep",),
    ),
    (
        "fromFineTuneSweep not a DNS label",
        edited(COMPRESS, spec__model={"fromFineTuneSweep": "Sweep_1"}),
        "spec.model.fromFineTuneSweep",
        ("a DNS label",),
    ),
    (
        "no compression step",
        edited(COMPRESS, spec__quantization=None),
        "spec.quantization",
        ("at least one compression step",),
    ),
    (
        "2:4 at 70%",
        edited(COMPRESS, spec__pruning={"pattern": "2:4", "sparsity": 0.7}),
        "spec.pruning.sparsity",
        ("0.5",),
    ),
    (
        "torchao with W4A16",
        edited(COMPRESS, spec__quantization__method="torchao"),
        "spec.quantization.scheme",
        ("INT8_WEIGHT_ONLY",),
    ),
    (
        "name too long",
        edited(LORA, metadata__name="x" * (MAX_NAME_LENGTH["FineTuneJob"] + 1)),
        "metadata.name",
        ("FineTuneJob names must be at most 46 characters", "<name>-train-r1000-1023, must fit in 63"),
    ),
    (
        "compress name too long",
        edited(COMPRESS, metadata__name="x" * (MAX_NAME_LENGTH["CompressJob"] + 1)),
        "metadata.name",
        ("CompressJob names must be at most 43 characters",),
    ),
    ("name with a dot", edited(LORA, metadata__name="llama.lora"), "metadata.name", ("DNS-1035",)),
    # Issue 12, validation parity: each of these was accepted by kubetune validate before.
    (
        "maxSteps as a string",
        edited(LORA, spec__hyperparameters__epochs=None, spec__hyperparameters__maxSteps="10"),
        "spec.hyperparameters.maxSteps",
        ("valid integer", "'10'"),
    ),
    (
        "seed as a string",
        edited(LORA, spec__hyperparameters__seed="42"),
        "spec.hyperparameters.seed",
        ("valid integer",),
    ),
    ("workers true", edited(LORA, spec__resources__workers=True), "spec.resources.workers", ("integer",)),
    (
        "workers 2.5",
        edited(LORA, spec__resources__workers=2.5),
        "spec.resources.workers",
        ("integer", "2.5"),
    ),
    ("suspend as a string", edited(LORA, spec__suspend="true"), "spec.suspend", ("valid boolean",)),
    ("suspend 1", edited(LORA, spec__suspend=1), "spec.suspend", ("valid boolean", "true or false")),
    (
        "gradientCheckpointing yes as a string",
        edited(LORA, spec__hyperparameters__gradientCheckpointing="yes"),
        "spec.hyperparameters.gradientCheckpointing",
        ("valid boolean",),
    ),
    (
        "learning rate as a string",
        edited(LORA, spec__hyperparameters__learningRate="0.1"),
        "spec.hyperparameters.learningRate",
        ("valid number",),
    ),
    (
        "evalFraction true",
        edited(LORA, spec__dataset__evalFraction=True),
        "spec.dataset.evalFraction",
        ("valid number",),
    ),
    (
        "cpu 1.5 unquoted",
        edited(LORA, spec__resources__requests__cpu=1.5),
        "spec.resources.requests.cpu",
        ("1.5 is a number with a fraction", "'1.5' (quoted)"),
    ),
    (
        "seed 2^63",
        edited(LORA, spec__hyperparameters__seed=2**63),
        "spec.hyperparameters.seed",
        ("9223372036854775808 is out of range", "0 to 2147483647"),
    ),
    (
        "seed 2^64",
        edited(LORA, spec__hyperparameters__seed=2**64),
        "spec.hyperparameters.seed",
        ("out of range",),
    ),
    (
        "output URI with a trailing newline",
        edited(LORA, spec__output__uri="s3://runs/lora\n"),
        "spec.output.uri",
        ("control character",),
    ),
    (
        "quantity with a trailing newline",
        edited(LORA, spec__resources__requests__memory="32Gi\n"),
        "spec.resources.requests.memory",
        ("not a Kubernetes quantity",),
    ),
    (
        "name with a trailing newline",
        edited(LORA, metadata__name="lora\n"),
        "metadata.name",
        ("DNS-1035",),
    ),
    (
        "output with a '..' segment",
        edited(LORA, spec__output__uri="s3://runs/lora/../other-team"),
        "spec.output.uri",
        ("'..' path segment",),
    ),
    (
        "dataset with a '..' segment",
        edited(LORA, spec__dataset__train__uri="file:///data/../etc/passwd"),
        "spec.dataset.train.uri",
        ("'..' path segment",),
    ),
    (
        "output at the filesystem root",
        edited(LORA, spec__output__uri="file:///"),
        "spec.output.uri",
        ("filesystem root",),
    ),
    (
        "output at the filesystem root spelled file:////./",
        edited(LORA, spec__output__uri="file:////./"),
        "spec.output.uri",
        ("filesystem root",),
    ),
    (
        "credentials in the endpoint",
        edited(LORA, spec__storage__endpoint="http://AKIAKEY:s3cr3tvalue@minio.storage:9000"),
        "spec.storage.endpoint",
        ("must not contain credentials", "secretRef"),
    ),
    (
        "gptq with FP8",
        edited(COMPRESS, spec__quantization__scheme="FP8"),
        "spec.quantization.scheme",
        ("use method rtn",),
    ),
    ("old apiVersion", edited(LORA, apiVersion="kubetune.io/v1"), "apiVersion", ("not served", API_VERSION)),
    (
        "unknown kind",
        edited(LORA, kind="TrainJob"),
        "kind",
        ("not a kubetune kind", "FineTuneJob or CompressJob"),
    ),
]


@pytest.mark.parametrize(("doc", "path", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_document_is_rejected_naming_the_field(
    doc: dict[str, Any], path: str, words: tuple[str, ...]
) -> None:
    resource, errors = validate_document(doc)
    assert resource is None
    assert [e.path for e in errors] == [path], [str(e) for e in errors]
    text = str(errors[0])
    for word in words:
        assert word in text


def test_deepspeed_config_has_a_size_bound() -> None:
    """A bound the CRD cannot state (its schema cannot measure a free-form object) and the operator
    enforces when it builds the plan: far below the ConfigMap's 1 MiB."""
    _, errors = validate_document(edited(LORA, spec__deepspeed__config={"comment": "x" * 70_000}))
    assert [e.path for e in errors] == ["spec.deepspeed.config"]
    assert "bytes as JSON, more than the 65536 allowed" in str(errors[0])
    _, errors = validate_document(edited(LORA, spec__deepspeed__config={f"k{i}": i for i in range(65)}))
    assert [e.path for e in errors] == ["spec.deepspeed.config"]


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (
            edited(LORA, spec__deepspeed__config={"train_micro_batch_size_per_gpu": 32}),
            "spec.deepspeed.config",
        ),
        (
            edited(
                COMPRESS,
                spec__distillation={
                    "student": {"layerStride": 2},
                    "hyperparameters": {"epochs": 1},
                    "deepspeed": {"config": {"gradient_clipping": 0.5}},
                },
            ),
            "spec.distillation.deepspeed.config",
        ),
    ],
    ids=["micro-batch size", "student's gradient clipping"],
)
def test_deepspeed_config_may_not_set_what_the_hyperparameters_derive(doc: dict[str, Any], path: str) -> None:
    """The runtime refuses (exit 2) a DeepSpeed config whose batch geometry disagrees with the
    hyperparameters; a CRD cannot list a free-form object's keys, so validate and the operator do."""
    _, errors = validate_document(doc)
    assert [e.path for e in errors] == [path]
    assert "derives them from hyperparameters" in str(errors[0])


def test_credentials_in_the_endpoint_are_not_echoed() -> None:
    _, errors = validate_document(
        edited(LORA, spec__storage__endpoint="http://AKIAKEY:s3cr3tvalue@minio:9000")
    )
    assert errors
    assert all("s3cr3tvalue" not in str(e) and "AKIAKEY" not in str(e) for e in errors)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("spec__resources__workers", 2.0, 2),
        ("spec__hyperparameters__learningRate", 1, 1.0),
        ("spec__resources__requests__cpu", 2.0, "2"),
    ],
)
def test_values_the_api_server_takes_are_taken(field: str, value: Any, expected: Any) -> None:
    """Strictness stops at what the server accepts: a whole float is an integer, an integer a number."""
    job = parse_resource(edited(LORA, **{field: value}))
    read = {
        "spec__resources__workers": lambda j: j.spec.resources.workers,
        "spec__hyperparameters__learningRate": lambda j: j.spec.hyperparameters.learning_rate,
        "spec__resources__requests__cpu": lambda j: (j.spec.resources.requests or {})["cpu"],
    }[field]
    assert read(job) == expected
    assert type(read(job)) is type(expected)


def test_there_are_at_least_twenty_invalid_cases() -> None:
    assert len(INVALID) >= 20


def test_error_reads_as_path_problem_and_allowed_values() -> None:
    _, errors = validate_document(edited(LORA, spec__deepspeed__zeroStage=7))
    assert errors == [
        FieldError(
            "spec.deepspeed.zeroStage", "7 is out of range", "an integer from 0 to 3", type="less_than_equal"
        )
    ]
    assert str(errors[0]) == "spec.deepspeed.zeroStage: 7 is out of range; allowed: an integer from 0 to 3"


def test_every_error_of_a_document_is_reported() -> None:
    doc = edited(LORA, spec__deepspeed__zeroStage=9, spec__method__type="adapter", metadata__name="9lives")
    _, errors = validate_document(doc)
    assert sorted(e.path for e in errors) == ["metadata.name", "spec.deepspeed.zeroStage", "spec.method.type"]


@pytest.mark.parametrize(
    "name", ["finetune-lora-causal-lm.yaml", "finetune-full-classification.yaml", "quickstart.yaml"]
)
def test_finetune_examples_parse(name: str) -> None:
    job = parse_resource(example(name))
    assert isinstance(job, FineTuneJob)


def test_defaults_fill_in_what_the_example_leaves_out() -> None:
    job = FineTuneJob.model_validate(edited(LORA, spec__deepspeed=None, spec__task=None, spec__method=None))
    assert job.spec.deepspeed.zero_stage == 2
    assert job.spec.task.type is TaskType.causal_lm
    assert job.spec.method.type is MethodType.lora
    assert job.spec.method.merges
    assert job.spec.resources.scratch_size == "50Gi"


def test_numbers_are_accepted_as_quantities() -> None:
    job = FineTuneJob.model_validate(edited(LORA, spec__resources__requests={"cpu": 4, "memory": "32Gi"}))
    assert job.spec.resources.requests == {"cpu": "4", "memory": "32Gi"}


def test_wire_form_round_trips() -> None:
    for doc in (LORA, CLASSIFIER, COMPRESS):
        model = type(parse_resource(doc))
        resource = model.model_validate(doc)
        assert model.model_validate(resource.to_wire()) == resource


def test_compress_example_references_the_finetune_example() -> None:
    job = CompressJob.model_validate(COMPRESS)
    assert job.spec.model.from_fine_tune_job == LORA["metadata"]["name"]


def test_parse_resource_raises_invalid_input_listing_every_error() -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_resource(edited(LORA, spec__deepspeed__zeroStage=7, spec__workers=1), source="job.yaml")
    message = str(raised.value)
    assert "job.yaml" in message
    assert "spec.deepspeed.zeroStage: 7 is out of range" in message
    assert "spec.workers: unknown field" in message


def test_started_job_refuses_training_changes() -> None:
    old = FineTuneJob.model_validate(edited(LORA, status={"startTime": "2025-01-01T00:00:00Z"}))
    with pytest.raises(ValueError, match="cannot change once the job has started"):
        FineTuneJob.model_validate(edited(LORA, spec__hyperparameters__epochs=5)).check_update(old)
    FineTuneJob.model_validate(edited(LORA, spec__serve__replicas=2)).check_update(old)


def test_name_limits_match_the_operators_child_names(tmp_path: Path) -> None:
    """The API refuses exactly the names whose children the operator could not name."""
    # A fresh interpreter outside the repository: from its root, the source folder kubetune/
    # shadows the installed package, which is what maps operator/ to kubetune.operator.
    # The longest name whose last child, "<job>-train-r1000-1023" (restarts <= 1000, workers <= 1024),
    # is still a DNS label, as the operator names it.
    code = (
        "import json; from kubetune.operator import render; print(json.dumps({kind: max(n for n in "
        "range(1, 64) if len(render.ChildNames(kind, 'j' * n).main(1000) + '-1023') <= 63) "
        "for kind in ('FineTuneJob', 'CompressJob')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == MAX_NAME_LENGTH


# --- YAML as the API server reads it (issue 12) ------------------------------------------------

JOB_YAML = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: yaml-job
spec:
  model:
    uri: s3://models/base
  dataset:
    train:
      uri: s3://data/train.jsonl
  hyperparameters:
    maxSteps: 10
  output:
    uri: s3://runs/yaml-job
"""


def _validate_cli(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    code = main(["validate", str(path)])
    return code, capsys.readouterr().out, str(path)


def test_duplicate_keys_are_refused_naming_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = JOB_YAML.replace(
        "    maxSteps: 10\n", "    maxSteps: 10\n    learningRate: 0.1\n    maxSteps: 20\n"
    )
    code, out, path = _validate_cli(tmp_path, text, capsys)
    assert code == 1
    assert f"{path}:14: duplicate key 'maxSteps' (spec.hyperparameters.maxSteps; first at line 12)" in out


def test_a_merge_key_is_not_a_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        JOB_YAML
        + "  deepspeed:\n    config:\n      <<: {steps_per_print: 5}\n      wall_clock_breakdown: true\n"
    )
    code, out, _ = _validate_cli(tmp_path, text, capsys)
    assert code == 0, out


def test_an_alias_bomb_in_deepspeed_config_is_refused_by_the_node_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nine levels of ten aliases expand to 10^9 values; the budget counts distinct nodes, so
    the document is refused before pydantic or the plan ever walks the expansion."""
    levels = ["      l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"]
    for i in range(1, 10):
        levels.append(f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n")
    code, out, path = _validate_cli(
        tmp_path, JOB_YAML + "  deepspeed:\n    config:\n" + "".join(levels), capsys
    )
    assert code == 1
    assert f"more than {MAX_DOCUMENT_NODES} values through YAML aliases" in out
    assert f"{path}:" in out


def test_a_recursive_alias_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _validate_cli(
        tmp_path, JOB_YAML + "  deepspeed:\n    config:\n      loop: &loop [*loop]\n", capsys
    )
    assert code == 1
    assert "contains itself through an alias" in out


def test_small_aliases_are_expanded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = JOB_YAML.replace("  output:", "  resources:\n    requests: &r {cpu: 2}\n    limits: *r\n  output:")
    code, out, _ = _validate_cli(tmp_path, text, capsys)
    assert code == 0, out


def test_a_quoted_number_is_refused_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, path = _validate_cli(tmp_path, JOB_YAML.replace("maxSteps: 10", 'maxSteps: "10"'), capsys)
    assert code == 1
    assert (
        f"{path}:12: FineTuneJob/yaml-job (document 1): spec.hyperparameters.maxSteps: input should be" in out
    )


def test_load_documents_reads_as_validate_does() -> None:
    assert load_documents("a: 1\n---\nb: [x]\n") == [{"a": 1}, {"b": ["x"]}]
    with pytest.raises(ManifestYAMLError, match="duplicate key 'a'"):
        load_documents("a: 1\na: 2\n")
