"""Settings as a real run sees them: clipping off (`train.max_grad_norm=none`) trains with the
norm still logged; a checkpoint file holding pickled code is refused in one line naming it; a
LoRA target the model lacks is one line, not a peft traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.cli import main
from lora_dpo.config import dump_config
from lora_dpo.demo import demo_config
from lora_dpo.train import train
from precompute import precompute_reference


def small_config(root: Path, output_dir: Path):
    config = demo_config(root)
    config.data.max_pairs = 16
    config.data.eval_path = ""
    config.train.generate_every = 0  # no eval split: no held-out prompts to complete
    config.precompute.cache_dir = str(root / "cache")
    config.train.output_dir = str(output_dir)
    config.train.per_device_batch_size = 4
    config.train.gradient_accumulation_steps = 1
    config.train.max_steps = 2  # a checkpoint after step 1, none after the last
    config.train.logging_steps = 1
    config.train.warmup_ratio = 0.0  # step 1 updates at the full rate
    config.train.save_steps = 1
    return config


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-settings")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    precompute_reference(small_config(root, root / "unused"))
    return root


def run(workdir: Path, name: str, max_grad_norm: float | None) -> Path:
    config = small_config(workdir, workdir / name)
    config.train.max_grad_norm = max_grad_norm
    config.validate()
    train(config)
    return workdir / name


def first_grad_norm(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["grad_norm"] for r in records if r.get("step") == 1 and "grad_norm" in r)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def unclipped(workdir):
    return run(workdir, "unclipped", None)


def test_clipping_off_trains_and_logs_the_norm(workdir, unclipped):
    loose = run(workdir, "loose", 1e9)  # a bound the norm never reaches
    tight = run(workdir, "tight", 1e-6)
    norm = first_grad_norm(unclipped)
    assert 1e-6 < norm < 1e9 and first_grad_norm(loose) == norm == first_grad_norm(tight)  # before clipping
    off, far, clipped = adapter(unclipped), adapter(loose), adapter(tight)
    assert all(torch.equal(off[k], far[k]) for k in off)  # the gradients were not scaled
    assert any(not torch.equal(off[k], clipped[k]) for k in off)  # (so this could have failed)
    assert "max_grad_norm: null" in (unclipped / "config.yaml").read_text()


class Payload:
    """Unpickles as a call of os.system: what a hostile checkpoint file carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_holding_pickled_code_is_refused_in_one_line(workdir, unclipped, tmp_path, capsys):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "step-000001"
    shutil.copytree(unclipped / "checkpoints" / "step-000001", checkpoint)
    shutil.copy(unclipped / "config.yaml", run_dir / "config.yaml")
    marker = tmp_path / "code-was-executed"
    torch.save(
        {"state": {}, "param_groups": [], "extra": Payload(f"touch '{marker}'")}, checkpoint / "optimizer.pt"
    )

    assert main(["train", "--resume", str(run_dir)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(
        f"error: {checkpoint / 'optimizer.pt'}: refused by torch.load(weights_only=True), which loads "
        "only tensors and plain data and runs no pickled code: Trying to load unsupported GLOBAL "
    )
    assert lines[-1].endswith(f".system whose module {os.system.__module__} is blocked.")
    assert not any("Traceback" in line for line in lines)
    assert not marker.exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=False)  # the control: unguarded, it runs
    assert marker.exists()

    saved = (unclipped / "checkpoints" / "step-000001" / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(saved[: len(saved) // 2])  # cut short
    assert main(["train", "--resume", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoint / 'optimizer.pt'}: cannot load: PytorchStreamReader failed")
    (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
    assert main(["train", "--resume", str(run_dir)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoint / 'optimizer.pt'}: refused by torch.load(weights_only=True)")


def test_a_lora_target_the_model_lacks_is_one_line_from_train(workdir, tmp_path, capsys):
    config = small_config(workdir, tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert main(["train", "--config", str(path), "lora.target_modules=q_proj,v_prj"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        lines[-1]
        == "error: lora.target_modules: 'v_prj' matches no module of the model; closest: v_proj, q_proj, o_proj"
    )
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "run" / "adapter").exists()
