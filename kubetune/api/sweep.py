"""FineTuneSweep (kubetune.io/v1alpha1): a hyperparameter search whose trials are FineTuneJobs.

The search space is checked against the template's own schema: a parameter names a field of the
template by its dotted camelCase path, only fields that change how a run learns may vary (not
where it reads or writes), and every bound and value is applied to the template and validated by
the FineTuneJob model itself, so a value the trial would refuse is refused here, naming the
parameter. What CEL can express (the shape of each parameter) is also a CRD rule; the checks that
need the template's model run in ``kubetune validate`` and in the operator, which fails the sweep
with reason InvalidSpec.
"""

from __future__ import annotations

import copy
import enum
import types
import typing
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from kubetune.api.base import DNS_LABEL_PATTERN, STRICT, WHOLE_FLOAT, Bool, CelRule, Float, Int, KubeModel
from kubetune.api.resources import (
    MAX_NAME_LENGTH,
    TRAINING_FIELDS,
    FineTuneJobSpec,
    KubetuneResource,
    immutable_rule,
    name_rules,
)
from kubetune.api.spec import Serve, Tracking
from kubetune.api.status import Condition, Phase, ServingStatus

# Trials are FineTuneJobs named <sweep>-t<N> (N <= 9999), whose own children must stay DNS labels.
MAX_TRIALS = 9999
MAX_SWEEP_NAME_LENGTH = MAX_NAME_LENGTH["FineTuneJob"] - len(f"-t{MAX_TRIALS}")

# Only these parts of the template may vary: they decide how a trial learns. The data, the model,
# the output (each trial writes under <output>/trials/<N>/), storage, placement and serving are
# the sweep's and shared by every trial, so comparing trials compares hyperparameters alone.
TUNABLE_ROOTS = ("method", "hyperparameters")


def _leaf_type(annotation: Any) -> Any:
    """The scalar type of a field (``int | None`` -> int), or None for objects and collections."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _leaf_type(args[0]) if len(args) == 1 else None
    if typing.get_origin(annotation) is Annotated:
        return _leaf_type(args[0])
    if isinstance(annotation, type) and issubclass(annotation, KubeModel):
        return annotation
    if annotation in (int, float, bool) or (
        isinstance(annotation, type) and issubclass(annotation, enum.Enum)
    ):
        return annotation
    return None


def _tunable_fields(model: type[KubeModel], prefix: str, snake: str) -> dict[str, str]:
    """camelCase path -> snake_case path of every scalar field under ``model``."""
    found: dict[str, str] = {}
    for name, info in model.model_fields.items():
        leaf = _leaf_type(info.annotation)
        path, snake_path = f"{prefix}.{to_camel(name)}", f"{snake}.{name}"
        if isinstance(leaf, type) and issubclass(leaf, KubeModel):
            found |= _tunable_fields(leaf, path, snake_path)
        elif leaf is not None:
            found[path] = snake_path
    return found


# Fields under the tunable roots that say how a trial is measured or written, not how it learns:
# trials compared on different evaluation steps could not be compared (or pruned) at all.
FIXED_PATHS = (
    "hyperparameters.evalEverySteps",
    "hyperparameters.loggingEverySteps",
    "method.mergeAdapter",
)

TUNABLE_PATHS: dict[str, str] = {
    path: snake
    for root in TUNABLE_ROOTS
    for path, snake in _tunable_fields(
        typing.cast(type[KubeModel], _leaf_type(FineTuneJobSpec.model_fields[root].annotation)), root, root
    ).items()
    if path not in FIXED_PATHS
}
"""Every field a parameter may vary, camelCase (``method.lora.r``) to the model's snake_case."""


def field_info(path: str) -> FieldInfo:
    """The pydantic field a tunable path names."""
    model: Any = FineTuneJobSpec
    info: FieldInfo | None = None
    for part in TUNABLE_PATHS[path].split("."):
        info = model.model_fields[part]
        model = _leaf_type(info.annotation)
    assert info is not None
    return info


