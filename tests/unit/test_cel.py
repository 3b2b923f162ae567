"""The CEL rules in the CRDs and their Python twins in the models agree.

Each document is seen twice: as the API server sees it (the generated CRD's defaults applied,
values typed by the schema, every ``x-kubernetes-validations`` rule evaluated with cel-python)
and as ``kubetune validate`` sees it (the pydantic models). Every document in the corpus breaks
at most one rule, so both sides must name exactly the same rule at the same field path.
cel-python parses every construct the rules use (has(), ternaries, ``in`` lists, size(),
matches(), object equality), so no rule is left to the Python side alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import celpy
import jsonschema
import pytest
from celpy import celtypes

from kubetune.api import KINDS, CompressJob, FineTuneJob
from kubetune.api.crd import generate_crds
from kubetune.api.validation import validate_document
from tests.documents import apply_defaults, edited, example

pytestmark = pytest.mark.unit

SCHEMAS = {
    crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for crd in generate_crds().values()
}
CEL = celpy.Environment()


LORA = example("finetune-lora-causal-lm.yaml")
CLASSIFIER = example("finetune-full-classification.yaml")
COMPRESS = example("compress-from-finetune.yaml")
DPO = example("dpo-lora.yaml")
SWEEP = example("sweep-lora.yaml")
LR = {"path": "hyperparameters.learningRate", "type": "float", "min": 1e-5, "max": 1e-3}


# --- The API server's view ------------------------------------------------------------------


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value typed the way the API server types it for CEL (numbers are doubles,
    integers ints, int-or-string either)."""
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(
                    v, properties.get(k) or (extra if isinstance(extra, dict) else {})
                )
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if schema.get("type") == "number":
        return celtypes.DoubleType(value)
    return celpy.adapter.json_to_cel(value)


def evaluate(rule: str, **variables: Any) -> bool:
    return bool(CEL.program(CEL.compile(rule)).evaluate(variables))


