"""A FineTuneSweep's search space is checked against its template's own schema, naming the
parameter (``kubetune validate``; the operator reports the same as reason InvalidSpec)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.sweep import TUNABLE_PATHS, FineTuneSweep
from kubetune.api.validation import validate_document
from tests.documents import edited

pytestmark = pytest.mark.unit

SWEEP = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)


def errors_of(parameters: list[dict[str, Any]], **spec: Any) -> list[str]:
    doc = edited(SWEEP, spec__parameters=parameters, **{f"spec__{k}": v for k, v in spec.items()})
    resource, errors = validate_document(doc)
    assert (resource is None) == bool(errors)
    return [str(e) for e in errors]


@pytest.mark.parametrize(
    ("parameter", "path", "says"),
    [
        (
            {"path": "output.uri", "type": "categorical", "values": ["s3://a/b"]},
            "spec.parameters[0].path",
            "output may not vary",
        ),
        (
            {"path": "storage.region", "type": "categorical", "values": ["x"]},
            "spec.parameters[0].path",
            "storage may not vary",
        ),
        (
            {"path": "hyperparameters.learningRat", "type": "float", "min": 0.1, "max": 0.2},
            "spec.parameters[0].path",
            "not a scalar field",
        ),
        (
            {"path": "hyperparameters.evalEverySteps", "type": "int", "min": 1, "max": 9},
            "spec.parameters[0].path",
            "every trial must share",
        ),
        (
            {"path": "hyperparameters.learningRate", "type": "float", "min": 0.2, "max": 0.1},
            "spec.parameters[0].max",
            "min must be lower than max",
        ),
        (
            {"path": "hyperparameters.weightDecay", "type": "float", "min": 0.0, "max": 0.1, "log": True},
            "spec.parameters[0].log",
            "positive min",
        ),
        (
            {"path": "hyperparameters.learningRate", "type": "float", "min": 0.1, "max": 3.0},
            "spec.parameters[0]",
            "the value 3.0 does not suit the template: hyperparameters.learningRate",
        ),
        (
            {"path": "method.lora.r", "type": "categorical", "values": [8, 0]},
            "spec.parameters[0]",
            "the value 0 does not suit",
        ),
        (
            {"path": "hyperparameters.lrScheduler", "type": "categorical", "values": ["cosine", "cosyne"]},
            "spec.parameters[0]",
            "'cosyne' does not suit",
        ),
        (
            {"path": "hyperparameters.lrScheduler", "type": "float", "min": 1, "max": 2},
            "spec.parameters[0]",
            "not a number",
        ),
        (
            {"path": "method.lora.r", "type": "float", "min": 1, "max": 2},
            "spec.parameters[0]",
            "integer field; use type int",
        ),
        (
            {"path": "method.lora.r", "type": "categorical"},
            "spec.parameters[0]",
            "categorical takes values",
        ),
        (
            {"path": "method.lora.r", "type": "int", "min": 4, "max": 16, "values": [8]},
            "spec.parameters[0]",
            "not values",
        ),
    ],
)
def test_an_invalid_parameter_is_rejected_naming_it(parameter: dict[str, Any], path: str, says: str) -> None:
    errors = errors_of([parameter])
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: "), errors[0]
    assert says in errors[0], errors[0]


def test_a_field_the_template_lacks_is_checked_with_the_template_rules() -> None:
    errors = errors_of(
        [{"path": "method.lora.r", "type": "int", "min": 2, "max": 8}],
        template={**SWEEP["spec"]["template"], "method": {"type": "full"}},
    )
    assert errors == [
        "spec.parameters[0]: method.lora.r: the value 2 does not suit the template: method: lora and mergeAdapter are only allowed with method type lora"
    ]


def test_every_learning_field_may_vary_and_nothing_outside_method_and_hyperparameters() -> None:
    assert {
        "hyperparameters.learningRate",
        "hyperparameters.perDeviceBatchSize",
        "hyperparameters.warmupSteps",
        "hyperparameters.weightDecay",
        "hyperparameters.epochs",
        "method.lora.r",
        "method.lora.alpha",
        "method.lora.dropout",
    } <= set(TUNABLE_PATHS)
    assert {p.split(".")[0] for p in TUNABLE_PATHS} == {"method", "hyperparameters"}


def test_the_example_and_a_valid_space_pass() -> None:
    assert errors_of(SWEEP["spec"]["parameters"]) == []


def test_a_suspended_template_is_refused_for_the_sweeps_own_suspend() -> None:
    errors = errors_of(SWEEP["spec"]["parameters"], template={**SWEEP["spec"]["template"], "suspend": True})
    assert len(errors) == 1, errors
    assert "template.suspend" in errors[0], errors[0]
    assert "the sweep's suspend" in errors[0], errors[0]
    assert errors_of(SWEEP["spec"]["parameters"], suspend=True, activeDeadlineSeconds=600) == []


def test_a_started_sweep_keeps_its_template_and_search_but_takes_more_trials() -> None:
    """A study compares its trials; promote serves with the storage its trials were allowed."""
    old = FineTuneSweep.model_validate(edited(SWEEP, status={"startTime": "2025-01-01T00:00:00Z"}))
    for change in (
        {"spec__template__storage__secretRef": {"name": "other-keys"}},
        {"spec__template__hyperparameters__maxSteps": 900},
        {"spec__objective": {"metric": "accuracy", "direction": "maximize"}},
        {"spec__algorithm": {"type": "random", "seed": 1}},
    ):
        with pytest.raises(ValueError, match="cannot change once the sweep has started; create a new sweep"):
            FineTuneSweep.model_validate(edited(SWEEP, **change)).check_update(old)
    FineTuneSweep.model_validate(edited(SWEEP, spec__maxTrials=40, spec__parallelism=3)).check_update(old)
    FineTuneSweep.model_validate(edited(SWEEP, spec__promote={"enabled": True})).check_update(old)
    # Before its first trial, any valid edit.
    not_started = FineTuneSweep.model_validate(SWEEP)
    FineTuneSweep.model_validate(edited(SWEEP, spec__template__hyperparameters__maxSteps=900)).check_update(
        not_started
    )
