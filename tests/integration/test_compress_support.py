"""Helpers for the compression tests and ``bench/bench_compress.py`` (this module holds no tests).

The model under compression is a small llama-style causal LM trained here, in a few seconds to a
minute of plain PyTorch, on real English: the licence texts under ``/usr/share/common-licenses``.
Whole licences are held out (never seen in training, calibration or distillation), so held-out
perplexity measures generalisation, as it would for a real model. The runtime under test is the
real thing: ``python -m kubetune.trainer compress`` processes (under ``torchrun`` for distillation)
reading a run plan rendered from a CompressJob exactly as the operator renders it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune.api.resources import CompressJob
from kubetune.run.plan import dumps_plan, plan_compress
from kubetune.trainer.tinymodel import LICENSES_DIR, build_tiny_causal_lm
from tests.integration.test_finetune_support import free_port, trainer_env, write_jsonl

RUN_TIMEOUT_S = 600
# Whole licences held out for evaluation; the GPL-2 shares phrasing with GPL-1/3 (in training),
# the Apache licence does not, so both kinds of generalisation are measured.
HELD_OUT = ("Apache-2.0", "GPL-2")
# Lines per record: about 100-130 tokens of the 320-entry BPE, one calibration/evaluation sequence each.
LINES_PER_RECORD = 8


@dataclass(frozen=True)
class TeacherSpec:
    """The size of the tiny LM: four llama layers of hidden size 128 with a 4x MLP put 93% of the
    weights in the linear layers that quantization targets (the rest is the 320-token embedding
    and output head, which stay in bf16)."""

    vocab_size: int = 320
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_position: int = 256
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


def licence_texts() -> tuple[list[str], list[str]]:
    """(training files' texts, held-out files' texts), symlinked duplicates skipped."""
    files = sorted(p for p in LICENSES_DIR.iterdir() if p.is_file() and not p.is_symlink())
    if len(files) < 4:
        raise RuntimeError(f"{LICENSES_DIR} has too few licence texts for these tests")
    train = [p.read_text(encoding="utf-8", errors="replace") for p in files if p.name not in HELD_OUT]
    held = [p.read_text(encoding="utf-8", errors="replace") for p in files if p.name in HELD_OUT]
    return train, held


def records(texts: Sequence[str]) -> list[dict[str, str]]:
    """Blocks of ``LINES_PER_RECORD`` non-empty lines, one text record each."""
    out = []
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for start in range(0, len(lines), LINES_PER_RECORD):
            out.append({"text": " ".join(lines[start : start + LINES_PER_RECORD])})
    return out


def write_data(root: Path) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` (held-out licences) under ``root``."""
    train, held = licence_texts()
    return write_jsonl(root / "train.jsonl", records(train)), write_jsonl(root / "eval.jsonl", records(held))


def train_teacher(out_dir: Path, spec: TeacherSpec = TeacherSpec()) -> Path:
    """Build the tiny LM (tokenizer trained on the training licences), train it on random
    windows of the training text with AdamW and a one-cycle schedule, and save it in bf16, the
    dtype real checkpoints ship in (so size ratios are against 16-bit weights, not fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    train, _ = licence_texts()
    lines = [line.strip() for text in train for line in text.splitlines() if line.strip()]
    build_tiny_causal_lm(
        out_dir,
        lines,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        max_position=spec.max_position,
        seed=spec.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    # build_tiny_causal_lm gives a 2x MLP; real LLMs have 2.7-4x, so widen it (and re-initialise).
    config = AutoConfig.from_pretrained(out_dir)
    config.intermediate_size = spec.intermediate_size
    torch.manual_seed(spec.seed)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    ids = torch.tensor(tokenizer(" ".join(lines))["input_ids"])
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=spec.steps, pct_start=0.1
    )
    model.train()
    for _ in range(spec.steps):
        starts = torch.randint(0, len(ids) - spec.seq_len, (spec.batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def random_student(teacher_dir: Path, out_dir: Path, num_layers: int, seed: int = 1) -> Path:
    """The teacher's architecture with ``num_layers`` layers, randomly initialised (the
    from-scratch baseline a distilled student is compared with), tokenizer included."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    return out_dir


def compress_job(
    *,
    model_uri: str,
    train_uri: str,
    output_uri: str,
    eval_uri: str | None = None,
    name: str = "squeeze",
    uid: str | None = "uid-c1",
    quantization: Mapping[str, Any] | None = None,
    pruning: Mapping[str, Any] | None = None,
    distillation: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    processes: int = 1,
) -> CompressJob:
    metadata: dict[str, Any] = {"name": name, "namespace": "default"}
    if uid is not None:
        metadata["uid"] = uid
    dataset: dict[str, Any] = {"train": {"uri": train_uri}}
    if eval_uri is not None:
        dataset["eval"] = {"uri": eval_uri}
    else:
        dataset["evalFraction"] = 0.1
    spec: dict[str, Any] = {
        "model": {"uri": model_uri},
        "dataset": dataset,
        "calibration": dict(calibration or {"samples": 32, "maxSeqLength": 128}),
        "resources": {"processesPerWorker": processes},
        "output": {"uri": output_uri},
    }
    for key, value in (("quantization", quantization), ("pruning", pruning), ("distillation", distillation)):
        if value is not None:
            spec[key] = dict(value)
    return CompressJob.model_validate(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "CompressJob", "metadata": metadata, "spec": spec}
    )


def write_plan(path: Path, job: CompressJob) -> Path:
    """The run plan the operator would put in the job's ConfigMap."""
    assert job.spec.model.uri is not None
    path.write_text(dumps_plan(plan_compress(job, model_uri=job.spec.model.uri)), encoding="utf-8")
    return path


def run_compress(
    plan: Path,
    tmp: Path,
    *,
    nproc: int | None = None,
    env: Mapping[str, str] | None = None,
    tag: str = "compress",
) -> subprocess.CompletedProcess[str]:
    """One ``python -m kubetune.trainer compress`` process, or ``nproc`` under torchrun."""
    launcher: list[str] = []
    if nproc is not None:
        launcher = [
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    argv = [
        sys.executable,
        *launcher,
        "-m",
        "kubetune.trainer",
        "compress",
        "--plan",
        str(plan),
        "--scratch-dir",
        str(tmp / f"scratch-{tag}"),
    ]
    return subprocess.run(
        argv,
        env=trainer_env(
            tmp, {"KUBETUNE_TERMINATION_LOG": str(tmp / f"{tag}-termination-log"), **(env or {})}
        ),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def termination_message(tmp: Path, tag: str = "compress") -> str:
    path = tmp / f"{tag}-termination-log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def read_report(output_dir: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((output_dir / "compression_report.json").read_text(encoding="utf-8"))
    return report


def held_out_perplexity(model_dir: Path, eval_path: Path, max_length: int = 128) -> float:
    """Perplexity of a saved model on the held-out records, computed here independently of the
    runtime (token-weighted next-token NLL, each record truncated to ``max_length``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for line in eval_path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids[:max_length]])
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def generate(model_dir: Path, prompt: str, tokens: int = 12) -> str:
    """Greedy continuation of ``prompt`` by the model loaded with ``from_pretrained`` on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False)
    return str(tokenizer.decode(out[0][batch["input_ids"].shape[1] :], skip_special_tokens=True))


def cpu_env() -> dict[str, str]:
    """Environment for runs here: no GPU, and progress written to the log only."""
    return {"CUDA_VISIBLE_DEVICES": "", "KUBETUNE_PROGRESS": "log"}


def uri(path: Path) -> str:
    return Path(os.path.abspath(path)).as_uri()
