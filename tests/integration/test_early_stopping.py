"""Early stopping: a run that stops improving ends before maxSteps, and its model is the best step's.

The tiny model learns the alphabet forwards while it is evaluated on the alphabet backwards, so the
evaluation loss improves at first and then worsens: a plateau at a known step. The run is killed
(SIGKILL, as a lost node) between checkpoints after the best one and resumes in a fresh scratch
directory, as a restarted pod does: the best-so-far must come back from the committed checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load as load_safetensors

from kubetune.run.workloads import ENV_PROGRESS
from kubetune.storage import open_store
from tests.integration.test_finetune_support import (
    alphabet_texts,
    run_finetune,
    tiny_causal_lm,
    write_jsonl,
    write_plan,
)
from tests.integration.test_resume import KillSwitch, attempt_until_killed, first_put_after
from tests.s3server import FaultProxy, S3Bucket, s3_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_plateau_stops_the_run_early_and_a_restart_keeps_the_best_checkpoint_as_the_model(
    tmp_path: Path, s3_bucket: S3Bucket, s3_fault_proxy: FaultProxy
) -> None:
    base, train = tiny_causal_lm(tmp_path)
    backwards = [" ".join(reversed(t.split())) for t in alphabet_texts(16, seed=1)]
    evaluation = write_jsonl(tmp_path / "data" / "eval.jsonl", [{"text": t} for t in backwards])
    store = open_store(s3_bucket.uri)
    store.upload_dir(base, f"{s3_bucket.uri}/base")
    store.upload_file(train, f"{s3_bucket.uri}/data/train.jsonl")
    store.upload_file(evaluation, f"{s3_bucket.uri}/data/eval.jsonl")
    output = f"{s3_bucket.uri}/run"
    checkpoints = f"{output}/checkpoints"
    plan = write_plan(
        tmp_path / "plan.json",
        model_uri=f"{s3_bucket.uri}/base",
        train_uri=f"{s3_bucket.uri}/data/train.jsonl",
        output_uri=output,
        dataset={"eval": {"uri": f"{s3_bucket.uri}/data/eval.jsonl"}, "evalFraction": None},
        hyperparameters={
            "maxSteps": 40,
            "learningRate": 0.05,
            "evalEverySteps": 4,
            "earlyStopping": {"patience": 2},
        },
        # keepLast 1 would delete the best checkpoint as soon as a newer one is committed.
        checkpoint={"everySteps": 100, "keepLast": 1},
    )

    def read(uri: str) -> Any:
        return json.loads(store.read_bytes(uri))

    # 1. Evaluations at steps 4 (the best), 8 (worse: one without improvement); killed right after
    #    step 8 is committed. Checkpoints follow the evaluations, not everySteps.
    for attempt in ("attempt1", "attempt2"):
        (tmp_path / attempt).mkdir()
    switch = KillSwitch(s3_fault_proxy, first_put_after("/checkpoints/step-8/_COMMITTED.json", "/logs/"))
    attempt_until_killed(plan, tmp_path / "attempt1", s3_fault_proxy, switch, "attempt1")
    state = read(f"{checkpoints}/step-8/trainer_state.json")
    assert state["best_global_step"] == 4
    best_so_far = state["best_metric"]
    evaluations = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert evaluations[4] == best_so_far < evaluations[8]
    assert state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"] == {
        "early_stopping_patience_counter": 1
    }
    assert store.exists(f"{checkpoints}/step-4/_COMMITTED.json"), "keepLast 1 kept the best step"

    # 2. A fresh scratch directory, as a new pod has: resumes from step 8 with the best and the
    #    patience counter of the checkpoint, and stops at step 12, the second evaluation without
    #    improvement, long before maxSteps.
    progress = tmp_path / "attempt2" / "progress.jsonl"
    final = run_finetune(
        plan,
        tmp_path / "attempt2",
        env={**s3_env(s3_fault_proxy.endpoint), ENV_PROGRESS: f"file:{progress}"},
        tag="attempt2",
    )
    assert f"resuming from committed checkpoint {checkpoints}/step-8 (step 8)" in final.output(tail=10**7)
    metrics = read(f"{output}/metrics.json")
    assert metrics["early_stopping"] == {
        "metric": "eval_loss",
        "best_step": 4,
        "best_metric": best_so_far,
        "stop_reason": "EarlyStopped",
        "stopped_at_step": 12,
        "patience": 2,
        "threshold": 0.0,
    }
    assert metrics["global_step"] == 12
    # The written model is the best step's: its evaluation is the recorded best, its weights are
    # those of the best checkpoint.
    assert metrics["eval_loss"] == pytest.approx(best_so_far, rel=1e-6)
    written = load_safetensors(store.read_bytes(f"{output}/model/model.safetensors"))
    best = load_safetensors(store.read_bytes(f"{checkpoints}/step-4/model.safetensors"))
    assert written.keys() == best.keys()
    assert all(written[name].equal(best[name]) for name in written)
    # status.results says the same.
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    results = [e["results"] for e in events if "results" in e]
    assert results == [
        {
            "evalLoss": metrics["eval_loss"],
            "bestStep": 4,
            "bestMetric": best_so_far,
            "metric": "eval_loss",
            "stopReason": "EarlyStopped",
        }
    ]
