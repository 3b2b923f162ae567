"""GPU smoke check of the fine-tuning runtime (run on a machine with a CUDA GPU).

Fine-tunes a tiny model with ``python -m kubetune.trainer finetune`` under torchrun with NCCL,
``precision: auto`` (bf16 where supported), for ZeRO 2 full, ZeRO 3 full and ZeRO 2 LoRA, then
loads each written model, checks its dtype and that it generates, and prints one table.

    python bench/gpu_smoke.py [--steps 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kubetune.api import FineTuneJob
from kubetune.run.plan import plan_finetune
from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus

CASES = {
    "zero2-full": {"deepspeed": {"zeroStage": 2}, "method": {"type": "full"}},
    "zero3-full": {"deepspeed": {"zeroStage": 3}, "method": {"type": "full"}},
    "zero2-lora": {"deepspeed": {"zeroStage": 2}, "method": {"type": "lora", "lora": {"r": 8}}},
}


def job(name: str, root: Path, steps: int, overrides: dict[str, object]) -> FineTuneJob:
    spec: dict[str, object] = {
        "model": {"uri": f"file://{root}/base"},
        "dataset": {"train": {"uri": f"file://{root}/data.jsonl"}, "evalFraction": 0.1, "format": "text"},
        "hyperparameters": {
            "maxSteps": steps,
            "learningRate": 3e-3,
            "perDeviceBatchSize": 8,
            "maxSeqLength": 128,
            "loggingEverySteps": 5,
        },
        "checkpoint": {"everySteps": steps // 2, "keepLast": 1},
        "output": {"uri": f"file://{root}/runs/{name}"},
        "resources": {"gpusPerWorker": 1},
        **overrides,
    }
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    return FineTuneJob.model_validate(doc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    root = Path(tempfile.mkdtemp(prefix="kubetune-gpu-"))
    corpus = sample_corpus()
    build_tiny_causal_lm(root / "base", corpus, hidden_size=256, num_layers=4, num_heads=8)
    with (root / "data.jsonl").open("w") as f:
        for line in corpus:
            f.write(json.dumps({"text": line}) + "\n")
    rows = []
    for name, overrides in CASES.items():
        plan = plan_finetune(job(name, root, args.steps, overrides))
        plan_path = root / f"{name}.json"
        plan_path.write_text(plan.to_json())
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29517"]
        argv += [
            "-m",
            "kubetune.trainer",
            "finetune",
            "--plan",
            str(plan_path),
            "--scratch-dir",
            str(root / name),
        ]
        env = {
            **os.environ,
            "KUBETUNE_PROGRESS": "log",
            "KUBETUNE_TERMINATION_LOG": str(root / f"{name}.term"),
        }
        started = time.monotonic()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
            rows.append((name, f"exit {proc.returncode}", "-", "-", "-", f"{seconds:.0f}s"))
            continue
        metrics = json.loads((root / "runs" / name / "metrics.json").read_text())
        run = json.loads((root / "runs" / name / "run.json").read_text())
        assert run["global_step"] == args.steps, run["global_step"]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = root / "runs" / name / "model"
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").cuda()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        inputs = tokenizer("Licensed under the", return_tensors="pt").to("cuda")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        precision = str(model.dtype).removeprefix("torch.")
        rows.append(
            (
                name,
                "ok",
                f"{metrics.get('train_loss', float('nan')):.3f}",
                str(precision),
                repr(text[:40]),
                f"{seconds:.0f}s",
            )
        )
    header = ("case", "result", "train_loss", "precision", "generation", "wall")
    lines = [" | ".join(header)] + [" | ".join(row) for row in rows]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_smoke.txt").write_text(report + "\n")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
