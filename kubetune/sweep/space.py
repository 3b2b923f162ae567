"""The search space of a sweep as Optuna distributions, and a trial's FineTuneJob spec."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from kubetune.api.resources import FineTuneJobSpec
from kubetune.api.sweep import FineTuneSweepSpec, Parameter, ParameterType, with_value


def distribution(parameter: Parameter) -> BaseDistribution:
    if parameter.type == ParameterType.categorical:
        return CategoricalDistribution(list(parameter.values or []))
    assert parameter.min is not None
    assert parameter.max is not None
    if parameter.type == ParameterType.int:
        return IntDistribution(
            int(parameter.min), int(parameter.max), log=parameter.log, step=int(parameter.step or 1)
        )
    return FloatDistribution(parameter.min, parameter.max, log=parameter.log, step=parameter.step)


def distributions(spec: FineTuneSweepSpec) -> dict[str, BaseDistribution]:
    """Optuna's name for each parameter is its path."""
    return {p.path: distribution(p) for p in spec.parameters}


def grid(spec: FineTuneSweepSpec) -> dict[str, list[Any]]:
    """Every value of each parameter, for grid search (floats step from min to max)."""
    space: dict[str, list[Any]] = {}
    for p in spec.parameters:
        if p.type == ParameterType.categorical:
            space[p.path] = list(p.values or [])
            continue
        assert p.min is not None
        assert p.max is not None
        step = p.step or 1
        count = int((p.max - p.min) / step + 1e-9) + 1
        # Rounded so that min + k * step lands on the grid, never past max.
        values = [min(round(p.min + i * step, 12), p.max) for i in range(count)]
        space[p.path] = [round(v) for v in values] if p.type == ParameterType.int else values
    return space


def grid_size(spec: FineTuneSweepSpec) -> int:
    return len(list(itertools.product(*grid(spec).values())))


def trial_spec(spec: FineTuneSweepSpec, params: Mapping[str, Any], output_uri: str) -> FineTuneJobSpec:
    """The template with the trial's parameters set, its output under ``output_uri``, not served,
    and tracked where the sweep is (else where the template says)."""
    wire = spec.template.to_wire()
    for path, value in params.items():
        wire = with_value(FineTuneJobSpec.model_validate(wire), path, value)
    wire["output"] = {"uri": output_uri}
    # Trials are compared, not used: the sweep's promote serves the best one.
    wire.pop("serve", None)
    if spec.tracking is not None:
        wire["tracking"] = spec.tracking.to_wire()
    return FineTuneJobSpec.model_validate(wire)


def search_of(spec: FineTuneSweepSpec) -> dict[str, Any]:
    """What the sweep searches, as its trials carry it (``kubetune.io/sweep-search``, which the
    MLflow parent run of the sweep records): parameters, objective, algorithm and maxTrials."""
    wire = spec.to_wire()
    return {key: wire[key] for key in ("parameters", "objective", "algorithm", "maxTrials") if key in wire}


def trial_name(sweep: str, number: int) -> str:
    """Trial N of sweep S is the FineTuneJob S-tN."""
    return f"{sweep}-t{number}"


def trial_output(spec: FineTuneSweepSpec, number: int) -> str:
    """Trial N writes under <output>/trials/N/."""
    return f"{spec.template.output.uri.rstrip('/')}/trials/{number}"
