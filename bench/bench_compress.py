"""Compression methods side by side on the same tiny model: wall time, peak RSS, size, quality.

The model is the one the compression tests use: a 4-layer llama (hidden 128, MLP 512, 320-token
BPE, 1.13 M parameters) trained here on the licence texts in /usr/share/common-licenses and stored
in bf16; quality is perplexity on whole held-out licences. Every method runs as the real runtime,
``python -m kubetune.trainer compress`` in a process of its own on ``file://`` storage, from a run
plan rendered from a CompressJob exactly as the operator renders it.

Columns:

- wall: seconds for the whole process (imports, model and data loading, calibration or training,
  both evaluations, writing the outputs); ``x eval`` divides it by the baseline measured in the
  same run: one process that only loads the original model and computes its held-out perplexity,
  i.e. what the runtime's fixed costs amount to;
- peak RSS: the process's maximum resident set (its own VmHWM, as the report records it);
- size: original / compressed bytes of the weight files (the original in bf16); linear: the same for
  the tensors of the quantized linear layers only (the bf16 embedding and head are 7% of this model);
- ppl: held-out perplexity before -> after, and the relative change; zeros: share of zero weights.

    .venv/bin/python bench/bench_compress.py [--model DIR] [--methods rtn-w8a16,gptq-w4a16,...]
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the installed kubetune wins over the source folder of the same name;
# only ``tests`` is taken from the checkout.
sys.path.append(str(ROOT))

from tests.integration.test_compress_support import (  # noqa: E402
    compress_job,
    cpu_env,
    train_teacher,
    uri,
    write_data,
    write_plan,
)
from tests.integration.test_finetune_support import trainer_env  # noqa: E402

DISTILL_STEPS = 60

METHODS: dict[str, dict[str, Any]] = {
    "rtn-w8a16": {"quantization": {"method": "rtn", "scheme": "W8A16"}},
    "gptq-w4a16": {"quantization": {"method": "gptq", "scheme": "W4A16"}},
    "smoothquant-w8a8": {"quantization": {"method": "smoothquant", "scheme": "W8A8"}},
    "sparsegpt-50%": {"pruning": {"method": "sparsegpt", "sparsity": 0.5}},
    "sparsegpt-2:4": {"pruning": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}},
    "2:4+w4a16": {
        "pruning": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
        "quantization": {"method": "gptq", "scheme": "W4A16"},
    },
    "wanda-50%": {"pruning": {"method": "wanda", "sparsity": 0.5}},
    "magnitude-50%": {"pruning": {"method": "magnitude", "sparsity": 0.5}},
    "torchao-int8wo": {"quantization": {"method": "torchao", "scheme": "INT8_WEIGHT_ONLY"}},
    "torchao-int8dyn": {"quantization": {"method": "torchao", "scheme": "INT8_DYNAMIC"}},
    "distill-1/2": {
        "distillation": {
            "student": {"layerStride": 2},
            "temperature": 2.0,
            "kdWeight": 0.5,
            "hyperparameters": {
                "maxSteps": DISTILL_STEPS,
                "learningRate": 2e-3,
                "perDeviceBatchSize": 8,
                "maxSeqLength": 128,
                "loggingEverySteps": 20,
                "seed": 7,
            },
            "deepspeed": {"zeroStage": 2},
            "checkpoint": {"everySteps": DISTILL_STEPS},
        }
    },
}

BASELINE = """
import json, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, eval_path = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
total = count = 0
with torch.inference_mode():
    for line in open(eval_path):
        ids = (tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id])[:128]
        ids = torch.tensor([ids])
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
print(math.exp(total / count))
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("peak_rss_bytes", int(hwm[0].split()[1]) * 1024)
"""


def run_process(argv: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """(exit code, wall seconds) of one child process. Its peak RSS is the child's own VmHWM,
    which it reports itself: ``wait4``'s maxrss would include this (large) process's memory."""
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="reuse a trained model directory (else train one)"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep everything here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-compress-") as temp:
        work = args.workdir or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        train, held_out = write_data(work / "data")
        model = args.model
        if model is None:
            started = time.monotonic()
            model = train_teacher(work / "teacher")
            print(f"trained the model in {time.monotonic() - started:.1f} s", flush=True)
        env = trainer_env(work, {**cpu_env(), "KUBETUNE_TERMINATION_LOG": str(work / "termination-log")})
        print(f"cpus: {os.cpu_count()}, model: {model}", flush=True)

        code, base_wall = run_process(
            [sys.executable, "-c", BASELINE, str(model), str(held_out)], env, work / "baseline.log"
        )
        if code != 0:
            print((work / "baseline.log").read_text()[-4000:])
            return 1
        base_rss = next(
            int(line.split()[1])
            for line in (work / "baseline.log").read_text().splitlines()
            if line.startswith("peak_rss_bytes ")
        )
        rows = []
        for name in methods:
            tag = name.replace(":", "-").replace("%", "pct").replace("/", "-").replace("+", "-")
            output = work / f"out-{tag}"
            job = compress_job(
                model_uri=uri(model),
                train_uri=uri(train),
                eval_uri=uri(held_out),
                output_uri=uri(output),
                name=("bench-" + tag.lower())[:63],
                **METHODS[name],
            )
            plan = write_plan(work / f"plan-{tag}.json", job)
            argv_ = [sys.executable, "-m", "kubetune.trainer", "compress", "--plan", str(plan)]
            argv_ += ["--scratch-dir", str(work / f"scratch-{tag}")]
            code, wall = run_process(argv_, env, work / f"{tag}.log")
            if code != 0:
                print(f"{name}: exit {code}\n" + (work / f"{tag}.log").read_text()[-4000:])
                return 1
            report = json.loads((output / "compression_report.json").read_text())
            rows.append((name, wall, int(report["peak_rss_bytes"]), report))
            print(f"{name}: done in {wall:.1f} s", flush=True)

    header = (
        f"{'method':<17} {'wall s':>7} {'x eval':>6} {'peak RSS MB':>11} {'size':>6} {'linear':>6} "
        f"{'ppl before':>10} {'ppl after':>9} {'d ppl':>7} {'zeros':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    print(
        f"{'baseline (eval)':<17} {base_wall:7.1f} {1.0:6.2f} {base_rss / 2**20:11.0f} {'':>6} {'':>6} {'':>10} {'':>9} {'':>7} {'':>6}"
    )
    summary = []
    for name, wall, rss, report in rows:
        before = report["original"]["metrics"]["perplexity"]
        after = report["compressed"]["metrics"]["perplexity"]
        compressed = report["compressed"]
        zeros = 1 - compressed["nonzero_parameters"] / compressed["parameters"]
        linear = report.get("linear_weight_ratio")
        print(
            f"{name:<17} {wall:7.1f} {wall / base_wall:6.2f} {rss / 2**20:11.0f} {report['size_ratio']:5.2f}x "
            f"{(f'{linear:5.2f}x' if linear else '   n/a'):>6} {before:10.3f} {after:9.3f} "
            f"{100 * (after - before) / before:+6.1f}% {100 * zeros:5.1f}%"
        )
        summary.append(
            {
                "method": name,
                "wall_s": round(wall, 2),
                "wall_vs_eval": round(wall / base_wall, 2),
                "peak_rss_mb": round(rss / 2**20),
                "size_ratio": round(report["size_ratio"], 3),
                "linear_weight_ratio": round(linear, 3) if linear else None,
                "ppl_before": round(before, 4),
                "ppl_after": round(after, 4),
                "ppl_delta_rel": round((after - before) / before, 4),
                "zero_fraction": round(zeros, 4),
            }
        )
    print(json.dumps({"baseline_eval_s": round(base_wall, 2), "methods": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
