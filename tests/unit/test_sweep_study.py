"""The study of a sweep rebuilt from its trials: numbering, determinism, grid, pruning, best."""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.sweep import FineTuneSweep, FineTuneSweepSpec, TrialState
from kubetune.sweep import study
from kubetune.sweep.space import grid_size, trial_output, trial_spec
from kubetune.sweep.study import TrialRecord

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)
LR = "hyperparameters.learningRate"


def sweep(**spec: Any) -> FineTuneSweepSpec:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"].update(spec)
    return FineTuneSweep.model_validate(doc).spec


def complete(number: int, params: dict[str, Any], value: float) -> TrialRecord:
    return TrialRecord(number, params, TrialState.complete, {100: value + 1, 200: value}, value)


def run_sequentially(spec: FineTuneSweepSpec, count: int, batch: int) -> list[dict[str, Any]]:
    """Ask ``count`` trials, ``batch`` per decision, each decision from the records alone (as
    after a restart); every trial completes with an objective its learning rate decides."""
    records: list[TrialRecord] = []
    while len(records) < count:
        pending = []
        for _ in range(batch):
            number = study.next_number(records + pending)
            params = study.next_parameters(spec, records + pending)
            pending.append(TrialRecord(number, params, TrialState.running))
        records += [complete(r.number, dict(r.params), abs(r.params[LR] - 3e-4)) for r in pending]
    return [dict(r.params) for r in records[:count]]


def test_numbering_continues_from_the_children_and_skips_none() -> None:
    spec = sweep()
    records = [complete(0, {LR: 1e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 0}, 1.0)]
    records.append(
        TrialRecord(2, {LR: 2e-4, "method.lora.r": 16, "hyperparameters.warmupSteps": 25}, TrialState.running)
    )
    assert study.next_number(records) == 3
    # The missing trial 1 (deleted by someone) counts as failed; numbers stay aligned.
    rebuilt = study.rebuild(spec, records)
    assert [t.number for t in rebuilt.trials] == [0, 1, 2]
    assert [t.state.name for t in rebuilt.trials] == ["COMPLETE", "FAIL", "RUNNING"]


@pytest.mark.parametrize("algorithm", ["tpe", "random", "cmaes"])
def test_the_same_seed_and_history_give_the_same_trials_however_decisions_were_batched(
    algorithm: str,
) -> None:
    spec = sweep(algorithm={"type": algorithm, "seed": 3})
    one_at_a_time = run_sequentially(spec, 6, batch=1)
    assert run_sequentially(spec, 6, batch=1) == one_at_a_time
    assert len({p[LR] for p in one_at_a_time}) == 6  # no trial repeats another


def test_another_seed_gives_other_trials() -> None:
    assert run_sequentially(sweep(algorithm={"seed": 1}), 3, 1) != run_sequentially(
        sweep(algorithm={"seed": 2}), 3, 1
    )


def test_cmaes_learns_generation_by_generation_from_the_rebuilt_trials() -> None:
    """Each decision rebuilds the study from the records alone, as after a restart; CMA-ES still
    advances: its fourth generation (6 trials each for the two numbers) lies closer to the best
    learning rate and warmup than its first. The categorical rank is drawn at random."""
    spec = sweep(algorithm={"type": "cmaes", "seed": 0}, maxTrials=100)
    records: list[TrialRecord] = []
    for number in range(24):
        p = study.next_parameters(spec, records)
        distance = abs(math.log10(p[LR] / 3e-4)) + abs(p["hyperparameters.warmupSteps"] - 50) / 100
        records.append(TrialRecord(number, p, TrialState.complete, {}, distance))
    first, fourth = (statistics.median(r.value or 0.0 for r in records[g : g + 6]) for g in (0, 18))
    assert fourth < first / 2
    assert {r.params["method.lora.r"] for r in records} == {8, 16, 32}


def test_grid_takes_every_point_once_then_is_exhausted() -> None:
    spec = sweep(
        algorithm={"type": "grid", "seed": 5},
        parameters=[
            {"path": LR, "type": "float", "min": 1e-4, "max": 3e-4, "step": 1e-4},
            {"path": "method.lora.r", "type": "categorical", "values": [8, 16]},
        ],
        maxTrials=100,
    )
    assert grid_size(spec) == 6
    records: list[TrialRecord] = []
    while not study.exhausted(spec, records):
        params = study.next_parameters(spec, records)
        records.append(complete(study.next_number(records), params, 1.0))
    points = {(round(r.params[LR], 8), r.params["method.lora.r"]) for r in records}
    assert len(records) == 6
    assert points == {(lr, r) for lr in (1e-4, 2e-4, 3e-4) for r in (8, 16)}


def median_spec() -> FineTuneSweepSpec:
    return sweep(earlyStopping={"type": "median", "startupTrials": 2, "warmupSteps": 0})


def test_median_stops_a_trial_worse_than_earlier_ones_at_the_same_step() -> None:
    p = {LR: 1e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 0}
    done = [complete(0, p, 1.0), complete(1, p, 1.2)]  # at step 100: 2.0 and 2.2
    bad = TrialRecord(2, p, TrialState.running, {100: 3.0})
    good = TrialRecord(3, p, TrialState.running, {100: 1.5})
    assert study.to_prune(median_spec(), [*done, bad, good]) == [2]


