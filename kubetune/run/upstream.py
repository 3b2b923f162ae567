"""Chained jobs: the model a CompressJob with ``model.fromFineTuneJob`` compresses.

``kubetune render`` resolves it from the FineTuneJobs in the same file, local mode from those that
ran earlier in the same invocation; both refuse an upstream that wrote only a LoRA adapter with the
operator's message (:func:`kubetune.run.artifacts.compressible_model_uri`). The operator itself
waits for the upstream job to succeed first (``operator/policies/upstream.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from kubetune.api.resources import CompressJob, FineTuneJob
from kubetune.run.artifacts import compressible_model_uri


class UpstreamNotFound(LookupError):
    """The FineTuneJob named by ``model.fromFineTuneJob`` is not among the jobs at hand."""

    def __init__(self, name: str) -> None:
        super().__init__(f"FineTuneJob {name!r} is not known here")
        self.name = name


def compress_model_uri(job: CompressJob, upstreams: Iterable[FineTuneJob]) -> str:
    """``spec.model.uri``, or the model the upstream FineTuneJob among ``upstreams`` writes.

    Raises :class:`UpstreamNotFound` when the upstream is not among them, and
    :class:`~kubetune.run.artifacts.AdapterOnlyUpstream` when it writes no full model."""
    if job.spec.model.uri:
        return str(job.spec.model.uri)
    name = job.spec.model.from_fine_tune_job or ""
    upstream = next((candidate for candidate in upstreams if candidate.metadata.name == name), None)
    if upstream is None:
        raise UpstreamNotFound(name)
    return compressible_model_uri(upstream)
