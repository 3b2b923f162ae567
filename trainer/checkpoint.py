"""Checkpoints in object storage, with a commit protocol, and resuming from them.

Layout: ``<output>/checkpoints/step-N/`` holds the Trainer's ``checkpoint-N`` directory (model
weights, DeepSpeed's ``global_stepN/`` with every rank's ZeRO shards, scheduler, each rank's RNG
state, trainer state with the data position) and, written last, ``_COMMITTED.json``.

Protocol (:class:`CheckpointPublisher`, on every save, in the background while training goes on):

1. every node's first process uploads the files its node wrote (without a shared filesystem each
   node holds only its own ranks' shards), then writes ``_NODE-<node>.json`` listing their sizes
   and sha256;
2. rank 0 waits for every node's report, checks that storage lists every file with its size, and
   only then writes ``_COMMITTED.json`` (files, sizes, sha256, step, world size, job, time);
3. rank 0 keeps the newest ``keepLast`` committed checkpoints (and, with early stopping, the best
   evaluation's, :mod:`~kubetune.trainer.early_stopping`) and deletes older committed ones and
   torn ones older than the newest committed; nothing outside ``<output>/checkpoints/`` is touched,
   nothing is deleted unless the job holds the output's claim (:mod:`kubetune.ownership`), and a
   checkpoint committed by another job is never deleted.

A checkpoint without its marker, or whose objects disagree with the marker, is *torn* (the
process died mid-upload) and is never resumed from (:func:`scan_checkpoints`,
:func:`prepare_resume`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from transformers import TrainerCallback

from kubetune.errors import InvalidInputError, RetriableError
from kubetune.ownership import Owner, holds_claim
from kubetune.run.artifacts import COMMIT_MARKER, join_uri
from kubetune.run.plan import JobRef, RunPlan
from kubetune.storage import ObjectStore
from kubetune.trainer.training import (
    Distributed,
    barrier,
    broadcast_object,
    local_main_first,
)

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

STEP_PREFIX: Final = "step-"
LOCAL_PREFIX: Final = "checkpoint-"  # transformers' PREFIX_CHECKPOINT_DIR
RECORD_VERSION: Final = 1
_STEP_DIR: Final = re.compile(r"^step-(\d+)$")
_HASH_CHUNK: Final = 8 * 1024 * 1024
NODE_REPORT_PREFIX: Final = "_NODE-"
# How long rank 0 waits for the other nodes' uploads of one checkpoint (matches the collectives'
# timeout: a node that takes longer is as good as lost).
COMMIT_TIMEOUT_S: Final = 2 * 3600.0


# --- the commit record ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint, relative to its ``step-N/`` prefix."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CommitRecord:
    """The content of ``_COMMITTED.json``: what a complete checkpoint holds."""

    step: int
    world_size: int
    files: tuple[FileRecord, ...]
    job: dict[str, str | None]
    committed_at: str
    version: int = RECORD_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CommitRecord:
        """Parse a marker; raises ``ValueError`` when it is not one."""
        try:
            data = json.loads(raw)
            files = tuple(
                FileRecord(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
                for f in data["files"]
            )
            return cls(
                step=int(data["step"]),
                world_size=int(data["world_size"]),
                files=files,
                job=dict(data["job"]),
                committed_at=str(data["committed_at"]),
                version=int(data.get("version", RECORD_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a commit record: {e}") from e


def job_identity(job: JobRef) -> dict[str, str | None]:
    """What names a job across restarts: its namespace, name and uid."""
    return {"namespace": job.namespace, "name": job.name, "uid": job.uid}


def same_job(identity: dict[str, Any] | None, job: JobRef) -> bool:
    """Whether ``identity`` (from a marker or run record) names ``job``. The uid decides when
    both sides have one: a job deleted and created again under the same name is another job."""
    if not isinstance(identity, dict):
        return False
    if identity.get("uid") and job.uid:
        return bool(identity["uid"] == job.uid)
    return bool(identity.get("namespace") == job.namespace and identity.get("name") == job.name)


def describe_job(identity: dict[str, Any] | None) -> str:
    if not isinstance(identity, dict):
        return "an unknown job"
    uid = f" (uid {identity['uid']})" if identity.get("uid") else ""
    return f"{identity.get('namespace')}/{identity.get('name')}{uid}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(local_dir: Path) -> list[FileRecord]:
    """Size and sha256 of every file under ``local_dir``, by ``/``-separated relative path."""
    return [
        FileRecord(path.relative_to(local_dir).as_posix(), path.stat().st_size, sha256_file(path))
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file())
    ]


def merge_file_records(reports: Sequence[Sequence[FileRecord]]) -> tuple[FileRecord, ...]:
    """One list from every node's report. Nodes that share a filesystem report the same files;
    the same path with different content would make the stored object unpredictable."""
    merged: dict[str, FileRecord] = {}
    for report in reports:
        for record in report:
            seen = merged.setdefault(record.path, record)
            if seen != record:
                raise RetriableError(
                    f"checkpoint file {record.path} was written with different content by two nodes "
                    f"({seen.sha256[:12]}, {seen.size} bytes vs {record.sha256[:12]}, {record.size} bytes)"
                )
    return tuple(sorted(merged.values(), key=lambda r: r.path))


# --- what storage holds --------------------------------------------------------------------------


def checkpoints_uri(plan: RunPlan) -> str:
    return plan.artifacts.checkpoints_uri


def step_uri(plan: RunPlan, step: int) -> str:
    return join_uri(plan.artifacts.checkpoints_uri, f"{STEP_PREFIX}{step}")


@dataclass(frozen=True)
class StoredCheckpoint:
    """One ``step-N/`` prefix as storage lists it."""

    step: int
    uri: str
    objects: dict[str, int]
    """Key (relative to the prefix) to size, the marker excluded."""
    record: CommitRecord | None = None
    problem: str | None = None
    """Why it cannot be resumed from (no marker, objects missing or of the wrong size)."""

    @property
    def committed(self) -> bool:
        return self.record is not None and self.problem is None


def _verify(step: int, objects: dict[str, int], record: CommitRecord) -> str | None:
    if record.step != step:
        return f"its marker names step {record.step}"
    for f in record.files:
        size = objects.get(f.path)
        if size is None:
            return f"{f.path} is listed in the marker but missing"
        if size != f.size:
            return f"{f.path} has {size} bytes, the marker says {f.size}"
    return None


def scan_checkpoints(store: ObjectStore, plan: RunPlan) -> list[StoredCheckpoint]:
    """Every ``step-N/`` under ``<output>/checkpoints``, oldest first, each checked against its
    marker. One listing, plus one read per marker."""
    root = checkpoints_uri(plan)
    grouped: dict[int, dict[str, int]] = {}
    markers: set[int] = set()
    for info in store.list(root):
        head, _, rest = info.key.partition("/")
        match = _STEP_DIR.match(head)
        if match is None or not rest:
            continue
        step = int(match.group(1))
        objects = grouped.setdefault(step, {})
        if rest == COMMIT_MARKER:
            markers.add(step)
        else:
            objects[rest] = info.size
    found = []
    for step in sorted(grouped):
        uri = f"{root}/{STEP_PREFIX}{step}"
        objects = grouped[step]
        if step not in markers:
            found.append(StoredCheckpoint(step, uri, objects, problem="no commit marker (torn upload)"))
            continue
        try:
            record = CommitRecord.from_json(store.read_bytes(f"{uri}/{COMMIT_MARKER}"))
        except ValueError as e:
            found.append(StoredCheckpoint(step, uri, objects, problem=f"unreadable commit marker: {e}"))
            continue
        found.append(StoredCheckpoint(step, uri, objects, record, _verify(step, objects, record)))
    return found


def latest_committed(checkpoints: Sequence[StoredCheckpoint]) -> StoredCheckpoint | None:
    committed = [c for c in checkpoints if c.committed]
    return max(committed, key=lambda c: c.step) if committed else None


def prune(
    store: ObjectStore,
    checkpoints: Sequence[StoredCheckpoint],
    keep_last: int,
    *,
    plan: RunPlan,
    keep: Collection[int] = (),
) -> list[int]:
    """Delete this job's committed checkpoints beyond its newest ``keep_last`` (except the steps in
    ``keep``: the best evaluation's) and torn ones older than the newest committed one (a torn one
    newer than that may still be being written). Returns the deleted steps.

    Only under an output prefix this job has claimed (:mod:`kubetune.ownership`), and never a
    checkpoint committed by another job: nothing is deleted that this job did not write."""
    if not holds_claim(store, plan.output_uri, owner_of(plan.job)):
        log.warning("not pruning checkpoints: %s is not claimed by this job", plan.output_uri)
        return []
    committed = sorted(
        (c for c in checkpoints if c.committed and c.record is not None and same_job(c.record.job, plan.job)),
        key=lambda c: c.step,
        reverse=True,
    )
    if not committed:
        return []
    newest = committed[0].step
    doomed = [c for c in committed[keep_last:] if c.step not in keep]
    doomed += [c for c in checkpoints if not c.committed and c.step < newest]
    for c in sorted(doomed, key=lambda c: c.step):
        # Only ever a step-N/ prefix that scan_checkpoints found under <output>/checkpoints.
        store.delete_prefix(c.uri)
    return sorted(c.step for c in doomed)


def owner_of(job: JobRef) -> Owner:
    """The ownership claim of ``job`` (what ``_OWNER.json`` names)."""
    return Owner(kind=job.kind, namespace=job.namespace, name=job.name, uid=job.uid)


# --- resume --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """The committed checkpoint a run continues from, downloaded for the Trainer."""

    step: int
    uri: str
    local_dir: Path


def check_resumable(checkpoint: StoredCheckpoint, plan: RunPlan, world_size: int) -> None:
    """Refuse another job's checkpoint, and one written by a gang of another size (ZeRO shards
    are per rank)."""
    record = checkpoint.record
    assert record is not None
    if not same_job(record.job, plan.job):
        raise InvalidInputError(
            f"{checkpoint.uri} belongs to job {describe_job(record.job)}, not to "
            f"{describe_job(job_identity(plan.job))}: kubetune never resumes from or overwrites another "
            "job's checkpoints; choose another output.uri"
        )
    if record.world_size != world_size:
        raise InvalidInputError(
            f"{checkpoint.uri} was written by {record.world_size} training processes but this run has "
            f"{world_size}; DeepSpeed ZeRO checkpoints hold one shard per process, so resume with "
            f"workers x processesPerWorker = {record.world_size}, or delete {checkpoints_uri_of(checkpoint)} "
            "to start over"
        )


def checkpoints_uri_of(checkpoint: StoredCheckpoint) -> str:
    return checkpoint.uri.rsplit("/", 1)[0]


def download_checkpoint(store: ObjectStore, checkpoint: StoredCheckpoint, local_dir: Path) -> Path:
    """Download a committed checkpoint into ``local_dir`` and check every file's size and sha256
    against the marker; files the marker does not list are removed."""
    record = checkpoint.record
    assert record is not None
    if local_dir.exists():
        shutil.rmtree(local_dir)
    store.download_prefix(checkpoint.uri, local_dir)
    (local_dir / COMMIT_MARKER).unlink(missing_ok=True)
    expected = {f.path: f for f in record.files}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel not in expected:
            path.unlink()
    for f in record.files:
        path = local_dir / f.path
        if not path.is_file() or path.stat().st_size != f.size or sha256_file(path) != f.sha256:
            raise RetriableError(
                f"{checkpoint.uri}/{f.path} does not match its commit marker after download "
                "(size or sha256 differs); the object changed or the transfer was corrupted"
            )
    return local_dir


def prepare_resume(
    store: ObjectStore, plan: RunPlan, dist: Distributed, trainer_dir: Path, *, owned: bool = False
) -> Resume | None:
    """Find the newest committed checkpoint (rank 0 decides, so every rank agrees), check it, and
    download it once per node into ``trainer_dir/checkpoint-N`` for ``trainer.train``.

    Torn checkpoints newer than the one resumed from are leftovers of this job's killed attempt
    when the output prefix is claimed by this job (:mod:`kubetune.ownership`: nobody else can
    have written there), and are deleted (the steps will be saved again); otherwise they are left
    alone. ``owned`` is accepted for compatibility; the claim decides."""
    chosen: StoredCheckpoint | None = None
    torn: list[StoredCheckpoint] = []
    if dist.is_main:
        checkpoints = scan_checkpoints(store, plan)
        chosen = latest_committed(checkpoints)
        torn = [c for c in checkpoints if not c.committed and (chosen is None or c.step > chosen.step)]
        for c in torn:
            log.warning("ignoring checkpoint %s: %s", c.uri, c.problem)
    chosen = broadcast_object(chosen)
    if chosen is not None:
        check_resumable(chosen, plan, dist.world_size)
    if dist.is_main and torn and holds_claim(store, plan.output_uri, owner_of(plan.job)):
        for c in torn:
            store.delete_prefix(c.uri)
    if chosen is None:
        log.info("no committed checkpoint under %s: starting from the base model", checkpoints_uri(plan))
        return None
    local_dir = trainer_dir / f"{LOCAL_PREFIX}{chosen.step}"
    with local_main_first(dist):
        if dist.is_local_main:
            started = time.monotonic()
            download_checkpoint(store, chosen, local_dir)
            log.info(
                "downloaded checkpoint %s (%d files, %.1f MB) in %.1fs",
                chosen.uri,
                len(chosen.record.files) if chosen.record else 0,
                (chosen.record.total_bytes if chosen.record else 0) / 1e6,
                time.monotonic() - started,
            )
    log.info("resuming from committed checkpoint %s (step %d)", chosen.uri, chosen.step)
    return Resume(step=chosen.step, uri=chosen.uri, local_dir=local_dir)


# --- publishing ----------------------------------------------------------------------------------


def node_report_name(node: int) -> str:
    """The object in which one node lists the files it uploaded for a checkpoint."""
    return f"{NODE_REPORT_PREFIX}{node}.json"


@dataclass
class PublishStats:
    """What the publisher did, for the run record."""

    committed: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0


class CheckpointPublisher(TrainerCallback):
    """Uploads each checkpoint the Trainer saves and commits it (see the module docstring).

    Uploads run in a background thread, overlapping the next training steps: each node's first
    process uploads its node's files and then writes a node report object; rank 0's thread waits
    for every node's report, then writes the commit marker. Only storage is touched in the
    background (no collectives), and at most one checkpoint per node is in flight: the next save,
    and the end of training, wait for it and re-raise its failure.

    ``after_commit(step, uri)`` runs on rank 0 after each commit (the recipe reports the commit to
    the job's status and uploads TensorBoard logs there).
    """

    def __init__(
        self,
        store: ObjectStore,
        plan: RunPlan,
        dist: Distributed,
        *,
        keep_last: int,
        after_commit: Callable[[int, str], None] | None = None,
        commit_timeout_s: float = COMMIT_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.plan = plan
        self.dist = dist
        self.keep_last = keep_last
        self.after_commit = after_commit
        self.commit_timeout_s = commit_timeout_s
        self.stats = PublishStats()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._kept: Path | None = None  # the best step's local copy (early stopping)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        assert args.output_dir is not None, "the recipe always sets output_dir"
        # With early stopping the Trainer has judged this step's evaluation before saving it.
        best = state.best_global_step if args.load_best_model_at_end else None
        self.wait()
        barrier()  # every local rank has written its files
        if self.dist.is_local_main:
            local_dir = Path(args.output_dir) / f"{LOCAL_PREFIX}{step}"
            self._thread = threading.Thread(
                target=self._publish_in_background,
                args=(step, local_dir, best),
                name=f"checkpoint-{step}",
                daemon=True,
            )
            self._thread.start()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.wait()

    def wait(self) -> None:
        """Block until the checkpoint in flight is uploaded (and, on rank 0, committed)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _publish_in_background(self, step: int, local_dir: Path, best: int | None) -> None:
        try:
            self.publish(step, local_dir, best)
        except BaseException as e:
            self._error = e

    def publish(self, step: int, local_dir: Path, best: int | None = None) -> None:
        """Upload this node's files of ``step``, report them, and commit on rank 0. ``best`` is
        the best evaluation's step (early stopping): its local copy stays for the Trainer to load
        at the end, and its stored one is never pruned."""
        started = time.monotonic()
        uri = step_uri(self.plan, step)
        files = describe_files(local_dir) if local_dir.is_dir() else []
        if files:
            self.store.upload_dir(local_dir, uri)
        report = json.dumps([asdict(f) for f in files]).encode()
        self.store.write_bytes(f"{uri}/{node_report_name(self.dist.node_rank)}", report)
        self._keep_locally(local_dir if step == best else None, local_dir)
        if self.dist.is_main:
            self._commit(step, uri, self._gather_reports(uri), best)
        self.stats.seconds += time.monotonic() - started

    def _keep_locally(self, best_dir: Path | None, uploaded: Path) -> None:
        """Stored: the node's scratch space is better kept free, except for the best step's copy."""
        if best_dir is not None:
            if self._kept is not None and self._kept != best_dir:
                shutil.rmtree(self._kept, ignore_errors=True)
            self._kept = best_dir
        elif uploaded != self._kept:
            shutil.rmtree(uploaded, ignore_errors=True)

    def _gather_reports(self, uri: str) -> tuple[FileRecord, ...]:
        names = [node_report_name(node) for node in range(self.dist.nodes)]
        deadline = time.monotonic() + self.commit_timeout_s
        delay = 0.05
        while True:
            present = {info.key for info in self.store.list(uri)}
            if all(name in present for name in names):
                break
            if time.monotonic() > deadline:
                missing = ", ".join(n for n in names if n not in present)
                raise RetriableError(
                    f"checkpoint {uri}: nodes did not report their uploads in time ({missing})"
                )
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        reports = []
        for name in names:
            entries = json.loads(self.store.read_bytes(f"{uri}/{name}"))
            reports.append([FileRecord(e["path"], int(e["size"]), e["sha256"]) for e in entries])
        return merge_file_records(reports)

    def _commit(self, step: int, uri: str, files: tuple[FileRecord, ...], best: int | None = None) -> None:
        listed = {info.key: info.size for info in self.store.list(uri)}
        record = CommitRecord(
            step=step,
            world_size=self.dist.world_size,
            files=files,
            job=job_identity(self.plan.job),
            committed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        problem = _verify(step, listed, record)
        if problem is not None:
            raise RetriableError(f"checkpoint {uri} is incomplete after upload: {problem}")
        self.store.write_bytes(f"{uri}/{COMMIT_MARKER}", record.to_json())
        self.stats.committed.append(step)
        self.stats.bytes += record.total_bytes
        log.info("committed checkpoint %s (%d files, %.1f MB)", uri, len(files), record.total_bytes / 1e6)
        deleted = prune(
            self.store,
            scan_checkpoints(self.store, self.plan),
            self.keep_last,
            plan=self.plan,
            keep=(best,) if best else (),
        )
        if deleted:
            log.info("deleted old checkpoints: %s", ", ".join(f"{STEP_PREFIX}{s}" for s in deleted))
        if self.after_commit is not None:
            self.after_commit(step, uri)
