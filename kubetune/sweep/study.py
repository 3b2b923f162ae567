"""The Optuna study of a sweep, rebuilt in memory from its trials at every decision.

No database: the trials (FineTuneJobs) carry their number and parameters, and their reported
evaluations are the intermediate values. Rebuilding replays them in number order into a fresh
in-memory study, so after an operator restart the numbering continues where the children say it
stands and no number is asked for twice. The sampler is seeded from the sweep's seed *and the
trial number*: the parameters of trial N depend only on the seed and on the trials before it as
recorded, not on how many decisions (or operator processes) came before, so the search continues
exactly as it would have without the restart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.pruners import BasePruner, HyperbandPruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, CmaEsSampler, GridSampler, RandomSampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from kubetune.api.sweep import (
    AlgorithmType,
    EarlyStoppingType,
    FineTuneSweepSpec,
    ObjectiveDirection,
    TrialState,
)
from kubetune.sweep.space import distributions, grid, grid_size

# Optuna logs every trial it is told about at INFO; a rebuild tells it the whole history each time.
optuna.logging.set_verbosity(optuna.logging.WARNING)

# Hyperband assigns trials to brackets by hashing the study name with the trial number; a fixed
# name keeps that assignment the same in every rebuild.
STUDY_NAME = "kubetune-sweep"


@dataclass(frozen=True)
class TrialRecord:
    """What a sweep knows of one trial, as recorded on its FineTuneJob."""

    number: int
    params: Mapping[str, Any]
    state: TrialState
    intermediate: Mapping[int, float] = field(default_factory=dict)
    """Objective value reported at each evaluated step."""
    value: float | None = None
    """The final objective value, once Complete."""
    total_steps: int | None = None
    """The step its training ends at, once reported: a trial evaluated there is saving its model,
    with nothing left to save by stopping it, so it is never pruned."""


def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for trial ``number``: distinct per trial, the same in every rebuild."""
    return (seed * 1_000_003 + number * 7_919) % 2**32