def cel_violations(value: Any, schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(field path, message) of every non-transition rule that is false, walking the object."""
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue
        if not evaluate(rule["rule"], self=to_cel(value, schema)):
            field = tuple(rule.get("fieldPath", "").lstrip(".").split(".")) if rule.get("fieldPath") else ()
            found.append((".".join(path + field), rule["message"]))
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                found += cel_violations(item, schema["properties"][key], (*path, key))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += cel_violations(item, schema["items"], (*path[:-1], f"{path[-1]}[{index}]"))
    return found


def server_view(doc: dict[str, Any]) -> dict[str, Any]:
    schema = SCHEMAS[doc["kind"]]
    defaulted = apply_defaults(copy.deepcopy(doc), schema)
    # CEL runs on objects that already passed the schema; the corpus must be schema-valid
    # so that the two sides are compared on the rules alone.
    jsonschema.Draft4Validator(schema).validate(defaulted)
    return dict(defaulted)


def python_violations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    _, errors = validate_document(doc)
    assert all(e.type == "cel_rule" for e in errors), [str(e) for e in errors]
    return [(e.path, e.message) for e in errors]


# --- The corpus -----------------------------------------------------------------------------


def edit(base: dict[str, Any], **changes: Any) -> Callable[[], dict[str, Any]]:
    """A document from ``base`` with dotted paths set (``None`` deletes)."""

    return lambda: edited(base, **changes)


# (id, document, the rule's field path or None when every rule holds)
CASES: list[tuple[str, Callable[[], dict[str, Any]], str | None]] = [
    ("lora example", edit(LORA), None),
    ("classification example", edit(CLASSIFIER), None),
    ("compress example", edit(COMPRESS), None),
    ("sweep example", edit(SWEEP), None),
    ("sweep name of 41 characters", edit(SWEEP, metadata__name="s" * 41), "metadata.name"),
    ("sweep name of 40 characters", edit(SWEEP, metadata__name="s" * 40), None),
    ("sweep name with capitals", edit(SWEEP, metadata__name="Sweep"), "metadata.name"),
    (
        "sweep: categorical with min",
        edit(
            SWEEP,
            spec__parameters=[{"path": "method.lora.r", "type": "categorical", "values": [8], "min": 1}],
        ),
        "spec.parameters[0].type",
    ),
    (
        "sweep: float without max",
        edit(SWEEP, spec__parameters=[{k: v for k, v in LR.items() if k != "max"}]),
        "spec.parameters[0].type",
    ),
    (
        "sweep: min above max",
        edit(
            SWEEP,
            spec__parameters=[LR, {**LR, "path": "hyperparameters.weightDecay", "min": 0.5, "max": 0.1}],
        ),
        "spec.parameters[1].max",
    ),
    (
        "sweep: log from zero",
        edit(SWEEP, spec__parameters=[{**LR, "min": 0.0, "log": True}]),
        "spec.parameters[0].log",
    ),
    (
        "sweep: log with step",
        edit(SWEEP, spec__parameters=[{**LR, "step": 1e-5, "log": True}]),
        "spec.parameters[0].log",
    ),
    (
        "sweep: int with a fractional step",
        edit(
            SWEEP,
            spec__parameters=[{"path": "method.lora.r", "type": "int", "min": 4, "max": 32, "step": 2.5}],
        ),
        "spec.parameters[0].min",
    ),
    (
        "sweep: grid over a float without step",
        edit(SWEEP, spec__algorithm={"type": "grid"}),
        "spec.parameters",
    ),
    (
        "sweep: grid over steps and values",
        edit(SWEEP, spec__algorithm={"type": "grid"}, spec__parameters=[{**LR, "step": 1e-4}]),
        None,
    ),
    ("sweep: cmaes over numbers and a categorical", edit(SWEEP, spec__algorithm={"type": "cmaes"}), None),
    (
        "sweep: cmaes over categorical parameters only",
        edit(
            SWEEP,
            spec__algorithm={"type": "cmaes"},
            spec__parameters=[{"path": "method.lora.r", "type": "categorical", "values": [8, 16]}],
        ),
        "spec.parameters",
    ),
    ("numLabels with causal-lm", edit(LORA, spec__task__numLabels=3), "spec.task.numLabels"),
    (
        "classification without numLabels",
        edit(CLASSIFIER, spec__task__numLabels=None, spec__task__labels=None),
        "spec.task.numLabels",
    ),
    ("classification with numLabels only", edit(CLASSIFIER, spec__task__labels=None), None),
    ("labels count differs", edit(CLASSIFIER, spec__task__labels=["bad", "good"]), "spec.task.labels"),
    (
        "eval and evalFraction",
        edit(LORA, spec__dataset__eval={"uri": "s3://datasets/x.jsonl"}),
        "spec.dataset.evalFraction",
    ),
    (
        "lora settings with full",
        edit(LORA, spec__method__type="full", spec__method__mergeAdapter=None),
        "spec.method.lora",
    ),
    ("mergeAdapter with full", edit(CLASSIFIER, spec__method__mergeAdapter=False), "spec.method.lora"),
    ("method defaulted to lora", edit(LORA, spec__method=None), None),
    ("epochs and maxSteps", edit(LORA, spec__hyperparameters__maxSteps=10), "spec.hyperparameters.maxSteps"),
    (
        "neither epochs nor maxSteps",
        edit(LORA, spec__hyperparameters__epochs=None),
        "spec.hyperparameters.maxSteps",
    ),
    (
        "offloadParams with ZeRO 2",
        edit(LORA, spec__deepspeed__offloadParams=True),
        "spec.deepspeed.offloadParams",
    ),
    (
        "offloadParams with ZeRO 3",
        edit(LORA, spec__deepspeed__offloadParams=True, spec__deepspeed__zeroStage=3),
        None,
    ),
    (
        "offloadOptimizer with ZeRO 0",
        edit(LORA, spec__deepspeed__offloadOptimizer=True, spec__deepspeed__zeroStage=0),
        "spec.deepspeed.offloadOptimizer",
    ),
    (
        "offloadOptimizer with ZeRO 1",
        edit(LORA, spec__deepspeed__offloadOptimizer=True, spec__deepspeed__zeroStage=1),
        None,
    ),
    (
        "processes differ from GPUs",
        edit(LORA, spec__resources__processesPerWorker=2),
        "spec.resources.processesPerWorker",
    ),
    ("processes equal GPUs", edit(LORA, spec__resources__processesPerWorker=4), None),
    ("processes without GPUs", edit(CLASSIFIER, spec__resources__processesPerWorker=3), None),
    ("vllm without GPUs", edit(LORA, spec__serve__runtime="vllm", spec__serve__gpus=0), "spec.serve.gpus"),
    ("vllm with a GPU", edit(LORA, spec__serve__runtime="vllm"), None),
    (
        "classification format for causal-lm",
        edit(LORA, spec__dataset__format="classification"),
        "spec.dataset.format",
    ),
    ("text format for classification", edit(CLASSIFIER, spec__dataset__format="text"), "spec.dataset.format"),
    ("dpo example", edit(DPO), None),
    ("dpo with the default settings", edit(DPO, spec__method__dpo=None), None),
    (
        "dpo with full fine-tuning and a reference model",
        edit(
            DPO,
            spec__method={
                "type": "full",
                "objective": "dpo",
                "dpo": {"referenceModel": {"uri": "s3://models/ref"}},
            },
        ),
        None,
    ),
    ("dpo with ZeRO 3", edit(DPO, spec__deepspeed__zeroStage=3), None),
    ("dpo on instruction data", edit(DPO, spec__dataset__format="instruction"), "spec.dataset.format"),
    (
        "preference data with sft",
        edit(DPO, spec__method__objective="sft", spec__method__dpo=None),
        "spec.dataset.format",
    ),
    (
        "preference data, objective defaulted",
        edit(DPO, spec__method__objective=None, spec__method__dpo=None),
        "spec.dataset.format",
    ),
    ("dpo settings with sft", edit(LORA, spec__method__dpo={"beta": 0.2}), "spec.method.dpo"),
    (
        "dpo with sequence-classification",
        edit(CLASSIFIER, spec__method__objective="dpo"),
        "spec.dataset.format",
    ),
    (
        "preference data for sequence-classification",
        edit(DPO, spec__task={"type": "sequence-classification", "numLabels": 2}),
        "spec.dataset.format",
    ),
    (
        "compressing on preference data",
        edit(COMPRESS, spec__dataset__format="preference"),
        "spec.dataset.format",
    ),
    ("early stopping with evalFraction", edit(LORA, spec__hyperparameters__earlyStopping={}), None),
    (
        "early stopping without evaluation",
        edit(LORA, spec__dataset__evalFraction=None, spec__hyperparameters__earlyStopping={}),
        "spec.hyperparameters.earlyStopping",
    ),
    (
        "early stopping on macro-F1 of a classifier",
        edit(CLASSIFIER, spec__hyperparameters__earlyStopping={"metric": "eval_f1_macro", "patience": 2}),
        None,
    ),
    (
        "early stopping on accuracy of a causal LM",
        edit(LORA, spec__hyperparameters__earlyStopping={"metric": "eval_accuracy"}),
        "spec.hyperparameters.earlyStopping.metric",
    ),
    (
        "early stopping on a DPO reward metric",
        edit(DPO, spec__hyperparameters__earlyStopping={"metric": "eval_rewards/accuracies"}),
        None,
    ),
    (
        "early stopping in distillation",
        edit(
            COMPRESS,
            spec__distillation={
                "student": {"layerStride": 2},
                "hyperparameters": {"maxSteps": 100, "earlyStopping": {}},
            },
        ),
        "spec.distillation.hyperparameters.earlyStopping",
    ),
    ("packing text records", edit(LORA, spec__dataset__packing=True), None),
    ("packing chat records", edit(LORA, spec__dataset__packing=True, spec__dataset__format="chat"), None),
    ("packing switched off for a classifier", edit(CLASSIFIER, spec__dataset__packing=False), None),
    ("packing classification records", edit(CLASSIFIER, spec__dataset__packing=True), "spec.dataset.packing"),
    ("packing preference pairs", edit(DPO, spec__dataset__packing=True), "spec.dataset.packing"),
    ("packing calibration data", edit(COMPRESS, spec__dataset__packing=True), "spec.dataset.packing"),
    ("neftune for sft", edit(LORA, spec__hyperparameters__robustness={"neftuneAlpha": 5.0}), None),
    (
        "neftune for a classifier",
        edit(CLASSIFIER, spec__hyperparameters__robustness={"neftuneAlpha": 5.0}),
        "spec.hyperparameters.robustness.neftuneAlpha",
    ),
    (
        "neftune for dpo",
        edit(DPO, spec__hyperparameters__robustness={"neftuneAlpha": 5.0}),
        "spec.hyperparameters.robustness.neftuneAlpha",
    ),
    (
        "adversarial training of a classifier",
        edit(CLASSIFIER, spec__hyperparameters__robustness={"adversarial": {"epsilon": 0.5}}),
        None,
    ),
    (
        "adversarial training with the default epsilon",
        edit(CLASSIFIER, spec__hyperparameters__robustness={"adversarial": {}}),
        None,
    ),
    (
        "adversarial training of a causal LM",
        edit(LORA, spec__hyperparameters__robustness={"adversarial": {}}),
        "spec.hyperparameters.robustness.adversarial",
    ),
    (
        "robustness in distillation",
        edit(
            COMPRESS,
            spec__distillation={
                "student": {"layerStride": 2},
                "hyperparameters": {"maxSteps": 100, "robustness": {"neftuneAlpha": 5.0}},
            },
        ),
        "spec.distillation.hyperparameters.robustness",
    ),
    ("name of 47 characters", edit(LORA, metadata__name="a" * 47), "metadata.name"),
    ("name of 46 characters", edit(LORA, metadata__name="a" * 46), None),
    ("compress name of 44 characters", edit(COMPRESS, metadata__name="c" * 44), "metadata.name"),
    ("compress name of 43 characters", edit(COMPRESS, metadata__name="c" * 43), None),
    ("compress name with capitals", edit(COMPRESS, metadata__name="Llama-W4"), "metadata.name"),
    ("name starting with a digit", edit(LORA, metadata__name="1-lora"), "metadata.name"),
    ("name ending with a dash", edit(LORA, metadata__name="lora-"), "metadata.name"),
    ("uri and fromFineTuneJob", edit(COMPRESS, spec__model__uri="s3://models/x"), "spec.model.uri"),
    ("neither uri nor fromFineTuneJob", edit(COMPRESS, spec__model={}), "spec.model.uri"),
    ("fromFineTuneSweep alone", edit(COMPRESS, spec__model={"fromFineTuneSweep": "sweep-lr"}), None),
    (
        "fromFineTuneJob and fromFineTuneSweep",
        edit(COMPRESS, spec__model__fromFineTuneSweep="sweep-lr"),
        "spec.model.uri",
    ),
    (
        "uri and fromFineTuneSweep",
        edit(COMPRESS, spec__model={"uri": "s3://models/x", "fromFineTuneSweep": "sweep-lr"}),
        "spec.model.uri",
    ),
    ("torchao with W4A16", edit(COMPRESS, spec__quantization__method="torchao"), "spec.quantization.scheme"),
    (
        "torchao with INT8_WEIGHT_ONLY",
        edit(COMPRESS, spec__quantization__method="torchao", spec__quantization__scheme="INT8_WEIGHT_ONLY"),
        None,
    ),
    (
        "gptq with INT8_DYNAMIC",
        edit(COMPRESS, spec__quantization__scheme="INT8_DYNAMIC"),
        "spec.quantization.scheme",
    ),
    (
        "smoothquant with W4A16",
        edit(COMPRESS, spec__quantization__method="smoothquant"),
        "spec.quantization.scheme",
    ),
    (
        "smoothquant with W8A8",
        edit(COMPRESS, spec__quantization__method="smoothquant", spec__quantization__scheme="W8A8"),
        None,
    ),
    (
        "2:4 at 60%",
        edit(COMPRESS, spec__pruning={"pattern": "2:4", "sparsity": 0.6}),
        "spec.pruning.sparsity",
    ),
    ("2:4 at 50%", edit(COMPRESS, spec__pruning={"pattern": "2:4", "sparsity": 0.5}), None),
    ("2:4 with the default sparsity", edit(COMPRESS, spec__pruning={"pattern": "2:4"}), None),
    ("no compression step", edit(COMPRESS, spec__quantization=None), "spec.quantization"),
    (
        "student with uri and layerStride",
        edit(
            COMPRESS,
            spec__distillation={
                "student": {"uri": "s3://models/small", "layerStride": 2},
                "hyperparameters": {"maxSteps": 100},
            },
        ),
        "spec.distillation.student.uri",
    ),
    (
        "student with neither",
        edit(COMPRESS, spec__distillation={"student": {}, "hyperparameters": {"maxSteps": 100}}),
        "spec.distillation.student.uri",
    ),
    (
        "distillation only",
        edit(
            COMPRESS,
            spec__quantization=None,
            spec__distillation={"student": {"layerStride": 2}, "hyperparameters": {"epochs": 1}},
        ),
        None,
    ),
    ("gptq with FP8", edit(COMPRESS, spec__quantization__scheme="FP8"), "spec.quantization.scheme"),
    (
        "rtn with FP8",
        edit(COMPRESS, spec__quantization__method="rtn", spec__quantization__scheme="FP8"),
        None,
    ),
    (
        "credentials in the endpoint",
        edit(LORA, spec__storage__endpoint="http://KEY:SECRET@minio.storage:9000"),
        "spec.storage.endpoint",
    ),
    ("an @ in the endpoint's path", edit(LORA, spec__storage__endpoint="http://minio:9000/a@b"), None),
    ("deepspeed.config with other keys", edit(LORA, spec__deepspeed__config={"steps_per_print": 5}), None),
    (
        "mlflow tracking with a token",
        edit(
            LORA,
            spec__tracking={
                "mlflow": {"uri": "http://mlflow:5000", "secretRef": {"name": "m", "tokenKey": "t"}}
            },
        ),
        None,
    ),
    (
        "credentials in the mlflow uri",
        edit(COMPRESS, spec__tracking={"mlflow": {"uri": "http://USER:PASSWORD@mlflow:5000"}}),
        "spec.tracking.mlflow.uri",
    ),
    (
        "mlflow credentials: a token and a username",
        edit(
            LORA,
            spec__tracking={
                "mlflow": {
                    "uri": "https://mlflow",
                    "secretRef": {"name": "m", "tokenKey": "t", "usernameKey": "u", "passwordKey": "p"},
                }
            },
        ),
        "spec.tracking.mlflow.secretRef.tokenKey",
    ),
    (
        "distillation without epochs or maxSteps",
        edit(COMPRESS, spec__distillation={"student": {"layerStride": 2}, "hyperparameters": {}}),
        "spec.distillation.hyperparameters.maxSteps",
    ),
]


@pytest.mark.parametrize(("build", "violated"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cel_rule_and_python_twin_agree(build: Callable[[], dict[str, Any]], violated: str | None) -> None:
    doc = build()
    from_cel = cel_violations(server_view(doc), SCHEMAS[doc["kind"]])
    from_python = python_violations(doc)
    assert from_cel == from_python
    assert [path for path, _ in from_cel] == ([violated] if violated else [])


def test_every_rule_is_broken_by_some_case() -> None:
    """The corpus covers every rule of both CRDs (messages identify rules)."""
    messages = {
        rule["message"]
        for schema in SCHEMAS.values()
        for rule in _all_rules(schema)
        if "oldSelf" not in rule["rule"]
    }
    broken = {message for _, build, _ in CASES for _, message in python_violations(build())}
    assert messages - broken == set()


def _all_rules(schema: dict[str, Any]) -> list[dict[str, str]]:
    rules = list(schema.get("x-kubernetes-validations", []))
    for child in schema.get("properties", {}).values():
        rules += _all_rules(child)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            rules += _all_rules(schema[key])
    return rules


# --- Transition rules (immutability once started) --------------------------------------------

STARTED = {"phase": "Running", "startTime": "2025-01-01T00:00:00Z"}


def transition_allowed(old: dict[str, Any], new: dict[str, Any]) -> tuple[bool, bool]:
    """(CEL verdict, Python verdict) on updating ``old`` to ``new``."""
    kind = new["kind"]
    schema = SCHEMAS[kind]
    rules = [r for r in schema["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert len(rules) == 1
    self_, old_self = to_cel(server_view(new), schema), to_cel(server_view(old), schema)
    by_cel = evaluate(rules[0]["rule"], self=self_, oldSelf=old_self)
    model = KINDS[kind]
    try:
        model.model_validate(new).check_update(model.model_validate(old))
        by_python = True
    except ValueError:
        by_python = False
    return by_cel, by_python


def started(doc: dict[str, Any], status: dict[str, Any] | None = STARTED) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    if status is not None:
        doc["status"] = status
    return doc


TRANSITIONS = [
    (
        "learning rate after start",
        started(LORA),
        edit(started(LORA), spec__hyperparameters__learningRate=0.1),
        False,
    ),
    (
        "output after start",
        started(LORA),
        edit(started(LORA), spec__output={"uri": "s3://runs/other"}),
        False,
    ),
    (
        "defaulted task made explicit",
        started(LORA),
        edit(started(LORA), spec__task={"type": "causal-lm"}),
        True,
    ),
    ("serve after start", started(LORA), edit(started(LORA), spec__serve__replicas=3), True),
    (
        "workers after start (ZeRO shards are per process)",
        started(LORA),
        edit(started(LORA), spec__resources__workers=4),
        False,
    ),
    (
        "processesPerWorker set after start",
        started(LORA),
        edit(started(LORA), spec__resources__processesPerWorker=2),
        False,
    ),
    (
        "storage endpoint after start",
        started(LORA),
        edit(started(LORA), spec__storage__endpoint="http://minio.other:9000"),
        False,
    ),
    (
        "memory request after start (applies at the next restart)",
        started(LORA),
        edit(started(LORA), spec__resources__requests={"memory": "64Gi"}),
        True,
    ),
    (
        "compression workers after start",
        started(COMPRESS),
        edit(started(COMPRESS), spec__resources__workers=2),
        False,
    ),
    ("suspend after start", started(LORA), edit(started(LORA), spec__suspend=True), True),
    ("maxRestarts after start", started(LORA), edit(started(LORA), spec__maxRestarts=5), True),
    (
        "learning rate before start",
        started(LORA, None),
        edit(LORA, spec__hyperparameters__learningRate=0.1),
        True,
    ),
    (
        "learning rate while only pending",
        started(LORA, {"phase": "Pending"}),
        edit(started(LORA, {"phase": "Pending"}), spec__hyperparameters__learningRate=0.1),
        True,
    ),
    (
        "distillation added after start",
        started(COMPRESS),
        edit(
            started(COMPRESS),
            spec__distillation={"student": {"layerStride": 2}, "hyperparameters": {"epochs": 1}},
        ),
        False,
    ),
    (
        "quantization swapped for pruning after start",
        started(COMPRESS),
        edit(started(COMPRESS), spec__quantization=None, spec__pruning={"sparsity": 0.5}),
        False,
    ),
    (
        "quantization scheme after start",
        started(COMPRESS),
        edit(started(COMPRESS), spec__quantization__scheme="W8A16"),
        False,
    ),
    (
        "compress serve after start",
        started(COMPRESS),
        edit(started(COMPRESS), spec__serve__enabled=False),
        True,
    ),
    ("compress unchanged", started(COMPRESS), edit(started(COMPRESS)), True),
]


@pytest.mark.parametrize(
    ("old", "build", "allowed"), [t[1:] for t in TRANSITIONS], ids=[t[0] for t in TRANSITIONS]
)
def test_transition_rule_and_python_twin_agree(
    old: dict[str, Any], build: Callable[[], dict[str, Any]], allowed: bool
) -> None:
    assert transition_allowed(old, build()) == (allowed, allowed)


def test_transition_rules_sit_at_the_root() -> None:
    for kind, model in (("FineTuneJob", FineTuneJob), ("CompressJob", CompressJob)):
        root_rules = [r["rule"] for r in SCHEMAS[kind]["x-kubernetes-validations"]]
        assert [r.cel for r in model.update_rules] == [r for r in root_rules if "oldSelf" in r]