def test_median_waits_for_its_startup_trials_and_none_never_stops() -> None:
    p = {LR: 1e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 0}
    bad = TrialRecord(1, p, TrialState.running, {100: 3.0})
    assert study.to_prune(median_spec(), [complete(0, p, 1.0), bad]) == []
    assert study.to_prune(sweep(), [complete(0, p, 1.0), complete(1, p, 1.0), bad]) == []


def test_successive_halving_compares_with_the_rungs_of_the_rebuilt_trials() -> None:
    spec = sweep(earlyStopping={"type": "successiveHalving", "minResource": 100, "reductionFactor": 2})
    p = {LR: 1e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 0}
    done = [complete(n, p, 1.0 + n / 10) for n in range(3)]  # rung 0 (step 100): 2.0, 2.1, 2.2
    assert study.to_prune(spec, [*done, TrialRecord(3, p, TrialState.running, {100: 5.0})]) == [3]
    assert study.to_prune(spec, [*done, TrialRecord(3, p, TrialState.running, {100: 1.0})]) == []


@pytest.mark.parametrize(("direction", "winner"), [("minimize", 1), ("maximize", 2)])
def test_best_is_the_completed_trial_with_the_best_objective(direction: str, winner: int) -> None:
    spec = sweep(objective={"metric": "eval_loss", "direction": direction})
    p = {LR: 1e-4}
    records = [
        complete(0, p, 0.5),
        complete(1, p, 0.2),
        complete(2, p, 0.9),
        TrialRecord(3, p, TrialState.pruned, {100: 0.01}),
        TrialRecord(4, p, TrialState.running, {100: 0.01}),
    ]
    best = study.best(spec, records)
    assert best is not None
    assert best.number == winner


def test_a_trial_spec_is_the_template_with_its_parameters_and_its_own_output() -> None:
    spec = sweep()
    trial = trial_spec(spec, {LR: 5e-5, "method.lora.r": 32}, trial_output(spec, 7))
    assert trial.hyperparameters.learning_rate == 5e-5
    assert trial.method.lora is not None
    assert trial.method.lora.r == 32
    assert trial.method.lora.alpha == 32
    assert trial.output.uri == "s3://runs/sweep-support-lora/trials/7"
    assert trial.dataset == spec.template.dataset


def run_with_curves(spec: FineTuneSweepSpec, steps: tuple[int, ...]) -> tuple[list[TrialRecord], int]:
    """A sweep played one trial at a time, every decision rebuilt from the records: each trial's
    objective at ``step`` is how far its learning rate is from 3e-4 (log scale) plus a term that
    shrinks with training, the same for all, so the order of trials never changes as they train.
    Returns the records and the trial-steps spent."""
    records: list[TrialRecord] = []
    spent = 0
    while not study.exhausted(spec, records):
        number = study.next_number(records)
        params = study.next_parameters(spec, records)
        final = abs(math.log(params[LR] / 3e-4))
        seen: dict[int, float] = {}
        state = TrialState.complete
        for step in steps:
            seen[step] = final + 1.0 / step
            spent += steps[0]
            running = TrialRecord(number, params, TrialState.running, dict(seen), total_steps=steps[-1])
            if number in study.to_prune(spec, [*records, running]):
                state = TrialState.pruned
                break
        value = seen[max(seen)] if state == TrialState.complete else None
        records.append(TrialRecord(number, params, state, dict(seen), value))
    return records, spent


@pytest.mark.parametrize("pruner", ["median", "successiveHalving"])
def test_pruning_spends_fewer_steps_and_finds_the_unpruned_sweeps_best(pruner: str) -> None:
    space = [{"path": LR, "type": "float", "min": 1e-5, "max": 1e-2, "log": True}]
    common: dict[str, Any] = {
        "parameters": space,
        "algorithm": {"type": "random", "seed": 3},
        "maxTrials": 10,
    }
    rungs = {"startupTrials": 2, "warmupSteps": 0, "minResource": 3, "reductionFactor": 2}
    steps = (3, 6, 9, 12)
    unpruned, full = run_with_curves(sweep(**common, earlyStopping={"type": "none"}), steps)
    pruned, cut = run_with_curves(sweep(**common, earlyStopping={"type": pruner, **rungs}), steps)

    assert [r.params for r in pruned] == [r.params for r in unpruned]  # same seed: same trials
    assert any(r.state == TrialState.pruned for r in pruned)
    assert all(max(r.intermediate) < steps[-1] for r in pruned if r.state == TrialState.pruned)
    best_unpruned = study.best(sweep(**common), unpruned)
    best_pruned = study.best(sweep(**common), pruned)
    assert best_unpruned is not None
    assert best_pruned is not None
    assert best_pruned.number == best_unpruned.number
    assert best_pruned.value == best_unpruned.value
    assert cut < full


def test_a_trial_evaluated_at_its_last_step_is_never_pruned() -> None:
    spec = sweep(earlyStopping={"type": "median", "startupTrials": 2, "warmupSteps": 0})
    params = {LR: 1e-4, "method.lora.r": 8, "hyperparameters.warmupSteps": 0}
    done = [complete(0, params, 1.0), complete(1, params, 1.2)]
    hopeless = {100: 9.0, 200: 9.0}
    midway = TrialRecord(2, params, TrialState.running, hopeless, total_steps=300)
    at_the_end = TrialRecord(2, params, TrialState.running, hopeless, total_steps=200)
    assert study.to_prune(spec, [*done, midway]) == [2]
    assert study.to_prune(spec, [*done, at_the_end]) == []  # it is saving its model already