def sampler_for(spec: FineTuneSweepSpec, number: int) -> BaseSampler:
    algorithm = spec.algorithm
    seed = trial_seed(algorithm.seed, number)
    if algorithm.type == AlgorithmType.random:
        return RandomSampler(seed=seed)
    if algorithm.type == AlgorithmType.grid:
        # Grid point N is trial N of one permutation of the grid, fixed by the sweep's own seed.
        return GridSampler(grid(spec), seed=algorithm.seed)
    if algorithm.type == AlgorithmType.cmaes:
        # CMA-ES keeps its state (mean, covariance, generation) in the system attributes of the
        # trials it samples; the rebuild asks every recorded trial again in number order, so the
        # state is recomputed from the records, and the seed per trial number fixes each draw.
        # It searches the float and int parameters; categorical ones are drawn by its seeded
        # independent sampler, RandomSampler, as are all of them until the first trial completes.
        # That is the documented behaviour of algorithm.type cmaes, so Optuna's warning about it,
        # which every rebuild would repeat, is turned off.
        return CmaEsSampler(
            seed=seed,
            independent_sampler=RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
    return TPESampler(seed=seed)


def pruner_for(spec: FineTuneSweepSpec) -> BasePruner:
    stopping = spec.early_stopping
    if stopping.type == EarlyStoppingType.median:
        return MedianPruner(n_startup_trials=stopping.startup_trials, n_warmup_steps=stopping.warmup_steps)
    if stopping.type == EarlyStoppingType.successive_halving:
        return SuccessiveHalvingPruner(
            min_resource=stopping.min_resource, reduction_factor=stopping.reduction_factor
        )
    if stopping.type == EarlyStoppingType.hyperband:
        return HyperbandPruner(min_resource=stopping.min_resource, reduction_factor=stopping.reduction_factor)
    return NopPruner()


def _direction(spec: FineTuneSweepSpec) -> StudyDirection:
    if spec.objective.direction == ObjectiveDirection.maximize:
        return StudyDirection.MAXIMIZE
    return StudyDirection.MINIMIZE


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> None:
    if isinstance(distribution, FloatDistribution):
        trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    elif isinstance(distribution, IntDistribution):
        trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    else:
        assert isinstance(distribution, CategoricalDistribution), distribution
        trial.suggest_categorical(name, distribution.choices)


def _ask(study: optuna.Study, space: Mapping[str, BaseDistribution]) -> optuna.Trial:
    """``study.ask(space)``, except that the sampler's relative sampling runs for an enqueued
    (replayed) trial too. Optuna skips it when every parameter is fixed, but CMA-ES records its
    generation and state on each trial it samples that way; without it a rebuilt study would hold
    no generation and CMA-ES would draw every trial from its initial distribution."""
    trial = study.ask()
    _ = trial.relative_params
    for name, distribution in space.items():
        _suggest(trial, name, distribution)
    return trial


def rebuild(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> optuna.Study:
    """A fresh study holding ``records`` as trials 0..N-1 (a missing number, a trial someone
    deleted, is a failed trial without parameters, so numbers stay aligned)."""
    study = optuna.create_study(
        study_name=STUDY_NAME,
        direction=_direction(spec),
        sampler=sampler_for(spec, 0),
        pruner=pruner_for(spec),
    )
    space = distributions(spec)
    by_number = {r.number: r for r in records}
    for number in range(max(by_number, default=-1) + 1):
        record = by_number.get(number)
        if record is None:
            study.add_trial(optuna.trial.create_trial(state=OptunaState.FAIL))
            continue
        study.sampler = sampler_for(spec, number)
        study.enqueue_trial(dict(record.params))
        trial = _ask(study, space)
        for step, value in sorted(record.intermediate.items()):
            trial.report(value, step)
            if record.state.finished:
                # Rung-based pruners record the rungs a trial reached as it reached them;
                # replaying those decisions restores what running trials are compared against.
                # A running trial is judged afterwards, against every finished one (to_prune).
                trial.should_prune()
        if record.state == TrialState.complete and record.value is not None:
            study.tell(trial, record.value)
        elif record.state == TrialState.pruned:
            study.tell(trial, state=OptunaState.PRUNED)
        elif record.state.finished:
            study.tell(trial, state=OptunaState.FAIL)
    return study


def next_number(records: Sequence[TrialRecord]) -> int:
    return max((r.number for r in records), default=-1) + 1


def exhausted(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> bool:
    """Whether no further trial may be created: maxTrials reached, or every grid point taken."""
    limit = spec.max_trials
    if spec.algorithm.type == AlgorithmType.grid:
        limit = min(limit, grid_size(spec))
    return next_number(records) >= limit


def next_parameters(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> dict[str, Any]:
    """The parameters of the next trial (number :func:`next_number`) given every trial so far."""
    number = next_number(records)
    study = rebuild(spec, records)
    study.sampler = sampler_for(spec, number)
    trial = _ask(study, distributions(spec))
    assert trial.number == number, (trial.number, number)
    return dict(trial.params)


def to_prune(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> list[int]:
    """Numbers of the running trials whose latest evaluation the pruner judges hopeless."""
    running = [
        r
        for r in records
        if not r.state.finished
        and r.intermediate
        and (r.total_steps is None or max(r.intermediate) < r.total_steps)
    ]
    if not running or spec.early_stopping.type == EarlyStoppingType.none:
        return []
    study = rebuild(spec, records)
    trials: list[FrozenTrial] = study.get_trials(deepcopy=False)
    return [r.number for r in running if study.pruner.prune(study, trials[r.number])]


def best(spec: FineTuneSweepSpec, records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The completed trial with the best objective (the lowest number among equals)."""
    done = [r for r in records if r.state == TrialState.complete and r.value is not None]
    if not done:
        return None
    sign = -1.0 if spec.objective.direction == ObjectiveDirection.maximize else 1.0
    return min(done, key=lambda r: (sign * (r.value or 0.0), r.number))