def _check_path(path: str) -> str:
    if path in TUNABLE_PATHS:
        return path
    root = path.split(".", 1)[0]
    if path in FIXED_PATHS:
        why = "it says how a trial is evaluated or written, which every trial must share to be compared"
    elif root in FineTuneJobSpec.model_json_schema(by_alias=True)["properties"] and root not in TUNABLE_ROOTS:
        why = (
            f"{root} may not vary between trials: it is shared by every trial (the output of trial N "
            "is <output>/trials/N/), so only method and hyperparameters fields are searched"
        )
    else:
        why = "it is not a scalar field of the template (FineTuneJob spec)"
    raise PydanticCustomError("parameter_path", "{why}", {"why": why})


ParameterPath = Annotated[
    str,
    AfterValidator(_check_path),
    WithJsonSchema({"type": "string", "enum": sorted(TUNABLE_PATHS)}),
]


class ParameterType(StrEnum):
    float = "float"
    int = "int"
    categorical = "categorical"


Value = Annotated[
    StrictBool | StrictInt | StrictFloat | StrictStr,
    WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True}),
]


class Parameter(KubeModel):
    """One dimension of the search space: a field of the template and the values it may take."""

    path: ParameterPath = Field(
        description="Dotted camelCase path of a template field under method or hyperparameters, e.g. "
        "hyperparameters.learningRate or method.lora.r."
    )
    type: ParameterType = Field(
        description="float or int: a range from min to max; categorical: one of values."
    )
    min: Float | None = Field(None, description="Lowest value (float and int).")
    max: Float | None = Field(None, description="Highest value (float and int).")
    step: Annotated[Float, Field(gt=0)] | None = Field(
        None, description="Spacing of the values from min (float and int; grid search needs it for float)."
    )
    log: Bool = Field(False, description="Sample on a log scale (min must be positive; not with step).")
    values: list[Value] | None = Field(
        None, min_length=1, max_length=256, description="The values to choose from (categorical)."
    )

    cel_rules = (
        # Whether values is set is checked by _values_only_for_categorical, not here: its items are
        # untyped (numbers, strings or booleans), and the API server gives CEL no view of a field
        # with untyped items, so a rule naming self.values does not compile there.
        CelRule(
            "self.type == 'categorical' ? !has(self.min) && !has(self.max) && !has(self.step) && !self.log"
            " : has(self.min) && has(self.max)",
            "categorical takes values only; float and int take min and max (and step or log)",
            lambda p: (
                p.min is None and p.max is None and p.step is None and not p.log
                if p.type == ParameterType.categorical
                else p.min is not None and p.max is not None
            ),
            field="type",
        ),
        CelRule(
            "!has(self.min) || !has(self.max) || self.min < self.max",
            "min must be lower than max",
            lambda p: p.min is None or p.max is None or p.min < p.max,
            field="max",
        ),
        CelRule(
            "!self.log || (has(self.min) && self.min > 0.0 && !has(self.step))",
            "log needs a positive min and no step",
            lambda p: not p.log or (p.min is not None and p.min > 0 and p.step is None),
            field="log",
        ),
        CelRule(
            "self.type != 'int' || ((!has(self.min) || self.min == double(int(self.min))) && "
            "(!has(self.max) || self.max == double(int(self.max))) && "
            "(!has(self.step) || self.step == double(int(self.step))))",
            "an int parameter takes whole numbers for min, max and step",
            lambda p: (
                p.type != ParameterType.int
                or all(v is None or float(v).is_integer() for v in (p.min, p.max, p.step))
            ),
            field="min",
        ),
    )

    @model_validator(mode="after")
    def _values_only_for_categorical(self) -> Parameter:
        if (self.type == ParameterType.categorical) != (self.values is not None):
            raise PydanticCustomError(
                "parameter_values", "categorical takes values; float and int take min and max, not values"
            )
        return self

    def candidates(self) -> list[Any]:
        """The values whose validity decides the parameter's: both ends of a range (an int range
        as integers), or every categorical value."""
        if self.type == ParameterType.categorical:
            return list(self.values or [])
        ends = [self.min, self.max]
        return [int(v) for v in ends if v is not None] if self.type == ParameterType.int else ends


