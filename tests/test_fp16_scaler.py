"""fp16 trains with dynamic loss scaling: a gradient under fp16's range survives it, an overflowed
or non-finite step is skipped and counted like any other and lowers the scale, the scale is in
every metric record and in checkpoints (a resumed run equals an uninterrupted one to the bit).
`model.dtype=auto` picks bf16 only where the GPU has it natively, fp16 (scaled) on one without."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.faults import FAIL_AT_STEP, InjectedFault
from lora_dpo.inputs import RunInputs, load_run_inputs
from lora_dpo.model import choose_dtype
from lora_dpo.optim import loss_scaler, optimizer_steps, step_if_finite
from lora_dpo.train import train
from precompute import precompute_reference
from runs import losses, run_config

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, device_type, bf16_supported, expected",
    [
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),  # pre-Ampere: bf16 only emulated
        ("auto", "cpu", False, torch.float32),
        ("auto", "cpu", True, torch.float32),
        ("bf16", "cuda", False, torch.bfloat16),  # an explicit choice is kept
        ("fp16", "cpu", False, torch.float16),
        ("fp32", "cuda", True, torch.float32),
    ],
)
def test_the_compute_dtype_choice(name, device_type, bf16_supported, expected):
    choice = choose_dtype(name, device_type, bf16_supported)
    assert choice.dtype == expected and choice.reason.startswith(f"model.dtype={name}")
    # only fp16 is trained with loss scaling
    assert loss_scaler(choice.dtype, CPU).is_enabled() == (expected == torch.float16)


def test_a_gradient_that_underflows_in_fp16_survives_loss_scaling():
    """A gradient of 1e-8 through an fp16 activation (as through a frozen fp16 base) is below
    fp16's smallest subnormal (6e-8): zero unscaled; the scaled one reaches the fp32 weight."""
    weight = torch.nn.Parameter(torch.ones(8))  # fp32, like the LoRA weights
    activation_input = torch.full((8,), 3.0, dtype=torch.float16)

    def gradient(dtype: torch.dtype) -> tuple[torch.Tensor, torch.nn.Parameter]:
        optimizer = torch.optim.SGD([weight], lr=1e6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        scaler = loss_scaler(dtype, CPU)
        weight.grad = None
        hidden = activation_input * weight.half()  # [8] fp16
        loss = hidden.float().sum() * 1e-8
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad = weight.grad.clone()
        before = weight.detach().clone()
        assert step_if_finite(optimizer, scheduler, scaler, torch.isfinite(grad).all())
        return grad, weight.detach() - before

    unscaled, moved = gradient(torch.float32)  # a disabled scaler: plain backward
    assert torch.equal(unscaled, torch.zeros(8)) and torch.equal(moved, torch.zeros(8))
    scaled, moved = gradient(torch.float16)
    assert torch.allclose(scaled, torch.full((8,), 3e-8), rtol=1e-3)
    assert torch.allclose(moved, torch.full((8,), -3e-2), rtol=1e-3)


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    """The demo's model and data with a reference cache scored in fp16."""
    root = tmp_path_factory.mktemp("fp16")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    precompute_reference(fp16_config(root, root / "unused"))
    return root


def fp16_config(root, output_dir):
    config = run_config(root, output_dir)  # 12 steps, a checkpoint every 4
    config.model.dtype = "fp16"
    return config


def poisoned_inputs(config, step: int) -> tuple[RunInputs, list[int]]:
    """The run's inputs with a NaN reference value for one pair of optimizer step `step`, and
    the steps that pair is in (one an epoch)."""
    inputs = load_run_inputs(config)
    plan = list(optimizer_steps(inputs.pairs, config.train))
    pair = plan[step - 1][0][0][0]
    inputs.reference.chosen_logps[pair] = math.nan
    return inputs, [n for n, (batches, _) in enumerate(plan, 1) if any(pair in b for b in batches)]


def expected_scales(bad_steps: list[int], total: int = 12) -> list[float]:
    """torch's default start, halved by each skipped step (growth comes after 2000 good steps)."""
    return [65536.0 / 2 ** sum(bad <= step for bad in bad_steps) for step in range(1, total + 1)]


def test_an_fp16_run_scales_its_loss_and_a_skip_lowers_the_scale(workdir, tmp_path, caplog):
    config = fp16_config(workdir, tmp_path / "run")
    inputs, bad_steps = poisoned_inputs(config, 2)
    assert len(bad_steps) == 2 and bad_steps[0] == 2  # once in each of the 2 epochs
    with caplog.at_level("INFO"):
        result = train(config, inputs)
    assert "compute dtype: float16 (model.dtype=fp16)" in caplog.text
    assert "skipped 1 update(s) with a non-finite loss or gradient" in caplog.text
    records = result.history
    assert [r["step"] for r in records if r["skipped_steps"]] == bad_steps
    assert [r["loss_scale"] for r in records] == expected_scales(bad_steps)
    assert all(math.isfinite(r["loss"]) for r in records if not r["skipped_steps"])
    assert records[-1]["loss"] < math.log(2)  # it trained
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["loss_scaler"]["scale"] == expected_scales(bad_steps)[7]


def test_an_fp16_run_resumes_with_its_loss_scale(workdir, tmp_path, monkeypatch):
    """Interrupted after step 6, resumed from step 4's checkpoint: the scale the skip at step 2
    lowered is restored (a fresh scaler would start at 65536 again), and the run equals an
    uninterrupted one in every loss, every scale and every adapter bit."""
    whole = fp16_config(workdir, tmp_path / "whole")
    inputs, bad_steps = poisoned_inputs(whole, 2)
    train(whole, inputs)
    config = fp16_config(workdir, tmp_path / "run")
    monkeypatch.setenv(FAIL_AT_STEP, "6")
    with pytest.raises(InjectedFault):
        train(config, poisoned_inputs(config, 2)[0])
    monkeypatch.delenv(FAIL_AT_STEP)
    train(config, poisoned_inputs(config, 2)[0], resume=True)

    def scales(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss_scale"]) for r in map(json.loads, lines) if "loss_scale" in r]

    assert losses(tmp_path / "run") == losses(tmp_path / "whole")
    assert scales(tmp_path / "run") == scales(tmp_path / "whole")
    assert [scale for _, scale in scales(tmp_path / "run")] == expected_scales(bad_steps)
    a = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fp16_checkpoint_without_its_loss_scale_is_refused(workdir, tmp_path, monkeypatch):
    from lora_dpo.errors import ConfigError

    config = fp16_config(workdir, tmp_path / "run")
    monkeypatch.setenv(FAIL_AT_STEP, "5")
    with pytest.raises(InjectedFault):
        train(config)
    monkeypatch.delenv(FAIL_AT_STEP)
    state_file = tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["loss_scaler"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="holds no loss scaler state for this fp16 run"):
        train(config, resume=True)
