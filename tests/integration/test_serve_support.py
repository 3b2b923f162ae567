"""Shared by the serve tests (holds no tests): tiny models in object storage, and the server as a
real subprocess (``python -m kubetune.trainer serve``) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from peft import LoraConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.trainer.tinymodel import build_tiny_causal_lm, sample_corpus
from tests.s3server import s3_client, s3_env

CORPUS = sample_corpus(max_lines=600)
STARTUP_TIMEOUT_S = 300  # a generous bound for a loaded two-core machine; not a performance check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    termination_log: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{self.log[-4000:]}")

    def wait_exit(self, timeout: float = STARTUP_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running after {timeout}s:\n{self.log[-4000:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on /metrics with exactly these labels (0 when absent)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


def spawn_server(
    workdir: Path, args: Sequence[str], env: dict[str, str] | None = None, port: int | None = None
) -> ServerProcess:
    """Start ``serve`` without waiting for readiness."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    termination_log = workdir / "termination-log"
    full_env = {
        **os.environ,
        **(env or {}),
        "KUBETUNE_TERMINATION_LOG": str(termination_log),
        "TOKENIZERS_PARALLELISM": "false",
    }
    argv = [sys.executable, "-m", "kubetune.trainer", "serve", "--host", "127.0.0.1", "--port", str(port)]
    # One torch thread: the tiny models gain nothing from more, and the test machine is shared.
    argv += ["--scratch-dir", str(workdir / "scratch"), "--threads", "1", *args]
    with log_path.open("wb") as log:
        # cwd outside the checkout: the installed package is what a pod runs.
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir)
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, termination_log)


@contextmanager
def running_server(
    workdir: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    server = spawn_server(workdir, args, env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class Bucket:
    """A bucket of its own on the session's S3 server, for module-scoped servers (the function-scoped
    ``s3_bucket`` fixture cannot outlive one test)."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.client = s3_client(endpoint)
        self.client.create_bucket(Bucket=name)
        self.env = s3_env(endpoint)

    def upload(self, local_dir: Path, key: str) -> str:
        """Upload a directory as the runtimes lay it out; return its ``s3://`` URI."""
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.client.upload_file(str(path), self.name, f"{key}/{path.relative_to(local_dir).as_posix()}")
        return f"s3://{self.name}/{key}"


def build_lm(out_dir: Path, **kwargs: Any) -> Path:
    return build_tiny_causal_lm(out_dir, CORPUS, max_position=512, seed=1, **kwargs)


def build_lora_adapter(base_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter for ``base_dir`` as the finetune runtime writes it (``PeftModel.save_pretrained``),
    with random (not zero) B matrices so that it visibly changes the model's output."""
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def greedy_reference(model: Any, tokenizer: Any, prompt_ids: list[int], max_tokens: int) -> tuple[str, int]:
    """What ``model.generate`` produces for one prompt alone (text, token count): the answer the
    server must match token for token."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    new_ids = out[0, len(prompt_ids) :].tolist()
    text: str = tokenizer.decode(new_ids, skip_special_tokens=True)
    return text, len(new_ids)
