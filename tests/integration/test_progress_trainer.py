"""The data and progress pieces inside a real transformers Trainer run (one CPU process): the
prepared datasets and collator train a tiny causal LM, and ProgressCallback reports every logged
step and evaluation to the file local mode follows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from kubetune.api.resources import FineTuneJob
from kubetune.run.plan import plan_finetune
from kubetune.trainer import data
from kubetune.trainer.progress import FileReporter, ProgressCallback
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus

pytestmark = pytest.mark.integration


def test_a_trainer_run_reports_progress_through_the_callback(tmp_path: Path) -> None:
    model_dir = build_tiny_causal_lm(tmp_path / "model", sample_corpus(200), num_layers=1)
    conversations = [
        {"messages": [{"role": "user", "content": line}, {"role": "assistant", "content": line[::-1]}]}
        for line in sample_corpus(40)
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "progress", "namespace": "ml"},
            "spec": {
                "model": {"uri": f"file://{model_dir}"},
                "dataset": {"train": {"uri": f"file://{train}"}, "evalFraction": 0.1, "format": "chat"},
                "output": {"uri": f"file://{tmp_path}/out"},
                "hyperparameters": {"maxSteps": 4, "maxSeqLength": 64, "perDeviceBatchSize": 4},
            },
        }
    )
    plan = plan_finetune(job)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prepared = data.prepare_datasets(plan, tokenizer, tmp_path / "scratch")
    progress_file = tmp_path / "progress.jsonl"
    reporter = FileReporter(progress_file)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=data.make_collator(tokenizer, plan),
        callbacks=[ProgressCallback(reporter)],
    )
    trainer.train()
    reporter.close()

    updates = [json.loads(line) for line in progress_file.read_text().splitlines()]
    assert [u["step"] for u in updates if "evalLoss" not in u] == [1, 2]
    assert {u["step"] for u in updates} == {1, 2, 3, 4}
    assert all(u["totalSteps"] == 4 for u in updates)
    assert all(isinstance(u["loss"], float) for u in updates)
    first_eval = next(u for u in updates if "evalLoss" in u)
    assert first_eval["step"] == 2
    final = updates[-1]
    assert (final["step"], final["percent"], final["eta"]) == (4, 100, "0s")
    assert final["evalLoss"] > 0
    assert final["samplesPerSecond"] > 0
