"""What ``serve`` is started with, and the state of the server while it runs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .engine import ClassificationEngine, GenerationEngine
from .loading import LoadedModel
from .metrics import ServeMetrics
from .protocol import DEFAULT_MAX_REQUEST_BYTES, now

Status = Literal["loading", "ready", "draining", "failed"]


@dataclass
class ServeSettings:
    """Everything ``serve`` is started with (see ``python -m kubetune.trainer serve --help``)."""

    model_uri: str
    adapter_uri: str | None = None
    served_model_name: str | None = None
    scratch_dir: Path = Path("/tmp/kubetune-serve")
    max_batch_size: int = 16
    max_queue: int = 256
    max_prompt_tokens: int | None = None
    max_tokens_limit: int = 1024
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_request_tokens: int | None = None
    api_keys: tuple[bytes, ...] = ()
    storage_endpoint: str | None = None
    storage_region: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    @property
    def model_name(self) -> str:
        return self.served_model_name or default_model_name(self.model_uri)


def default_model_name(model_uri: str) -> str:
    """The name served without ``--served-model-name``: the model directory's name, or its parent's
    when it is the runtimes' ``<output>/model`` (``s3://b/runs/quickstart/model`` -> ``quickstart``),
    so that clients never see the storage location."""
    parts = [p for p in model_uri.split("://", 1)[-1].split("/") if p]
    if len(parts) > 1 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else "model"


@dataclass
class ServerState:
    settings: ServeSettings
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    status: Status = "loading"
    loaded: LoadedModel | None = None
    engine: GenerationEngine | ClassificationEngine | None = None
    created: int = field(default_factory=now)
    # Decoding, validation and tokenization of request bodies, off the event loop. One thread, as in
    # vLLM: a fast tokenizer is not safe to use from several threads at once, and the body limit
    # bounds the work of any one request.
    preparer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    )

    @property
    def max_prompt_tokens(self) -> int:
        assert self.loaded is not None
        limit = self.loaded.max_context - (1 if self.loaded.task == "generate" else 0)
        configured = self.settings.max_prompt_tokens
        return min(configured, limit) if configured else limit

    @property
    def max_request_tokens(self) -> int:
        """Prompt tokens one request may bring in all: by default what one full batch prefills."""
        return self.settings.max_request_tokens or self.max_prompt_tokens * self.settings.max_batch_size
