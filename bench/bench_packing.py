"""Sample packing: useful (non-padding) training tokens per second of ``python -m kubetune.trainer
finetune`` with ``dataset.packing: true`` against the same run without packing.

Both sides train the same tiny Llama-style model (built here) on the same instruction records,
with the same batch settings (records or windows per process per step, ``maxSeqLength``,
ZeRO-2 on CPU/gloo), for the same number of steps. The records' lengths are skewed as real
instruction data is (log-normal: most records a few dozen tokens, a long tail up to
``maxSeqLength``), so an unpacked batch is mostly padding to its longest record. Throughput is
``metrics.json``'s ``usage.tokens_per_second`` (tokens that are not padding over the training
loop's time); its ``usage.padding_share`` is printed beside it. Goal: ratio >= 1.8. Runs
alternate between the two sides; the best of ``--repeats`` of each is compared.

    .venv/bin/python bench/bench_packing.py [--steps 20] [--batch 8] [--max-length 512] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_trainer import NPROC, torchrun  # noqa: E402  (after ROOT is on the path)

GOAL = 1.8
WORDS = [
    "the",
    "a",
    "model",
    "data",
    "train",
    "token",
    "record",
    "batch",
    "window",
    "loss",
    "label",
    "answer",
    "question",
    "prompt",
    "response",
    "system",
    "user",
    "assistant",
    "packing",
    "padding",
    "length",
    "short",
    "long",
    "tail",
    "value",
    "step",
    "epoch",
    "learning",
    "rate",
]


def skewed_records(count: int, max_words: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction records whose lengths are log-normal (median about 40 words, sigma 1), as in
    public instruction-tuning sets: a short prompt and a response of very varied length."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        words = max(4, min(max_words, round(rng.lognormvariate(math.log(40), 1.0))))
        prompt = max(2, words // 4)
        records.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(prompt)),
                "response": " ".join(rng.choice(WORDS) for _ in range(words - prompt)),
            }
        )
    return records


def build(root: Path, records: int, max_length: int) -> tuple[Path, Path]:
    from kubetune.trainer.data.formats import render_instruction_prompt
    from kubetune.trainer.tinymodel import build_tiny_causal_lm

    rows = skewed_records(records, max_words=max_length // 2)
    corpus = [render_instruction_prompt(r["prompt"]) + r["response"] for r in rows[:200]]
    model = build_tiny_causal_lm(
        root / "model",
        corpus,
        vocab_size=512,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        max_position=max_length,
    )
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model, data


def run(
    root: Path, model: Path, data: Path, *, packing: bool, steps: int, batch: int, max_length: int, n: int
) -> dict[str, Any]:
    from tests.integration.test_finetune_support import write_plan

    name = f"{'packed' if packing else 'padded'}-{n}"
    out = root / f"out-{name}"
    plan = write_plan(
        root / f"plan-{name}.json",
        model_uri=model.as_uri(),
        train_uri=data.as_uri(),
        output_uri=out.as_uri(),
        name=f"bench-{n}",
        dataset={"format": "instruction", "evalFraction": None, "packing": packing},
        hyperparameters={
            "maxSteps": steps,
            "learningRate": 1e-3,
            "perDeviceBatchSize": batch,
            "maxSeqLength": max_length,
            "loggingEverySteps": 10,
        },
        deepspeed={"zeroStage": 2},
        checkpoint={"everySteps": 10 * steps},
        processes=NPROC,
    )
    # Progress as log lines: the run's output goes to a file.
    args = [
        "-m",
        "kubetune.trainer",
        "finetune",
        "--plan",
        str(plan),
        "--scratch-dir",
        str(root / f"scratch-{name}"),
    ]
    torchrun(args, root / f"{name}.log", env={"KUBETUNE_PROGRESS": "log"})
    usage: dict[str, Any] = json.loads((out / "metrics.json").read_text())["usage"]
    return usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--batch", type=int, default=8, help="records (or packed windows) per process per step"
    )
    parser.add_argument("--max-length", type=int, default=512, help="maxSeqLength")
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        root = Path(tmp)
        model, data = build(root, args.records, args.max_length)
        settings = dict(steps=args.steps, batch=args.batch, max_length=args.max_length)
        padded, packed = [], []
        for n in range(args.repeats):
            padded.append(run(root, model, data, packing=False, n=n, **settings))
            packed.append(run(root, model, data, packing=True, n=n, **settings))
            print(
                f"repeat {n}: packed {packed[-1]['tokens_per_second']:.0f} tokens/s "
                f"(padding {packed[-1]['padding_share']:.1%}), unpacked {padded[-1]['tokens_per_second']:.0f} "
                f"tokens/s (padding {padded[-1]['padding_share']:.1%})",
                flush=True,
            )
    best_packed = max(packed, key=lambda u: u["tokens_per_second"])
    best_padded = max(padded, key=lambda u: u["tokens_per_second"])
    ratio = best_packed["tokens_per_second"] / best_padded["tokens_per_second"]
    print(
        f"\nsample packing, {args.records} instruction records of log-normal length, {NPROC} processes, "
        f"ZeRO-2 on CPU, {args.steps} steps x {args.batch}/process, maxSeqLength {args.max_length} "
        f"({time.monotonic() - started:.0f}s)"
    )
    for label, usage in (("packed", best_packed), ("unpacked", best_padded)):
        print(
            f"  {label:<9} {usage['tokens_per_second']:9.0f} useful tokens/s  padding share "
            f"{usage['padding_share']:.1%}  ({usage['train_tokens']} tokens)"
        )
    print(f"  ratio     {ratio:9.3f}  (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
