"""The checkpoint commit protocol, retention, resume checks, the output guard and the pure parts of
the training setup, against a ``file://`` store (no processes, no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.spec import Precision
from kubetune.errors import InvalidInputError, RetriableError
from kubetune.run.plan import JobRef, RunPlan, plan_finetune
from kubetune.storage import FileStore
from kubetune.trainer.checkpoint import (
    CheckpointPublisher,
    CommitRecord,
    FileRecord,
    check_resumable,
    download_checkpoint,
    job_identity,
    latest_committed,
    merge_file_records,
    prepare_resume,
    prune,
    same_job,
    scan_checkpoints,
)
from kubetune.trainer.outputs import final_metrics, guard_output
from kubetune.trainer.training import Distributed, deepspeed_config, resolve_precision

pytestmark = pytest.mark.unit

STORE = FileStore()


def make_plan(output: Path, *, uid: str | None = "uid-1", name: str = "tune", **deepspeed: object) -> RunPlan:
    from kubetune.api.resources import FineTuneJob

    metadata = {"name": name, "namespace": "default", **({"uid": uid} if uid else {})}
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": metadata,
            "spec": {
                "model": {"uri": "file:///models/base"},
                "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
                "hyperparameters": {"maxSteps": 10, "perDeviceBatchSize": 4},
                "deepspeed": {"zeroStage": 2, **deepspeed},
                "output": {"uri": output.as_uri()},
            },
        }
    )
    return plan_finetune(job)


ONE_PROCESS = Distributed(
    rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, accelerator="cpu"
)


def trainer_checkpoint(root: Path, step: int, content: bytes = b"weights") -> Path:
    """What the Trainer leaves in checkpoint-N (a few representative files)."""
    local = root / f"checkpoint-{step}"
    (local / f"global_step{step}").mkdir(parents=True)
    (local / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(content * 3)
    (local / "model.safetensors").write_bytes(content)
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return local


def publish(plan: RunPlan, tmp: Path, step: int, keep_last: int = 2, content: bytes = b"weights") -> None:
    guard_output(STORE, plan)  # as the runtimes do: the job claims its output before writing
    publisher = CheckpointPublisher(STORE, plan, ONE_PROCESS, keep_last=keep_last)
    publisher.publish(step, trainer_checkpoint(tmp / "local", step, content))


def test_publishing_uploads_then_commits_with_sizes_and_hashes(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "out")

    publish(plan, tmp_path, 5)

    stored = tmp_path / "out" / "checkpoints" / "step-5"
    marker = CommitRecord.from_json((stored / "_COMMITTED.json").read_bytes())
    assert marker.step == 5
    assert marker.world_size == 1
    assert marker.job == {"namespace": "default", "name": "tune", "uid": "uid-1"}
    assert {f.path: f.size for f in marker.files} == {
        "global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt": 21,
        "model.safetensors": 7,
        "trainer_state.json": len(json.dumps({"global_step": 5})),
    }
    import hashlib

    model = next(f for f in marker.files if f.path == "model.safetensors")
    assert model.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert not (tmp_path / "local" / "checkpoint-5").exists(), "the local copy is dropped once stored"


def test_retention_keeps_the_newest_committed_and_drops_torn_ones_older_than_them(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "out")
    guard_output(STORE, plan)
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "step-3").mkdir(parents=True)
    (checkpoints / "step-3" / "model.safetensors").write_bytes(b"torn")
    (tmp_path / "out" / "model").mkdir()
    (tmp_path / "out" / "model" / "keep.me").write_bytes(b"not a checkpoint")
    for step in (2, 4, 6):
        publish(plan, tmp_path, step)
    (checkpoints / "step-8").mkdir()
    (checkpoints / "step-8" / "model.safetensors").write_bytes(b"being uploaded")

    assert prune(STORE, scan_checkpoints(STORE, plan), keep_last=2, plan=plan) == []  # publish already pruned
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-6", "step-8"]
    assert (tmp_path / "out" / "model" / "keep.me").is_file()


def test_the_best_checkpoint_outlives_keep_last_in_storage_and_locally(tmp_path: Path) -> None:
    """With early stopping the publisher learns the best evaluation's step: that checkpoint is
    never pruned, and its local copy stays for the Trainer to load, until a better one comes."""
    plan = make_plan(tmp_path / "out")
    guard_output(STORE, plan)
    publisher = CheckpointPublisher(STORE, plan, ONE_PROCESS, keep_last=1)
    local = tmp_path / "local"
    for step, best in ((2, 2), (4, 4), (6, 4), (8, 4)):
        publisher.publish(step, trainer_checkpoint(local, step), best)
    stored = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in stored.iterdir()) == ["step-4", "step-8"]
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint-4"]

    publisher.publish(10, trainer_checkpoint(local, 10), 10)
    assert sorted(p.name for p in stored.iterdir()) == ["step-10"]
    assert sorted(p.name for p in local.iterdir()) == ["checkpoint-10"]


def test_a_torn_or_tampered_checkpoint_is_never_the_one_to_resume(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "out")
    for step in (2, 4, 6):
        publish(plan, tmp_path, step, keep_last=10)
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "step-6" / "model.safetensors").write_bytes(b"truncated")  # size differs
    (checkpoints / "step-8").mkdir()
    (checkpoints / "step-8" / "model.safetensors").write_bytes(b"weights")  # no marker
    (checkpoints / "step-10").mkdir()
    (checkpoints / "step-10" / "_COMMITTED.json").write_text("{not json")
    (checkpoints / "notes.txt").write_text("ignored")

    found = {c.step: c for c in scan_checkpoints(STORE, plan)}

    assert sorted(found) == [2, 4, 6, 8, 10]
    assert found[6].problem == "model.safetensors has 9 bytes, the marker says 7"
    assert found[8].problem == "no commit marker (torn upload)"
    assert found[10].problem is not None
    assert found[10].problem.startswith("unreadable commit marker")
    newest = latest_committed(list(found.values()))
    assert newest is not None
    assert newest.step == 4


def test_a_downloaded_checkpoint_is_checked_against_its_marker(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "out")
    publish(plan, tmp_path, 4)
    stored = tmp_path / "out" / "checkpoints" / "step-4"
    (stored / "stray.bin").write_bytes(b"not in the marker")
    checkpoint = latest_committed(scan_checkpoints(STORE, plan))
    assert checkpoint is not None

    local = download_checkpoint(STORE, checkpoint, tmp_path / "resume" / "checkpoint-4")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "model.safetensors",
        "trainer_state.json",
    ]

    (stored / "model.safetensors").write_bytes(b"WEIGHTS")  # same size, other content
    with pytest.raises(RetriableError, match="does not match its commit marker"):
        download_checkpoint(STORE, checkpoint, tmp_path / "again")


def test_resume_refuses_another_jobs_checkpoint_and_another_world_size(tmp_path: Path) -> None:
    publish(make_plan(tmp_path / "out", uid="uid-1"), tmp_path, 4)
    ours = make_plan(tmp_path / "out", uid="uid-1")
    checkpoint = latest_committed(scan_checkpoints(STORE, ours))
    assert checkpoint is not None

    check_resumable(checkpoint, ours, world_size=1)
    with pytest.raises(InvalidInputError, match=r"written by 1 training processes but this run has 4"):
        check_resumable(checkpoint, ours, world_size=4)
    recreated = make_plan(tmp_path / "out", uid="uid-2")
    with pytest.raises(InvalidInputError, match=r"belongs to job default/tune \(uid uid-1\)"):
        check_resumable(checkpoint, recreated, world_size=1)


def test_resuming_downloads_the_newest_committed_and_clears_this_jobs_torn_leftovers(tmp_path: Path) -> None:
    plan = make_plan(tmp_path / "out")
    publish(plan, tmp_path, 4)
    torn = tmp_path / "out" / "checkpoints" / "step-8"
    torn.mkdir()
    (torn / "rng_state_7.pth").write_bytes(b"from the killed attempt")
    claim = tmp_path / "out" / "_OWNER.json"
    claimed = claim.read_bytes()
    claim.unlink()

    kept = prepare_resume(STORE, plan, ONE_PROCESS, tmp_path / "a", owned=True)
    assert kept is not None
    assert torn.is_dir(), "a prefix not known to be ours (no claim) is left alone"
    claim.write_bytes(claimed)

    resume = prepare_resume(STORE, plan, ONE_PROCESS, tmp_path / "b", owned=True)
    assert resume is not None
    assert (resume.step, resume.uri) == (4, f"{(tmp_path / 'out').as_uri()}/checkpoints/step-4")
    assert resume.local_dir == tmp_path / "b" / "checkpoint-4"
    assert (resume.local_dir / "trainer_state.json").is_file()
    assert not torn.exists(), "step 8 will be saved again; its leftovers must not mix in"


def test_nodes_reporting_the_same_file_must_agree_on_its_content() -> None:
    a = FileRecord("latest", 10, "aa")
    b = FileRecord("global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt", 20, "bb")
    assert merge_file_records([[a], [a, b]]) == (b, a)
    with pytest.raises(RetriableError, match="different content by two nodes"):
        merge_file_records([[a], [FileRecord("latest", 10, "cc")]])


def test_jobs_are_told_apart_by_uid_then_by_namespace_and_name() -> None:
    job = JobRef(api_version="kubetune.io/v1alpha1", kind="FineTuneJob", namespace="ns", name="a", uid="u1")
    assert same_job(job_identity(job), job)
    assert not same_job({"namespace": "ns", "name": "a", "uid": "u0"}, job)
    assert same_job({"namespace": "ns", "name": "a", "uid": None}, job)
    assert not same_job({"namespace": "other", "name": "a"}, job)
    assert not same_job(None, job)


def test_the_output_guard_protects_other_jobs_and_foreign_models(tmp_path: Path) -> None:
    output = tmp_path / "out"
    (output / "model").mkdir(parents=True)
    (output / "model" / "config.json").write_text("{}")
    plan = make_plan(output)
    with pytest.raises(InvalidInputError, match="that no kubetune run of this job wrote"):
        guard_output(STORE, plan)
    assert not (output / "_OWNER.json").exists(), "a refused claim is taken back"

    # A prefix written before claims existed is adopted by the job whose run record it holds.
    (output / "run.json").write_text(json.dumps({"job": job_identity(plan.job), "status": "running"}))
    assert guard_output(STORE, plan) == {"job": job_identity(plan.job), "status": "running"}
    assert guard_output(STORE, plan) == {"job": job_identity(plan.job), "status": "running"}, "a restart"

    other = make_plan(output, uid="uid-9", name="other")
    with pytest.raises(InvalidInputError, match=r"claimed by FineTuneJob default/tune \(uid uid-1\)"):
        guard_output(STORE, other)

    (output / "run.json").write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="is not a kubetune run record"):
        guard_output(STORE, plan)


def test_cpu_training_runs_in_fp32_and_refuses_half_precision() -> None:
    assert resolve_precision(Precision.auto, "cpu") == Precision.fp32
    assert resolve_precision(Precision.fp32, "cpu") == Precision.fp32
    for half in (Precision.bf16, Precision.fp16):
        with pytest.raises(InvalidInputError, match=f"precision is {half.value}, which needs a GPU"):
            resolve_precision(half, "cpu")


def test_the_deepspeed_config_gets_precision_and_an_optimizer_that_fits_the_hardware(tmp_path: Path) -> None:
    offloaded = make_plan(tmp_path, zeroStage=3, offloadOptimizer=True, offloadParams=True)

    on_cpu = deepspeed_config(offloaded, Precision.fp32, "cpu")
    assert on_cpu["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in on_cpu
    assert on_cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert on_cpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert on_cpu["bf16"] == {"enabled": False}
    assert on_cpu["fp16"] == {"enabled": False}

    on_gpu = deepspeed_config(offloaded, Precision.bf16, "cuda")
    assert on_gpu["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam steps the offloaded states
    assert on_gpu["bf16"] == {"enabled": True}
    assert "zero_force_ds_cpu_optimizer" not in on_gpu

    plain = deepspeed_config(make_plan(tmp_path), Precision.fp16, "cuda")
    assert "optimizer" not in plain
    assert plain["fp16"] == {"enabled": True}
    assert plain["train_micro_batch_size_per_gpu"] == 4


def test_final_metrics_report_perplexity_and_never_infinity(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    history = [{"loss": 3.0, "step": 1, "epoch": 0.5}, {"loss": 2.0, "step": 2, "epoch": 1.0}]
    metrics = final_metrics(plan, history, {"eval_loss": 1.5}, global_step=2)
    assert metrics["train_loss"] == 2.0
    assert metrics["perplexity"] == pytest.approx(4.4817, rel=1e-4)
    assert final_metrics(plan, history, {"eval_loss": 1e4}, 2)["perplexity"] is None
    assert final_metrics(plan, [], {}, 0)["eval_loss"] is None
