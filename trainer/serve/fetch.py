"""Downloading what ``serve`` serves, without torch: also the whole job of the init container that
fetches a model for the vLLM runtime (``serve --download-only``)."""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune.errors import InvalidInputError, StorageAccessError
from kubetune.storage import StorageConfig, open_store, parse_uri

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
ADAPTER_SUBDIR = "adapter"


def fetch(uri: str, local_dir: Path, storage: StorageConfig) -> Path:
    """A local directory holding the files under ``uri``: the directory itself for a plain path,
    otherwise a fresh download of the prefix into ``local_dir``."""
    if "://" not in uri:
        path = Path(uri)
        if not path.is_dir():
            raise StorageAccessError(f"{uri}: no such directory")
        return path
    parse_uri(uri)  # raises InvalidInputError naming what is wrong with the URI
    local_dir.mkdir(parents=True, exist_ok=True)
    files = open_store(uri, storage).download_prefix(uri, local_dir)
    log.info("downloaded %d files from %s to %s", len(files), uri, local_dir)
    return local_dir


def download(
    model_uri: str, adapter_uri: str | None, scratch_dir: Path, storage: StorageConfig
) -> tuple[Path, Path | None]:
    """Fetch the model (``<scratch>/model``) and the adapter (``<scratch>/adapter``) and check that
    they look like a Hugging Face model and a peft adapter, naming the URI when they do not."""
    model_dir = fetch(model_uri, scratch_dir / MODEL_SUBDIR, storage)
    if not (model_dir / "config.json").exists():
        found = sorted(p.name for p in model_dir.iterdir())[:10]
        raise InvalidInputError(
            f"{model_uri}: not a Hugging Face model directory (no config.json; found {found or 'nothing'})"
        )
    adapter_dir = None
    if adapter_uri:
        adapter_dir = fetch(adapter_uri, scratch_dir / ADAPTER_SUBDIR, storage)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise InvalidInputError(f"{adapter_uri}: not a peft adapter directory (no adapter_config.json)")
    return model_dir, adapter_dir
