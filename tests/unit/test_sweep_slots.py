"""How many trials of a sweep local mode runs at once: ``parallelism``, bounded by the cores."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.sweep import FineTuneSweep, FineTuneSweepSpec
from kubetune.local.sweep import trial_slots

pytestmark = pytest.mark.unit

EXAMPLE = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "manifests/examples/sweep-lora.yaml").read_text()
)


def sweep(parallelism: int, workers: int = 1, processes: int = 1) -> FineTuneSweepSpec:
    doc: dict[str, Any] = copy.deepcopy(EXAMPLE)
    doc["spec"]["parallelism"] = parallelism
    doc["spec"]["template"]["resources"] = {"workers": workers, "processesPerWorker": processes}
    return FineTuneSweep.model_validate(doc).spec


def test_parallelism_that_fits_the_cores_is_kept_and_the_cores_are_shared() -> None:
    slots = trial_slots(sweep(parallelism=2), cores=8)
    assert (slots.trials, slots.cores_per_trial, slots.lowered) == (2, 4, None)


def test_parallelism_beyond_the_cores_is_lowered_and_says_why() -> None:
    slots = trial_slots(sweep(parallelism=4), cores=2)
    assert (slots.trials, slots.cores_per_trial) == (2, 1)
    assert slots.lowered == (
        "parallelism 4 lowered to 2: each trial runs 1 process and this machine has 2 cores"
    )


def test_a_trial_of_more_processes_than_cores_still_runs_one_at_a_time() -> None:
    slots = trial_slots(sweep(parallelism=3, workers=2, processes=2), cores=2)
    assert (slots.trials, slots.cores_per_trial) == (1, 2)
    assert slots.lowered is not None
    assert "each trial runs 4 processes" in slots.lowered


def test_on_gpus_each_trial_gets_gpus_of_its_own() -> None:
    slots = trial_slots(sweep(parallelism=4, processes=2), cores=16, gpus=["0", "1", "2", "3"])
    assert (slots.trials, slots.cores_per_trial) == (2, 8)
    assert slots.devices == ["0,1", "2,3"]
    assert slots.lowered == (
        "parallelism 4 lowered to 2: each trial runs 2 processes and this machine shows 4 GPUs"
    )


def test_one_gpu_runs_one_trial_at_a_time_on_it() -> None:
    slots = trial_slots(sweep(parallelism=2), cores=16, gpus=["3"])
    assert (slots.trials, slots.devices) == (1, ["3"])
    assert slots.lowered is not None
    assert slots.lowered.endswith("this machine shows 1 GPU")