class ObjectiveDirection(StrEnum):
    minimize = "minimize"
    maximize = "maximize"


class Objective(KubeModel):
    """What the sweep optimises: an evaluation metric the trials report."""

    metric: str = Field(
        "eval_loss",
        pattern=r"^[A-Za-z0-9_./-]+$",
        max_length=128,
        description="eval_loss, or a metric the runtime reports in status.progress.metrics "
        "(accuracy, f1_macro, perplexity...).",
    )
    direction: ObjectiveDirection = Field(ObjectiveDirection.minimize, description="minimize or maximize.")


class AlgorithmType(StrEnum):
    tpe = "tpe"
    random = "random"
    grid = "grid"
    cmaes = "cmaes"


class Algorithm(KubeModel):
    """How the next trial's parameters are chosen (Optuna samplers)."""

    type: AlgorithmType = Field(
        AlgorithmType.tpe,
        description="tpe: tree-structured Parzen estimator; random; grid: every combination once "
        "(float parameters need step); cmaes: CMA-ES over the float and int parameters (categorical "
        "ones are drawn at random, as CMA-ES has no notion of them; it needs at least one number, "
        "and learns per generation of 4+3ln(n) trials for n numbers, so give it several).",
    )
    seed: Int = Field(
        0, ge=0, le=2**31 - 1, description="Seed: the same seed and results give the same trials."
    )


class EarlyStoppingType(StrEnum):
    none = "none"
    median = "median"
    successive_halving = "successiveHalving"
    hyperband = "hyperband"


class EarlyStopping(KubeModel):
    """Stopping trials that are doing worse than others (Optuna pruners), from the evaluations each
    trial reports; a stopped trial ends with reason Pruned and keeps its checkpoints."""

    type: EarlyStoppingType = Field(
        EarlyStoppingType.none,
        description="none; median: stop a trial whose evaluation is worse than the median of earlier "
        "trials at the same step; successiveHalving or hyperband: keep the best fraction at each rung.",
    )
    startup_trials: Int = Field(
        2, ge=0, le=MAX_TRIALS, description="Trials that finish before any trial is stopped (median)."
    )
    warmup_steps: Int = Field(
        0, ge=0, le=100_000_000, description="Steps of a trial before it may be stopped (median)."
    )
    min_resource: Int = Field(
        1, ge=1, le=100_000_000, description="Steps of the first rung (successiveHalving, hyperband)."
    )
    reduction_factor: Int = Field(
        3,
        ge=2,
        le=100,
        description="1/reductionFactor of trials go on at each rung (successiveHalving, hyperband).",
    )


class Promote(Serve):
    """Serving of the best trial's model once the sweep succeeds, with a FineTuneJob's serving
    options (the template's own serve is ignored: trials are compared, not served)."""

    enabled: Bool = Field(False, description="Serve the best trial's model when the sweep succeeds.")


