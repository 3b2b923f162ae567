"""``kubetune quickstart-data``: a small real-text dataset and a tiny base model in a local store,
so the quickstart job runs on a fresh machine with no network and no hub.

The text is the Apache License 2.0 (shipped with the package); the base model is a tiny
randomly initialised Llama-style model with a BPE tokenizer trained on that text.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import resources
from pathlib import Path

DEFAULT_ROOT = Path("/tmp/kubetune-quickstart")


def corpus_paragraphs() -> list[str]:
    """The licence text as paragraphs with whitespace normalised."""
    text = resources.files("kubetune.local").joinpath("data/apache-2.0.txt").read_text()
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if len(p.split()) >= 4]


def write_dataset(path: Path, paragraphs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for paragraph in paragraphs:
            f.write(json.dumps({"text": paragraph}) + "\n")
    tmp.replace(path)


def prepare(root: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``root/base-model`` and ``root/data/train.jsonl``; existing ones are kept unless
    ``force``, so running the quickstart twice resumes instead of starting over."""
    model_dir = root / "base-model"
    data_file = root / "data" / "train.jsonl"
    paragraphs = corpus_paragraphs()
    if force or not data_file.exists():
        write_dataset(data_file, paragraphs)
    if force or not (model_dir / "config.json").exists():
        # Imported here: the trainer extra (torch, transformers) is only needed for this step.
        from kubetune.trainer.quiet import hide_save_progress_bars, silence_known_library_noise

        silence_known_library_noise()
        from kubetune.trainer.tinymodel import build_tiny_causal_lm

        hide_save_progress_bars()
        build_tiny_causal_lm(model_dir, paragraphs)
    return model_dir, data_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"local store (default {DEFAULT_ROOT})"
    )
    parser.add_argument("--force", action="store_true", help="rewrite the dataset and the base model")


def run(args: argparse.Namespace) -> int:
    model_dir, data_file = prepare(args.root, force=args.force)
    print(f"base model: file://{model_dir}")
    print(f"dataset:    file://{data_file}")
    return 0
