"""The run directory as a transaction: its states, the one-writer lock, metrics and checkpoints
that survive a kill, strict resume, a full disk. Units here; whole runs in test_resume.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_dpo import fileio
from lora_dpo.config import Config, TrainConfig, dump_config
from lora_dpo.errors import ConfigError, DataError, LoraDpoError
from lora_dpo.faults import FaultHooks, InjectedFault
from lora_dpo.run.directory import RunDirectory, RunState, checkpoint_dirs
from lora_dpo.run.disk import DiskFullError, disk_full_is_an_error
from lora_dpo.run.lock import RunLock
from lora_dpo.run.metrics_file import MetricsFile, records_until
from lora_dpo.run.resume import COSMETIC_KEYS, check_resume
from lora_dpo.train import train
from runs import interrupt, losses, prepare_workdir, run_config, snapshot

ROOT = Path(__file__).resolve().parents[1]


def fake_adapter(directory: Path) -> None:
    """An adapter directory with real files of the right formats (not a trained adapter)."""
    directory.mkdir(parents=True)
    lora = "base_model.model.layers.0.q_proj.lora_"
    save_file(
        {f"{lora}A.weight": torch.zeros(2, 4), f"{lora}B.weight": torch.zeros(4, 2)},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (directory / "tokenizer_config.json").write_text("{}")


# ----------------------------------------------------------------------------- states


def test_states_follow_the_files(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.state() is RunState.ABSENT
    run.path.mkdir()
    (run.path / ".lock").write_text("")
    (run.path / ".metrics.jsonl.x1.tmp").write_text("")  # an atomic write's leftover
    (run.path / ".gitkeep").write_text("")
    assert run.state() is RunState.ABSENT
    assert run.foreign_entries() == [".gitkeep"]  # not ours: an overwrite would lose it
    (run.path / ".gitkeep").unlink()
    run.config_path.write_text("train: {}\n")
    assert run.state() is RunState.STARTED
    (run.checkpoints_dir / "step-000004").mkdir(parents=True)
    assert run.state() is RunState.INTERRUPTED
    fake_adapter(run.adapter_dir)
    assert run.state() is RunState.FINISHED
    (run.path / "notes.txt").write_text("mine")
    assert run.foreign_entries() == ["notes.txt"]

    other = RunDirectory(tmp_path / "other")
    other.path.mkdir()
    (other.path / "model.bin").write_text("not a run")
    assert other.state() is RunState.FOREIGN


def test_checkpoints_are_step_directories_only(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-000012", "step-000004", "step-latest", ".step-000016.ab.tmp", "notes"):
        (root / name).mkdir(parents=True)
    (root / "step-000020").write_text("a file, not a checkpoint")
    assert [p.name for p in checkpoint_dirs(root)] == ["step-000004", "step-000012"]


def test_a_damaged_adapter_is_not_complete(tmp_path):
    run = RunDirectory(tmp_path / "run")
    fake_adapter(run.adapter_dir)
    assert run.adapter_problem() is None
    tokenizer = run.adapter_dir / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:-5])  # what a full disk left before publishing was atomic
    assert run.adapter_problem().startswith(f"{tokenizer}: not valid JSON")
    assert run.state() is RunState.STARTED  # no checkpoint either: nothing to keep
    other = RunDirectory(tmp_path / "other")
    fake_adapter(other.adapter_dir)
    weights = other.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert other.adapter_problem().startswith(f"{weights}: not a complete safetensors file")
    weights.unlink()
    assert other.adapter_problem() == f"{other.adapter_dir}: no adapter_model.safetensors"
    assert RunDirectory(tmp_path / "none").adapter_problem() == "not saved"


def test_staged_overwrite_is_a_hidden_sibling_and_resume_prefers_it(tmp_path):
    run = RunDirectory(tmp_path / "run")
    staged = run.staged_overwrite()
    assert staged.path == (tmp_path / ".run.overwrite").absolute()
    assert run.resume_source() is run
    (staged.checkpoints_dir / "step-000004").mkdir(parents=True)
    assert run.resume_source().path == staged.path


# ----------------------------------------------------------------------------- lock


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run / ".lock", run):
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(
            ConfigError, match=rf"being written by another training run \(pid {os.getpid()} on "
        ):
            RunLock(run / ".lock", run).acquire()
    with RunLock(run / ".lock", run) as lock:  # released: free again
        assert lock.held


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lora_dpo.run.lock import RunLock
lock = RunLock(Path(sys.argv[1]) / ".lock", Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_the_lock_is_held_across_processes_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"pid {holder.pid} on "):
            RunLock(run / ".lock", run).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run / ".lock", run) as lock:  # a killed holder leaves no stale lock
        assert lock.held


# ----------------------------------------------------------------------------- metrics.jsonl


def write_lines(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_resume_drops_a_cut_short_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": s, "loss": 0.5}) for s in range(1, 6)]
    path.write_text("\n".join(records) + '\n{"step": 6, "lo')  # a SIGKILL mid-append
    with caplog.at_level(logging.WARNING):
        assert records_until(path, 4) == records[:4]
    assert "line 6 is cut short" in caplog.text
    MetricsFile(path, started=0.0, keep_until_step=5).write({"step": 6, "loss": 0.4})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_lines(path, json.dumps({"step": 1}), "garbage", json.dumps({"step": 2}))
    with pytest.raises(LoraDpoError, match=r"metrics.jsonl line 2 is not a JSON record"):
        records_until(path, 2)
    write_lines(path, json.dumps({"step": 1}), json.dumps({"loss": 1.0}), json.dumps({"step": 2}))
    with pytest.raises(LoraDpoError, match=r"line 2 is not a metrics record"):
        records_until(path, 2)


# ----------------------------------------------------------------------------- resume settings


def test_resume_refuses_each_change_to_what_the_run_computes(tmp_path):
    saved = Config()
    asked = Config()
    asked.train.beta = 0.05
    asked.data.max_pairs = 10
    asked.train.per_device_batch_size = 2
    with pytest.raises(ConfigError) as refused:
        check_resume(saved, asked, tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert "train.beta: the run used 0.1, this resume asks for 0.05" in message
    assert "data.max_pairs: the run used 0, this resume asks for 10" in message
    assert "train.per_device_batch_size: the run used 4, this resume asks for 2" in message


def test_resume_accepts_and_reports_cosmetic_changes():
    saved, asked = Config(), Config()
    asked.train.logging_steps = 1
    asked.train.save_steps = 7
    asked.train.output_dir = "moved/run"
    assert check_resume(saved, asked, Path("moved/run")) == {
        "train.output_dir": {"run": "runs/train", "resume": "moved/run"},
        "train.logging_steps": {"run": 10, "resume": 1},
        "train.save_steps": {"run": 100, "resume": 7},
    }
    assert check_resume(saved, Config(), Path("x")) == {}


def test_cosmetic_keys_are_train_fields():
    fields = set(TrainConfig.__dataclass_fields__)
    assert {key.removeprefix("train.") for key in COSMETIC_KEYS} <= fields
    assert "train.beta" not in COSMETIC_KEYS and "train.seed" not in COSMETIC_KEYS


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path):
    target = tmp_path / "run" / "config.yaml"
    with pytest.raises(DiskFullError) as full:
        with disk_full_is_an_error(target):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
    message = str(full.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"no space left on device writing {re.escape(str(target))} \(free there: \d+ MB\); "
        "the files written before it are intact",
        message,
    )
    with pytest.raises(DiskFullError, match="disk quota exceeded"):
        with disk_full_is_an_error(target):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    # safetensors (Rust) reports the OS error in its message only
    with pytest.raises(DiskFullError, match=str(target)):
        with disk_full_is_an_error(target):
            raise RuntimeError("Error while serializing: No space left on device (os error 28)")
    with pytest.raises(PermissionError):  # other errors pass unchanged
        with disk_full_is_an_error(target):
            raise PermissionError(errno.EACCES, "Permission denied")


# ----------------------------------------------------------------------------- fault hooks


def test_fault_hooks_come_from_the_environment():
    assert FaultHooks.from_env({}) == FaultHooks()
    hooks = FaultHooks.from_env(
        {"LORA_DPO_STEP_DELAY_S": "0.01", "LORA_DPO_FAIL_AT_STEP": "3", "LORA_DPO_FAIL_RANK": "1"}
    )
    assert hooks == FaultHooks(0.01, 3, 1)
    started = time.perf_counter()
    hooks.after_step(3, rank=0)  # another rank: only the delay
    assert time.perf_counter() - started >= 0.01
    with pytest.raises(InjectedFault, match="rank 1 failed on purpose at step 3"):
        hooks.after_step(3, rank=1)
    with pytest.raises(ConfigError, match="LORA_DPO_FAIL_AT_STEP='x': expected an integer"):
        FaultHooks.from_env({"LORA_DPO_FAIL_AT_STEP": "x"})


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def policy(demo_workdir):
    from lora_dpo.demo import demo_config
    from lora_dpo.model import attach_lora, load_base_model

    config = demo_config(demo_workdir)
    base = load_base_model(config.model, quantize=False, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(0)
    return attach_lora(base, config.lora, gradient_checkpointing=False)


def trained_step(policy, lr: float = 0.1):
    """An optimizer and scheduler with state, after one real step."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return optimizer, scheduler


