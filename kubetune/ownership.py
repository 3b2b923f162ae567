"""Output ownership: one job per output prefix, claimed before anything is written.

Every writer (fine-tuning, compression, distillation, local mode) calls :func:`claim_output` first.
The claim is ``<output>/_OWNER.json`` naming the job (uid, kind, namespace/name), created with
:meth:`~kubetune.storage.ObjectStore.create_exclusive` -- a conditional PutObject
(``If-None-Match: *``) on S3, an exclusive create on ``file://`` -- so of two jobs started together
on one prefix exactly one wins, and the other is refused with :class:`OutputConflictError` (exit
code 2, condition reason ``OutputConflict``) before it has written or deleted anything.

A claim is refused when

- the prefix is claimed by another job (the uid decides; the same job's restarts and resumes find
  their own claim and go on);
- a claimed prefix contains it or lies inside it (``s3://b/run`` and ``s3://b/run/a`` overlap;
  ``s3://b/run-2`` does not);
- the prefix already holds files and no run record of this same job (files kubetune did not write
  for this job: a prefix used before claims existed is adopted only by the job whose ``run.json``
  it holds);
- the output is, or lies inside, one of the job's own inputs (model, dataset): every later attempt
  would read its own checkpoints as data.

Two jobs claiming overlapping (not equal) prefixes at the same moment may both be refused: each
writes its claim first and then looks for the other's, so at least one of them sees the other;
a refused job removes its own fresh claim again. Nobody is ever allowed in by the race.

Deletes (checkpoint pruning, republishing, torn-checkpoint cleanup) go through
:func:`require_claim` first and then touch only keys under the claimed prefix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from kubetune.errors import InvalidInputError
from kubetune.storage import ObjectStore

if TYPE_CHECKING:
    from kubetune.run.plan import RunPlan

OWNER_FILE: Final = "_OWNER.json"
RUN_RECORD: Final = "run.json"  # kubetune.run.artifacts.RUN_RECORD_FILE (not imported: plan pulls in the API)
OWNER_VERSION: Final = 1


class OutputConflictError(InvalidInputError):
    """The output prefix belongs to another job, overlaps another job's, or overlaps an input."""

    reason = "OutputConflict"


