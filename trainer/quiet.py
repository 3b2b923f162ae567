"""Known-harmless noise of the libraries the runtimes import, silenced before they are imported.

Each entry is a message that says nothing a kubetune user can act on and appears on every run;
anything else a library says (including its other warnings) is left alone. Called first by every
runtime command and by ``kubetune quickstart-data``, so a user's first screen shows only
kubetune's own lines.
"""

from __future__ import annotations

import logging
import os

# torchao (imported by transformers' quantizer registry) registers Enum subclasses as pytree
# constants, which torch 2.13 deprecates with one warning per Enum on every import.
_PYTREE_LOGGER = "torch.utils._pytree"


def silence_known_library_noise() -> None:
    logging.getLogger(_PYTREE_LOGGER).setLevel(logging.ERROR)
    if "DS_ACCELERATOR" not in os.environ:
        # DeepSpeed warns "Setting accelerator to CPU. If you have GPU ... we were unable to
        # detect it" whenever it finds no GPU. It decides by torch.cuda's device count; making
        # the same decision here (and handing it to child processes) skips the warning.
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def hide_save_progress_bars() -> None:
    """transformers draws a "Writing model shards" bar for a one-shard tiny model; a command
    that only writes a model prints its own line instead."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
