"""Trainer overhead: samples/s of ``python -m kubetune.trainer finetune`` against a plain
transformers Trainer with the same DeepSpeed config, model, data and batch, 2 processes each.

Both sides train the same tiny Llama-style model (built here) with ZeRO-2 on CPU/gloo and save a
checkpoint every ``--save-every`` steps; kubetune additionally hashes, uploads (to a ``file://``
prefix) and commits each checkpoint, reports progress, and writes its outputs after training.
Throughput is the Trainer's own ``train_samples_per_second`` (the training loop including the
checkpoint saves and their uploads, not the start-up; see bench_startup.py for that). Goal: ratio
>= 0.95. Runs alternate between the two sides; the best of ``--repeats`` of each is compared.

    .venv/bin/python bench/bench_trainer.py [--steps 60] [--repeats 2]
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.95
NPROC = 2


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // NPROC)),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def torchrun(args: list[str], log: Path) -> float:
    """Run torchrun with ``args``; return its wall time. Raises with the log on failure."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", *args]
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=worker_env(), check=False
        ).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {code}:\n{log.read_text()[-6000:]}")
    return time.monotonic() - started


# --- the baseline: a plain Trainer, as a user would write it --------------------------------------


def baseline_worker(
    model_dir: Path, data: Path, out_dir: Path, steps: int, save_every: int, batch: int
) -> None:
    """Runs under torchrun. Only transformers, DeepSpeed and accelerate; no kubetune code."""
    import deepspeed.ops
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    # The minimum any DeepSpeed-on-CPU script needs: skip the inference-only shm op build and make
    # accelerate see the gloo process group (otherwise every rank trains on the same batches).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    dataset = Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": ids}
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    args = TrainingArguments(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
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
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()
    if trainer.is_world_process_zero():
        (out_dir / "metrics.json").write_text(json.dumps(result.metrics))
    import torch.distributed

    torch.distributed.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------------


def build(root: Path, records: int) -> tuple[Path, Path]:
    from kubetune.trainer.tinymodel import build_tiny_causal_lm

    sys.path.append(str(ROOT))
    from tests.integration.test_finetune_support import alphabet_texts, write_jsonl

    texts = alphabet_texts(records, length=48)
    model = build_tiny_causal_lm(
        root / "base", texts, vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, max_position=128
    )
    return model, write_jsonl(root / "train.jsonl", [{"text": t} for t in texts])


def kubetune_run(
    root: Path, model: Path, data: Path, steps: int, save_every: int, batch: int, n: int
) -> float:
    from tests.integration.test_finetune_support import write_plan

    out = root / f"kubetune-out-{n}"
    plan = write_plan(
        root / f"plan-{n}.json",
        model_uri=model.as_uri(),
        train_uri=data.as_uri(),
        output_uri=out.as_uri(),
        name=f"bench-{n}",
        dataset={"evalFraction": None},
        hyperparameters={
            "maxSteps": steps,
            "learningRate": 1e-3,
            "perDeviceBatchSize": batch,
            "maxSeqLength": 128,
            "loggingEverySteps": 10,
        },
        deepspeed={"zeroStage": 2},
        checkpoint={"everySteps": save_every, "keepLast": 2},
        processes=NPROC,
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
    root: Path, model: Path, data: Path, steps: int, save_every: int, batch: int, n: int
) -> float:
    out = root / f"baseline-out-{n}"
    argv = [
        str(Path(__file__).resolve()),
        "--worker",
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
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="per-process batch size")
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        baseline_worker(args.model, args.data, args.out, args.steps, args.save_every, args.batch)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        model, data = build(root, args.records)
        ours, theirs = [], []
        for n in range(args.repeats):
            theirs.append(baseline_run(root, model, data, args.steps, args.save_every, args.batch, n))
            ours.append(kubetune_run(root, model, data, args.steps, args.save_every, args.batch, n))
            print(
                f"repeat {n}: kubetune {ours[-1]:.1f} samples/s, plain Trainer {theirs[-1]:.1f} samples/s",
                flush=True,
            )
    ratio = max(ours) / max(theirs)
    print(
        f"\ntrainer overhead, {NPROC} processes, ZeRO-2 on CPU, {args.steps} steps x {args.batch}/process, "
        f"checkpoint every {args.save_every} steps"
    )
    print(f"  kubetune finetune     best {max(ours):8.1f} samples/s  (median {statistics.median(ours):.1f})")
    print(
        f"  plain HF Trainer      best {max(theirs):8.1f} samples/s  (median {statistics.median(theirs):.1f})"
    )
    median_ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"  ratio (best)          {ratio:8.3f}  (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    print(f"  ratio (median)        {median_ratio:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