RANKS = [
    {"meter": {"steps": 0}, "torch_rng": torch.get_rng_state(), "python_rng": (3, tuple(range(625)), None)}
]


@pytest.mark.parametrize(
    "damage, problem",
    [
        (
            lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
            "optimizer.pt: cannot load: PytorchStreamReader failed",
        ),
        (
            lambda c: (c / "trainer_state.json").write_text('{"step": 8'),
            "trainer_state.json: not a trainer state",
        ),
        (lambda c: (c / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (lambda c: (c / "ranks.pt").write_bytes(b""), "ranks.pt: cannot load: "),
    ],
    ids=["truncated-optimizer", "torn-state", "missing-adapter", "empty-ranks"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_older(policy, tmp_path, caplog, damage, problem):
    from lora_dpo.checkpoint import newest_intact_checkpoint, save_checkpoint

    optimizer, scheduler = trained_step(policy)
    root = tmp_path / "checkpoints"
    older = save_checkpoint(root, 4, policy, optimizer, scheduler, RANKS, keep=2)
    newest = save_checkpoint(root, 8, policy, optimizer, scheduler, RANKS, keep=2)
    (root / "stray").mkdir()  # not a checkpoint: ignored
    assert newest_intact_checkpoint(root).path == newest
    damage(newest)
    with caplog.at_level(logging.WARNING):
        chosen = newest_intact_checkpoint(root)
    assert chosen.path == older and chosen.step == 4
    assert f"damaged checkpoint: {newest}/{problem}" in caplog.text
    damage(older)
    with pytest.raises(ConfigError) as none_intact:
        newest_intact_checkpoint(root)
    assert str(none_intact.value).startswith(
        f"{root}: no intact checkpoint to resume from: {newest}/{problem}"
    )
    assert f"; {older}/{problem}" in str(none_intact.value)
    shutil.rmtree(newest)
    with pytest.raises(ConfigError) as only_one:  # the one checkpoint's problem is the error
        newest_intact_checkpoint(root)
    assert str(only_one.value).startswith(f"{older}/{problem}")


def test_a_checkpoint_restores_weights_optimizer_and_rng(policy, tmp_path):
    import random

    from lora_dpo.checkpoint import apply_checkpoint, newest_intact_checkpoint, save_checkpoint

    optimizer, scheduler = trained_step(policy)
    weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    random.seed(5)
    ranks = [{"meter": {"steps": 3}, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}]
    save_checkpoint(tmp_path, 1, policy, optimizer, scheduler, ranks, keep=1)
    expected = (torch.rand(3), random.random())

    other_optimizer, other_scheduler = trained_step(policy)  # moves the weights on
    trained_step(policy)
    meter = apply_checkpoint(newest_intact_checkpoint(tmp_path), policy, other_optimizer, other_scheduler)
    assert meter == {"steps": 3}
    for name, param in policy.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, weights[name]), name
    assert other_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.raises(ConfigError, match="saved by 1 process\\(es\\), resumed with 2"):
        apply_checkpoint(newest_intact_checkpoint(tmp_path), policy, other_optimizer, other_scheduler, 0, 2)


def test_saving_prunes_old_checkpoints_and_newer_ones_of_an_earlier_attempt(policy, tmp_path):
    from lora_dpo.checkpoint import save_checkpoint

    optimizer, scheduler = trained_step(policy)
    for step in (4, 8, 12):
        save_checkpoint(tmp_path, step, policy, optimizer, scheduler, RANKS, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000008", "step-000012"]
    # resumed from step 8 (say step 12 was damaged): step 10 is now the newest
    save_checkpoint(tmp_path, 10, policy, optimizer, scheduler, RANKS, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000008", "step-000010"]


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    return prepare_workdir(demo_workdir, tmp_path_factory.mktemp("run-dir-tests"))


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(run_config(workdir, run_dir))
    return run_dir


@pytest.fixture
def finished(workdir, tmp_path):
    """A finished run that differs from `uninterrupted` (another seed)."""
    config = run_config(workdir, tmp_path / "run")
    config.train.seed = 7
    train(config)
    return tmp_path / "run"


def test_a_relaunched_job_keeps_its_checkpoints_and_is_told_to_resume(workdir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    interrupt(run_config(workdir, run_dir), 6, monkeypatch)
    before = snapshot(run_dir)
    assert "checkpoints/step-000004/optimizer.pt" in before
    config = run_config(workdir, run_dir)
    config.data.train_path += ".typo"  # the relaunch would fail later anyway: nothing may go first
    with pytest.raises(ConfigError) as refused:
        train(config)
    assert str(refused.value) == (
        f"train.output_dir={run_dir} holds an interrupted run (checkpoint step-000004); continue with: "
        f"lora-dpo train --resume {run_dir} (or set train.overwrite_output_dir=true to start over)"
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("failure", ["data-typo", "crash-mid-training"])
def test_a_failed_overwrite_leaves_the_finished_run_whole(workdir, finished, monkeypatch, failure):
    before = snapshot(finished)
    config = run_config(workdir, finished)
    config.train.overwrite_output_dir = True
    if failure == "data-typo":
        config.data.train_path += ".typo"
        with pytest.raises(DataError, match="file not found"):
            train(config)
    else:
        interrupt(config, 6, monkeypatch)
    assert snapshot(finished) == before  # config.yaml, metrics, checkpoints, adapter, report
    assert RunDirectory(finished).state() is RunState.FINISHED
    staged = RunDirectory(finished).staged_overwrite()
    assert staged.path.exists() == (failure == "crash-mid-training")  # resumable only with a checkpoint


def test_an_interrupted_overwrite_resumes_and_then_replaces_the_old_run(
    workdir, finished, uninterrupted, monkeypatch
):
    before = snapshot(finished)
    config = run_config(workdir, finished)
    config.train.overwrite_output_dir = True
    interrupt(config, 6, monkeypatch)
    staged = RunDirectory(finished).staged_overwrite()
    with pytest.raises(
        ConfigError,
        match=r"holds an interrupted run \(checkpoint step-000004 of an unfinished "
        r"overwrite, in \.run\.overwrite\); continue with: lora-dpo train --resume",
    ):
        train(run_config(workdir, finished))
    assert snapshot(finished) == before
    train(config, resume=True)
    assert not staged.path.exists()
    assert losses(finished) == losses(uninterrupted)  # the new run, resumed, in place of the old
    assert (
        snapshot(finished)["adapter/adapter_model.safetensors"]
        == snapshot(uninterrupted)["adapter/adapter_model.safetensors"]
    )
    assert "seed: 7" not in (finished / "config.yaml").read_text()


def test_a_completed_overwrite_replaces_the_old_run_whole(workdir, finished, uninterrupted):
    config = run_config(workdir, finished)
    config.train.overwrite_output_dir = True
    train(config)
    after, expected = snapshot(finished), snapshot(uninterrupted)
    assert sorted(after) == sorted(expected)
    assert after["adapter/adapter_model.safetensors"] == expected["adapter/adapter_model.safetensors"]
    assert losses(finished) == losses(uninterrupted)
    assert not RunDirectory(finished).staged_overwrite().path.exists()


def test_a_second_writer_is_refused_before_it_writes(workdir, tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir / ".lock", run_dir):
        with pytest.raises(ConfigError, match=rf"being written by another training run \(pid {os.getpid()} "):
            train(run_config(workdir, run_dir))
    assert RunDirectory(run_dir).entries() == []


def test_a_foreign_directory_is_refused(workdir, tmp_path):
    (tmp_path / "model.bin").write_text("not a run")
    config = run_config(workdir, tmp_path)
    config.train.overwrite_output_dir = True
    with pytest.raises(ConfigError, match=r"holds files that are not a training run's \(model.bin\)"):
        train(config)
    assert (tmp_path / "model.bin").read_text() == "not a run"


def full_disk_on(monkeypatch, name: str, inside: str, after: int = 0) -> None:
    """ENOSPC when the file `name` in a directory whose name contains `inside` is synced
    (where a full disk shows for buffered writes), from the (after+1)-th such file on."""
    real = fileio.fsync_file
    seen = []

    def fsync(path: Path) -> None:
        if path.name == name and inside in path.parent.name:
            seen.append(path)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path)

    monkeypatch.setattr(fileio, "fsync_file", fsync)


def test_a_full_disk_saving_the_adapter_leaves_the_old_run(workdir, finished, monkeypatch):
    before = snapshot(finished)
    config = run_config(workdir, finished)
    config.train.overwrite_output_dir = True
    full_disk_on(monkeypatch, "tokenizer.json", ".adapter.")
    with pytest.raises(DiskFullError) as full:
        train(config)
    message = str(full.value)
    assert re.fullmatch(
        r"no space left on device writing \S+/\.adapter\.\w+\.partial/tokenizer\.json "
        r"\(free there: \d+ MB\); the files written before it are intact",
        message,
    ), message
    assert snapshot(finished) == before
    staged = RunDirectory(finished).staged_overwrite()
    assert staged.adapter_problem() == "not saved" and not list(staged.path.glob(".adapter.*"))


def test_a_full_disk_at_a_checkpoint_keeps_the_older_one(workdir, uninterrupted, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    full_disk_on(monkeypatch, "optimizer.pt", ".step-000008.", after=0)
    with pytest.raises(DiskFullError, match=r"writing \S+/optimizer.pt \(free there: \d+ MB\)"):
        train(run_config(workdir, run_dir))
    monkeypatch.undo()
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000004"]  # no partial step-000008
    train(run_config(workdir, run_dir), resume=True)
    assert losses(run_dir) == losses(uninterrupted)


@pytest.mark.slow
def test_two_train_commands_into_one_directory(workdir, tmp_path):
    run_dir = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(run_config(workdir, run_dir)))
    command = [sys.executable, "-m", "lora_dpo.cli", "train", "--config", str(config_file)]
    first = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "LORA_DPO_STEP_DELAY_S": "5",
        },  # still training when the second starts; killed after
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is being written by another training run (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
