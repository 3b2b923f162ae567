"""The memory plan against real runs, and the validation step refusing a job that cannot fit.

**What is compared.** A real fine-tuning process (``kubetune.trainer finetune``, DeepSpeed on CPU,
one process, fp32) is started by a probe that takes the baseline when the runtime starts loading
the model (its first ``from_pretrained``, after the imports, the tokenizer, the data and the
training arguments): it resets the kernel's resident-set high-water mark there
(``/proc/self/clear_refs``, "5") and reads it (``VmHWM``). On CPU that baseline (about 1.2 GiB of
Python, torch, transformers and DeepSpeed) is larger than the tiny models' states, so it is
subtracted. When the run ends the probe reads the high-water mark again. The peak above the
baseline is compared with what the estimate models: parameters, gradients, optimizer states,
DeepSpeed's host buffer factor, activations and logits, i.e. everything but the fixed runtime
allowance. Two model sizes (10.8 and 24 million parameters, large enough that the allocator's and
the Trainer's own few tens of MiB do not dominate) and ZeRO stages 0 and 2 must agree within 30 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.api.resources import FineTuneJob
from kubetune.run import memory
from kubetune.run.plan import RunPlan, plan_finetune
from kubetune.trainer.tinymodel import build_tiny_causal_lm
from tests.integration.test_finetune_support import (
    RUN_TIMEOUT_S,
    alphabet_texts,
    trainer_env,
    write_jsonl,
    write_plan,
)

pytestmark = [pytest.mark.integration]

PROBE = """
import json, sys
import deepspeed, deepspeed.ops, peft, torch, transformers, transformers.trainer
from kubetune.trainer import checkpoint, finetune, outputs, preference, progress, tracking, training, usage
from kubetune.trainer.data import collation, formats

def status(key):
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024

# The baseline is taken when the runtime starts loading the model: the high-water mark starts
# again from what is resident then (imports, tokenizer, data, training arguments).
marks = {}
load = transformers.PreTrainedModel.from_pretrained.__func__

def from_pretrained(cls, *args, **kwargs):
    if "baseline" not in marks:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        marks["baseline"] = status("VmHWM")
    return load(cls, *args, **kwargs)

transformers.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
code = finetune.main(["--plan", sys.argv[1], "--scratch-dir", sys.argv[2]])
print("MEMORY-PROBE " + json.dumps({"baseline": marks["baseline"], "peak": status("VmHWM"), "code": code}))
"""


def measured_run(tmp: Path, *, hidden: int, layers: int, stage: int) -> tuple[int, memory.MemoryPlan]:
    """(peak resident bytes above the baseline, the estimate) of one real training process."""
    texts = alphabet_texts(32)
    model = build_tiny_causal_lm(
        tmp / "base",
        texts,
        vocab_size=300,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=4,
        max_position=64,
    )
    data = write_jsonl(tmp / "train.jsonl", [{"text": t} for t in texts])
    plan_path = write_plan(
        tmp / "plan.json",
        model_uri=model.as_uri(),
        train_uri=data.as_uri(),
        output_uri=(tmp / "out").as_uri(),
        deepspeed={"zeroStage": stage},
        processes=1,
        hyperparameters={"maxSteps": 2, "perDeviceBatchSize": 4, "maxSeqLength": 64},
        checkpoint={"everySteps": 1000, "keepLast": 1},
    )
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(plan_path), str(tmp / "scratch")],
        env=trainer_env(tmp),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("MEMORY-PROBE ")]
    assert lines, f"exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    probe = json.loads(lines[0].removeprefix("MEMORY-PROBE "))
    assert probe["code"] == 0, result.stderr[-6000:]
    plan = RunPlan.from_file(plan_path)
    shape = memory.ModelShape.from_config(json.loads((model / "config.json").read_text()))
    return probe["peak"] - probe["baseline"], memory.estimate(shape, memory.setup_of(plan))


@pytest.mark.slow
@pytest.mark.parametrize(("hidden", "layers", "stage"), [(512, 4, 0), (512, 4, 2), (768, 4, 0), (768, 4, 2)])
def test_the_estimate_is_within_30_percent_of_the_measured_peak(
    tmp_path: Path, hidden: int, layers: int, stage: int
) -> None:
    measured, estimate = measured_run(tmp_path, hidden=hidden, layers=layers, stage=stage)
    modelled = estimate.modelled("host")
    assert estimate.total("device") == 0  # a CPU run: everything is host memory
    assert measured == pytest.approx(modelled, rel=0.3), (
        f"measured {measured / 2**20:.0f} MiB above the baseline, estimated {modelled / 2**20:.0f} MiB\n"
        + memory.render_table(estimate, [])
    )


# --- the validation step refuses what cannot fit -------------------------------------------------


def validation_plan(tmp: Path, model: Path, *, limit: str, annotations: dict[str, str] | None = None) -> Path:
    data = write_jsonl(tmp / "train.jsonl", [{"text": t} for t in alphabet_texts(16)])
    metadata: dict[str, Any] = {"name": "tight", "namespace": "ml", "annotations": annotations or {}}
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": metadata,
            "spec": {
                "model": {"uri": model.as_uri()},
                "dataset": {"train": {"uri": data.as_uri()}},
                "output": {"uri": (tmp / "out").as_uri()},
                "method": {"type": "full"},
                "hyperparameters": {"maxSteps": 4, "perDeviceBatchSize": 4, "maxSeqLength": 32},
                "resources": {"processesPerWorker": 2, "limits": {"memory": limit}},
            },
        }
    )
    path = tmp / "plan.json"
    path.write_text(plan_finetune(job).to_json())
    return path


def run_validate(plan: Path, tmp: Path) -> tuple[int, str, str]:
    termination = tmp / "termination-log"
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(termination), "KUBETUNE_SCRATCH_DIR": str(tmp)}
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "validate", "--plan", str(plan)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result.returncode, result.stdout, termination.read_text() if termination.exists() else ""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", alphabet_texts(32), vocab_size=300)


def test_a_job_over_its_memory_limit_fails_validation_with_will_not_fit_and_the_numbers(
    tmp_path: Path, tiny_model: Path
) -> None:
    code, stdout, message = run_validate(validation_plan(tmp_path, tiny_model, limit="600Mi"), tmp_path)
    assert code == 2, stdout
    # Two processes share the pod's limit, each needing at least the runtime's 512 MiB.
    assert message.startswith("WillNotFit: each pod needs 2 processes x 5"), message
    assert "of host memory, limit 600Mi: DOES NOT FIT (per process: parameters " in message
    assert "runtime 512.0 MiB" in message
    assert "a higher resources.limits.memory" in message
    assert "memory plan:" in stdout
    assert "optimizer states   host" in stdout


def test_the_annotation_lets_an_expert_run_it_anyway(tmp_path: Path, tiny_model: Path) -> None:
    plan = validation_plan(
        tmp_path, tiny_model, limit="600Mi", annotations={"kubetune.io/skip-memory-check": "true"}
    )
    code, stdout, message = run_validate(plan, tmp_path)
    assert code == 0, stdout
    assert message.startswith("validation passed"), message
    assert "the memory plan says it will not fit, check skipped by the annotation" in stdout