@dataclass(frozen=True)
class Owner:
    """Who holds an output prefix: the content of ``_OWNER.json``."""

    kind: str
    namespace: str
    name: str
    uid: str | None = None
    claimed_at: str = ""
    version: int = OWNER_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Owner:
        """Parse a claim; raises ``ValueError`` when it is not one."""
        try:
            data = json.loads(raw)
            uid = data.get("uid")
            return cls(
                kind=str(data["kind"]),
                namespace=str(data["namespace"]),
                name=str(data["name"]),
                uid=str(uid) if uid else None,
                claimed_at=str(data.get("claimed_at", "")),
                version=int(data.get("version", OWNER_VERSION)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not an ownership claim: {e}") from e

    def same(self, other: Owner | dict[str, Any] | None) -> bool:
        """Whether ``other`` names this job. The uid decides when both have one: a job deleted
        and created again under the same name is another job."""
        if other is None:
            return False
        data = asdict(other) if isinstance(other, Owner) else other
        if not isinstance(data, dict):
            return False
        if data.get("uid") and self.uid:
            return bool(data["uid"] == self.uid)
        return bool(data.get("namespace") == self.namespace and data.get("name") == self.name)

    def describe(self) -> str:
        uid = f" (uid {self.uid})" if self.uid else ""
        return f"{self.kind} {self.namespace}/{self.name}{uid}"


def normalise(uri: str) -> str:
    """A prefix URI without trailing slashes, for comparing prefixes."""
    return uri.rstrip("/")


def overlap(output: str, other: str) -> str | None:
    """How prefix ``output`` relates to prefix ``other``: ``"equal"``, ``"inside"`` (output is under
    other), ``"contains"`` (other is under output), or ``None``. Prefixes are directories:
    ``s3://b/run`` never covers ``s3://b/run-old``."""
    a, b = normalise(output), normalise(other)
    if a == b:
        return "equal"
    if a.startswith(b + "/"):
        return "inside"
    if b.startswith(a + "/"):
        return "contains"
    return None


def ancestors(uri: str) -> list[str]:
    """Every parent prefix of ``uri`` below the scheme and bucket (``s3://b/x/y`` -> ``s3://b/x``,
    ``s3://b``), nearest first."""
    scheme, sep, rest = normalise(uri).partition("://")
    parts = rest.split("/")
    # file:///a/b -> ["", "a", "b"]: the root itself is never an output.
    return [f"{scheme}{sep}{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1) if parts[:i] != [""]]


def plan_inputs(plan: RunPlan) -> list[tuple[str, str]]:
    """``(field, uri)`` of everything a run reads, which its output must not lie inside."""
    found = [("model.uri", plan.model_uri), ("dataset.train.uri", plan.dataset.train.uri)]
    if plan.dataset.eval is not None:
        found.append(("dataset.eval.uri", plan.dataset.eval.uri))
    dpo = plan.method.dpo_settings if plan.method is not None else None
    if dpo is not None and dpo.reference_model is not None:
        found.append(("method.dpo.referenceModel.uri", str(dpo.reference_model.uri)))
    distillation = plan.compression.distillation if plan.compression is not None else None
    student = getattr(distillation, "student", None)
    if student is not None and getattr(student, "uri", None):
        found.append(("compression.distillation.student.uri", str(student.uri)))
    return found


def check_inputs(output_uri: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse an output that is, or lies inside, one of the job's inputs (``(field, uri)`` pairs)."""
    for field, uri in inputs:
        relation = overlap(output_uri, uri)
        if relation in ("equal", "inside"):
            where = "is" if relation == "equal" else "lies inside"
            raise OutputConflictError(
                f"output.uri {output_uri} {where} {field} {uri}: the job would read its own outputs "
                "(checkpoints, model) as input on every later attempt; choose an output.uri outside "
                "the model and dataset prefixes"
            )


def _read_claim(store: ObjectStore, uri: str) -> Owner:
    try:
        return Owner.from_json(store.read_bytes(uri))
    except ValueError as e:
        raise OutputConflictError(
            f"{uri} exists but is not a kubetune ownership claim ({e}): refusing to write there; "
            "choose another output.uri"
        ) from e


def claim_output(
    store: ObjectStore, output_uri: str, owner: Owner, inputs: Sequence[tuple[str, str]] = ()
) -> bool:
    """Claim ``output_uri`` for ``owner`` before anything is written there (see the module doc).

    Returns ``True`` when this call created the claim, ``False`` when the job already held it (a
    restart or resume). Raises :class:`OutputConflictError` otherwise.
    """
    check_inputs(output_uri, inputs)
    out = normalise(output_uri)
    claim_uri = f"{out}/{OWNER_FILE}"
    stamped = Owner(owner.kind, owner.namespace, owner.name, owner.uid, datetime.now(UTC).isoformat())
    created = store.create_exclusive(claim_uri, stamped.to_json())
    if not created:
        holder = _read_claim(store, claim_uri)
        if not owner.same(holder):
            raise OutputConflictError(
                f"{out} is claimed by {holder.describe()} (since {holder.claimed_at or 'unknown'}), not "
                f"by {owner.describe()}: kubetune never writes over another job's outputs; choose another "
                "output.uri, or delete that prefix if its job is gone"
            )
    try:
        _check_neighbours(store, out, owner, fresh=created)
    except OutputConflictError:
        if created:
            store.delete_keys(out, [OWNER_FILE])
        raise
    return created


def _check_neighbours(store: ObjectStore, out: str, owner: Owner, *, fresh: bool) -> None:
    for parent in ancestors(out):
        uri = f"{parent}/{OWNER_FILE}"
        if store.exists(uri):
            holder = _read_claim(store, uri)
            if not owner.same(holder):
                raise OutputConflictError(
                    f"{out} lies inside {parent}, claimed by {holder.describe()}: two jobs never share "
                    "an output prefix; choose an output.uri outside it"
                )
    listed = store.list(out)
    for info in listed:
        if info.key.endswith("/" + OWNER_FILE):
            inner = f"{out}/{info.key}"
            holder = _read_claim(store, inner)
            if not owner.same(holder):
                raise OutputConflictError(
                    f"{out} contains {inner.removesuffix('/' + OWNER_FILE)}, claimed by {holder.describe()}: "
                    "two jobs never share an output prefix; choose another output.uri"
                )
    if not fresh:
        return
    others = [info.key for info in listed if info.key != OWNER_FILE]
    if not others:
        return
    record_uri = f"{out}/{RUN_RECORD}"
    previous: Any = None
    if RUN_RECORD in {info.key for info in listed}:
        try:
            previous = json.loads(store.read_bytes(record_uri))
        except ValueError:
            previous = None
    job = previous.get("job") if isinstance(previous, dict) else None
    if owner.same(job if isinstance(job, dict) else None):
        return  # written by this job before claims existed: adopted
    if isinstance(previous, dict) and isinstance(job, dict):
        uid = f" (uid {job['uid']})" if job.get("uid") else ""
        whose = (
            f"holds the outputs of job {job.get('namespace')}/{job.get('name')}{uid} "
            f"(status {previous.get('status', 'unknown')})"
        )
    else:
        whose = f"already holds {len(others)} files (e.g. {others[0]}) that no kubetune run of this job wrote"
    raise OutputConflictError(
        f"{out} {whose}, not {owner.describe()}'s: kubetune never writes over or deletes files it did not "
        "write for this job; choose another output.uri or delete that prefix"
    )


def holds_claim(store: ObjectStore, output_uri: str, owner: Owner) -> bool:
    """Whether ``output_uri`` is claimed by ``owner`` (a claim that is not one counts as not)."""
    claim_uri = f"{normalise(output_uri)}/{OWNER_FILE}"
    if not store.exists(claim_uri):
        return False
    try:
        return owner.same(Owner.from_json(store.read_bytes(claim_uri)))
    except ValueError:
        return False


def require_claim(store: ObjectStore, output_uri: str, owner: Owner) -> None:
    """Before deleting anything under ``output_uri``: the prefix must be claimed by ``owner``."""
    claim_uri = f"{normalise(output_uri)}/{OWNER_FILE}"
    if not store.exists(claim_uri):
        raise OutputConflictError(
            f"{normalise(output_uri)} is not claimed by {owner.describe()} ({OWNER_FILE} is missing): "
            "refusing to delete anything there"
        )
    holder = _read_claim(store, claim_uri)
    if not owner.same(holder):
        raise OutputConflictError(
            f"{normalise(output_uri)} is claimed by {holder.describe()}, not by {owner.describe()}: "
            "refusing to delete anything there"
        )


def republish(
    store: ObjectStore, owner: Owner, output_uri: str, local_dir: Any, uri: str, exclude: Sequence[str] = ()
) -> list[str]:
    """Upload ``local_dir`` to prefix ``uri`` (under the claimed ``output_uri``), then delete the
    objects of an earlier publication that the new one does not have. Never delete-then-upload:
    a reader during the upload sees the previous files, each object replaced whole by its new
    version, then the stale names go away. Returns the keys deleted."""
    written = store.upload_dir(local_dir, uri, exclude=exclude)
    prefix = normalise(uri)
    new = {w.removeprefix(prefix + "/") for w in written}
    stale = [info.key for info in store.list(prefix) if info.key not in new]
    if stale:
        require_claim(store, output_uri, owner)
        store.delete_keys(prefix, stale)
    return stale
