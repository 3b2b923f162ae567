"""Trainer overhead: samples/s of ``python -m kubetune.trainer finetune`` against a plain
transformers Trainer with the same DeepSpeed config, model, data and batch, 2 processes each.

Both sides train the same tiny Llama-style model (built here) with ZeRO-2 on CPU/gloo and save a
checkpoint every ``--save-every`` steps; kubetune additionally hashes, uploads (to a ``file://``
prefix) and commits each checkpoint, reports progress, and writes its outputs after training.
Throughput is the Trainer's own ``train_samples_per_second`` (the training loop including the
checkpoint saves and their uploads, not the start-up; see bench_startup.py for that). Goal: ratio
>= 0.95. Runs alternate between the two sides; the best of ``--repeats`` of each is compared.

``--objective dpo`` compares a full-fine-tuning DPO run (``objective: dpo``, ``format: preference``)
against plain trl ``DPOTrainer`` with a frozen reference copy, on preference pairs from the licence
text (test_dpo_support: the passage in order chosen, its words shuffled rejected).

    .venv/bin/python bench/bench_trainer.py [--objective sft|dpo] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Trainer

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.95
NPROC = 2
MAX_LENGTH = 128
LEARNING_RATE = 1e-3
DPO_BETA = 0.1
OBJECTIVES = ("sft", "dpo")
BASELINE_NAME = {"sft": "plain HF Trainer", "dpo": "plain trl DPOTrainer"}


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // NPROC)),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def torchrun(args: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run torchrun with ``args`` (and ``env`` over :func:`worker_env`); return its wall time.
    Raises with the log on failure."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", *args]
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**worker_env(), **(env or {})}, check=False
        ).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {code}:\n{log.read_text()[-6000:]}")
    return time.monotonic() - started


# --- the baseline: a plain Trainer (or trl DPOTrainer), as a user would write it ------------------


def init_cpu_distributed() -> None:
    """The minimum any DeepSpeed-on-CPU script needs: skip the inference-only shm op build and make
    accelerate see the gloo process group (otherwise every rank trains on the same batches)."""
    import deepspeed.ops
    from accelerate import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def common_arguments(out_dir: Path, steps: int, save_every: int, batch: int) -> dict[str, Any]:
    """The Trainer arguments both objectives share, with the ZeRO-2 config kubetune renders."""
    ds_config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LEARNING_RATE,
        bf16=False,  # trl's configs default to bf16; the ds_config trains in fp32
        logging_steps=10,
        save_strategy="steps",
        save_steps=save_every,
        report_to=[],
        deepspeed=ds_config,
        accelerator_config={"use_configured_state": True},
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=42,
    )


def sft_trainer(model_dir: Path, data: Path, arguments: dict[str, Any]) -> Trainer:
    """A transformers Trainer on the texts, tokenized with EOS, labels = inputs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    dataset = Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": ids}
    )
    args = TrainingArguments(**arguments)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return Trainer(model=model, args=args, train_dataset=dataset)