class FineTuneSweepSpec(KubeModel):
    """A hyperparameter search over a FineTuneJob template."""

    template: FineTuneJobSpec = Field(
        description="The FineTuneJob spec every trial starts from; trial N writes under <output>/trials/N/."
    )
    parameters: list[Parameter] = Field(
        min_length=1,
        max_length=32,
        description="The search space: one entry per template field that varies.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["path"]},
    )
    objective: Objective = Field(default_factory=Objective, description="The metric to optimise.")
    algorithm: Algorithm = Field(default_factory=Algorithm, description="The search algorithm.")
    max_trials: Int = Field(10, ge=1, le=MAX_TRIALS, description="Trials to run in all.")
    parallelism: Int = Field(1, ge=1, le=1000, description="Trials running at once.")
    max_failed_trials: Int = Field(
        3, ge=0, le=MAX_TRIALS, description="Failed trials (not counting pruned ones) before the sweep fails."
    )
    early_stopping: EarlyStopping = Field(
        default_factory=EarlyStopping, description="Stopping poor trials early."
    )
    suspend: Bool = Field(
        False,
        description="Suspend the sweep: no new trials, and its unfinished trials are suspended (each "
        "continues from its last checkpoint when this is false again); the deadline clock pauses.",
    )
    queue_name: str | None = Field(
        None,
        pattern=DNS_LABEL_PATTERN,
        max_length=63,
        description="Kueue LocalQueue of every trial (each trial is admitted on its own); overrides "
        "the template's queueName.",
    )
    active_deadline_seconds: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None,
        description="Fail the sweep with reason DeadlineExceeded after this long running (paused while "
        "suspended); its unfinished trials are stopped with the same reason, their checkpoints kept.",
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=2**31 - 1), WHOLE_FLOAT, STRICT] | None = Field(
        None,
        description="Delete the sweep's trials (FineTuneJobs) this long after it finishes; the sweep, "
        "its trials table, its serving and every artifact are kept.",
    )
    promote: Promote = Field(default_factory=Promote, description="Serving of the best trial's model.")
    tracking: Tracking | None = Field(
        None,
        description="Experiment tracking of the sweep: a parent MLflow run (search space, best trial) "
        "with one child run per trial; every trial logs to it (instead of the template's tracking, "
        "which trials inherit when this is unset). The experiment defaults to <namespace>/<sweep>.",
    )

    cel_rules = (
        CelRule(
            "self.algorithm.type != 'grid' || self.parameters.all(p, p.type != 'float' || has(p.step))",
            "grid search needs step on every float parameter",
            lambda s: (
                s.algorithm.type != AlgorithmType.grid
                or all(p.type != ParameterType.float or p.step is not None for p in s.parameters)
            ),
            field="parameters",
        ),
        CelRule(
            "self.algorithm.type != 'cmaes' || self.parameters.exists(p, p.type != 'categorical')",
            "cmaes searches float and int parameters; with only categorical ones use tpe, random or grid",
            lambda s: (
                s.algorithm.type != AlgorithmType.cmaes
                or any(p.type != ParameterType.categorical for p in s.parameters)
            ),
            field="parameters",
        ),
    )

    @model_validator(mode="after")
    def _check_against_template(self) -> FineTuneSweepSpec:
        if self.template.suspend:
            raise PydanticCustomError(
                "template_suspend",
                "template.suspend: a sweep suspends its trials itself; set the sweep's suspend instead",
            )
        for index, parameter in enumerate(self.parameters):
            problem = parameter_problem(self.template, parameter)
            if problem is not None:
                raise PydanticCustomError(
                    "search_space",
                    "parameters[{index}] ({path}): {problem}",
                    {"index": index, "path": parameter.path, "problem": problem},
                )
        return self


def with_value(template: FineTuneJobSpec, path: str, value: Any) -> dict[str, Any]:
    """The template's wire form with the field at camelCase ``path`` set to ``value`` (objects on
    the way created empty, so their defaults apply)."""
    wire = copy.deepcopy(template.to_wire())
    node = wire
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return wire


def parameter_problem(template: FineTuneJobSpec, parameter: Parameter) -> str | None:
    """Why ``parameter`` cannot vary the template as it says, or None: its type must suit the
    field, and every candidate value, set into the template, must give a valid FineTuneJob spec."""
    leaf = _leaf_type(field_info(parameter.path).annotation)
    if parameter.type != ParameterType.categorical and leaf not in (int, float):
        return f"{parameter.path} is not a number; use type categorical with values"
    if parameter.type == ParameterType.float and leaf is int:
        return f"{parameter.path} is an integer field; use type int"
    for value in parameter.candidates():
        try:
            FineTuneJobSpec.model_validate(with_value(template, parameter.path, value))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(to_camel(str(p)) for p in error["loc"])
            return f"the value {value!r} does not suit the template: {where}: {error['msg']}"
    return None


