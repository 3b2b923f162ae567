"""Training data: read records from object storage, check them, tokenize them, batch them.

One module per job, imported by name (``from kubetune.trainer.data.formats import ...``):
:mod:`.readers` (files to records), :mod:`.checks` (records against the format),
:mod:`.loading` (the plan's records, read, checked and split), :mod:`.formats` (tokenization
per ``dataset.format``), :mod:`.collation` (datasets, statistics, batches), and
:mod:`.problems` (what is wrong with the input, collected). The names below are the ones
``validate`` uses through this package.
"""

from .collation import LengthStats, label_counts, make_collator, prepare_datasets
from .formats import chat_template_of, check_task_format, has_generation_blocks, tokenize_split
from .loading import LoadReport, collect_records
from .problems import ProblemLog

__all__ = [
    "LengthStats",
    "LoadReport",
    "ProblemLog",
    "chat_template_of",
    "check_task_format",
    "collect_records",
    "has_generation_blocks",
    "label_counts",
    "make_collator",
    "prepare_datasets",
    "tokenize_split",
]