def dpo_trainer(model_dir: Path, data: Path, arguments: dict[str, Any]) -> Trainer:
    """trl's DPOTrainer on the pairs, full fine-tuning against a frozen copy of the base."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list(pairs)
    args = DPOConfig(**arguments, beta=DPO_BETA, max_length=MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    reference.requires_grad_(False)
    reference.eval()
    trainer: Trainer = DPOTrainer(
        model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer


def baseline_worker(
    objective: str, model_dir: Path, data: Path, out_dir: Path, steps: int, save_every: int, batch: int
) -> None:
    """Runs under torchrun. Only transformers, trl, DeepSpeed and accelerate; no kubetune code."""
    init_cpu_distributed()
    make_trainer = sft_trainer if objective == "sft" else dpo_trainer
    trainer = make_trainer(model_dir, data, common_arguments(out_dir, steps, save_every, batch))
    result = trainer.train()
    if trainer.is_world_process_zero():
        (out_dir / "metrics.json").write_text(json.dumps(result.metrics))
    import torch.distributed

    torch.distributed.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------------

MODEL_SIZE: dict[str, Any] = dict(hidden_size=128, num_layers=4, num_heads=4, max_position=MAX_LENGTH)


def build_sft(root: Path, records: int) -> tuple[Path, Path]:
    """The model and ``records`` alphabet texts."""
    from kubetune.trainer.tinymodel import build_tiny_causal_lm
    from tests.integration.test_finetune_support import alphabet_texts, write_jsonl

    texts = alphabet_texts(records, length=48)
    model = build_tiny_causal_lm(root / "base", texts, vocab_size=512, **MODEL_SIZE)
    return model, write_jsonl(root / "train.jsonl", [{"text": t} for t in texts])


def build_dpo(root: Path, records: int) -> tuple[Path, Path]:
    """The model (tokenizer trained on the licence) and up to ``records`` licence pairs."""
    from kubetune.trainer.tinymodel import build_tiny_causal_lm
    from tests.integration.test_dpo_support import LICENCE, licence_pairs
    from tests.integration.test_finetune_support import write_jsonl

    lines = [line.strip() for line in LICENCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = build_tiny_causal_lm(root / "base", lines, vocab_size=400, **MODEL_SIZE)
    return model, write_jsonl(root / "train.jsonl", licence_pairs()[:records])


def build(objective: str, root: Path, records: int) -> tuple[Path, Path]:
    sys.path.append(str(ROOT))
    return (build_sft if objective == "sft" else build_dpo)(root, records)


def plan_overrides(objective: str) -> dict[str, Any]:
    """What a DPO plan adds to the supervised one."""
    if objective == "sft":
        return {"dataset": {"evalFraction": None}}
    return {
        "dataset": {"format": "preference", "evalFraction": None},
        "method": {"type": "full", "objective": "dpo", "dpo": {"beta": DPO_BETA}},
    }


def kubetune_run(
    objective: str, root: Path, model: Path, data: Path, steps: int, save_every: int, batch: int, n: int
) -> float:
    from tests.integration.test_finetune_support import write_plan

    out = root / f"kubetune-out-{n}"
    plan = write_plan(
        root / f"plan-{n}.json",
        model_uri=model.as_uri(),
        train_uri=data.as_uri(),
        output_uri=out.as_uri(),
        name=f"bench-{n}",
        hyperparameters={
            "maxSteps": steps,
            "learningRate": LEARNING_RATE,
            "perDeviceBatchSize": batch,
            "maxSeqLength": MAX_LENGTH,
            "loggingEverySteps": 10,
        },
        deepspeed={"zeroStage": 2},
        checkpoint={"everySteps": save_every, "keepLast": 2},
        processes=NPROC,
        **plan_overrides(objective),
    )
    argv = [
        "-m",
        "kubetune.trainer",
        "finetune",
        "--plan",
        str(plan),
        "--scratch-dir",
        str(root / f"scratch-{n}"),
    ]
    torchrun(argv, root / f"kubetune-{n}.log")
    record: dict[str, Any] = json.loads((out / "run.json").read_text())
    return float(record["trainer_metrics"]["train_samples_per_second"])


def baseline_run(
    objective: str, root: Path, model: Path, data: Path, steps: int, save_every: int, batch: int, n: int
) -> float:
    out = root / f"baseline-out-{n}"
    argv = [
        str(Path(__file__).resolve()),
        "--worker",
        f"--objective={objective}",
        f"--model={model}",
        f"--data={data}",
        f"--out={out}",
        f"--steps={steps}",
        f"--save-every={save_every}",
        f"--batch={batch}",
    ]
    torchrun(argv, root / f"baseline-{n}.log")
    return float(json.loads((out / "metrics.json").read_text())["train_samples_per_second"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--objective", choices=OBJECTIVES, default="sft")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="per-process batch size")
    parser.add_argument(
        "--records", type=int, default=512, help="texts (sft) or at most this many pairs (dpo)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    objective: str = args.objective
    if args.worker:
        baseline_worker(objective, args.model, args.data, args.out, args.steps, args.save_every, args.batch)
        return 0

    baseline = BASELINE_NAME[objective]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        model, data = build(objective, root, args.records)
        records = len(data.read_text().splitlines())
        run_args = (root, model, data, args.steps, args.save_every, args.batch)
        ours, theirs = [], []
        for n in range(args.repeats):
            theirs.append(baseline_run(objective, *run_args, n))
            ours.append(kubetune_run(objective, *run_args, n))
            print(
                f"repeat {n}: kubetune {ours[-1]:.1f} samples/s, {baseline} {theirs[-1]:.1f} samples/s",
                flush=True,
            )
    ratio = max(ours) / max(theirs)
    print(
        f"\ntrainer overhead ({objective}, {records} records), {NPROC} processes, ZeRO-2 on CPU, "
        f"{args.steps} steps x {args.batch}/process, checkpoint every {args.save_every} steps"
    )
    print(f"  kubetune finetune     best {max(ours):8.1f} samples/s  (median {statistics.median(ours):.1f})")
    print(f"  {baseline:<21} best {max(theirs):8.1f} samples/s  (median {statistics.median(theirs):.1f})")
    median_ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"  ratio (best)          {ratio:8.3f}  (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    print(f"  ratio (median)        {median_ratio:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