class TrialState(StrEnum):
    pending = "Pending"
    running = "Running"
    complete = "Complete"
    pruned = "Pruned"
    failed = "Failed"

    @property
    def finished(self) -> bool:
        return self in (TrialState.complete, TrialState.pruned, TrialState.failed)


class Evaluation(KubeModel):
    """One evaluation of a trial: the objective at a step."""

    step: int = Field(ge=0, description="Optimizer step of the evaluation.")
    objective: float = Field(description="The objective metric's value.")


class TrialStatus(KubeModel):
    """One row of the trials table."""

    number: int = Field(ge=0, description="Trial number; its FineTuneJob is <sweep>-t<number>.")
    name: str = Field(description="The trial's FineTuneJob.")
    parameters: Annotated[
        dict[str, Value], WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    ] = Field(description="The values of the search space's parameters, by path.")
    state: TrialState = Field(description="Pending, Running, Complete, Pruned or Failed.")
    objective: float | None = Field(None, description="Latest (final, once Complete) objective value.")
    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    model_uri: str | None = Field(None, description="The trial's model (once Complete).")
    evaluations: list[Evaluation] | None = Field(
        None,
        max_length=64,
        description="The objective at each evaluated step, oldest first (the pruners' history; a "
        "trial reports only its latest evaluation).",
    )


class TrialCounts(KubeModel):
    """How many trials are in each state."""

    created: int = Field(0, ge=0, description="Trials created.")
    running: int = Field(0, ge=0, description="Trials pending or running.")
    complete: int = Field(0, ge=0, description="Trials that completed.")
    pruned: int = Field(0, ge=0, description="Trials stopped early.")
    failed: int = Field(0, ge=0, description="Trials that failed.")


class FineTuneSweepStatus(KubeModel):
    """Observed state of a FineTuneSweep."""

    phase: Phase | None = Field(None, description="Pending, Running, Succeeded or Failed.")
    message: str | None = Field(None, description="One-line summary of the current state.")
    conditions: list[Condition] | None = Field(
        None,
        description="Observations of the sweep's state, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(None, ge=0, description="Spec generation the status reflects.")
    start_time: str | None = Field(None, description="When the first trial was created (RFC 3339).")
    completion_time: str | None = Field(None, description="When the sweep finished (RFC 3339).")
    trials_done: str | None = Field(None, description="Finished trials / maxTrials, e.g. 3/10.")
    counts: TrialCounts | None = Field(None, description="Trials by state.")
    trials: list[TrialStatus] | None = Field(None, description="Every trial, by number.")
    best_trial: TrialStatus | None = Field(None, description="The completed trial with the best objective.")
    serving: ServingStatus | None = Field(
        None, description="The serving of the best trial's model (promote), once the sweep succeeded."
    )


class FineTuneSweep(KubetuneResource):
    """Searches a FineTuneJob's hyperparameters: trials are FineTuneJobs, poor ones stop early."""

    kind_name: ClassVar[str] = "FineTuneSweep"
    plural: ClassVar[str] = "finetunesweeps"
    short_name: ClassVar[str] = "fts"

    kind: Literal["FineTuneSweep"]
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None

    cel_rules = name_rules("FineTuneSweep", MAX_SWEEP_NAME_LENGTH, "<name>-t9999-train-r1000-1023")

    # A study compares its trials: one whose template, search space, objective or algorithm changed
    # midway compares runs of different jobs. The template's fields are the ones a started
    # FineTuneJob keeps (its storage among them: promote serves with the Secret the trials were
    # allowed).
    update_rules = (
        immutable_rule(
            FineTuneSweepSpec,
            (*(f"template.{f}" for f in TRAINING_FIELDS), "parameters", "objective", "algorithm"),
            noun="sweep",
            may_change="maxTrials, parallelism, maxFailedTrials, earlyStopping, suspend, deadlines, TTL, "
            "promote and tracking may change",
        ),
    )
