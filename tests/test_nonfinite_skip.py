"""A step whose loss or gradient is not finite is not made: after a run that met a bad batch at
step k, the weights and every piece of optimizer state (bitsandbytes' uint8 moments, absmax and
Python-int step counters, torch's step tensors) equal those of a run that never took step k.
Real 4-bit base, real peft LoRA, real optimizers, the training loop's own step."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from lora_dpo.batching import pad_id_of
from lora_dpo.cache import ReferenceValues
from lora_dpo.config import Config
from lora_dpo.optim import build_optimizer, build_scheduler
from lora_dpo.scoring import score_pairs
from policies import loop_alone

CPU = torch.device("cpu")
STEPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [1, 6, 11, 12]]
BAD = 2  # the index in STEPS of the step that meets the bad batch


@pytest.fixture(scope="module")
def setup(demo_workdir):
    """The demo's config with LoRA rank 64 (so bitsandbytes keeps most moments in 8 bits: it
    does so for tensors of 4096 values or more), 16 pairs, reference values near the policy."""
    from lora_dpo.data import load_preference_data
    from lora_dpo.demo import demo_config
    from lora_dpo.model import load_tokenizer

    config = demo_config(demo_workdir)
    config.lora.r, config.lora.alpha = 64, 64
    tokenizer = load_tokenizer(config.model)
    pairs = load_preference_data(config.data, tokenizer, "train")[0][:16]
    policy = fresh_policy(config)
    with torch.no_grad():
        start = score_pairs(policy, pairs, batch_size=16, pad_id=pad_id_of(tokenizer), device=CPU)
    generator = torch.Generator().manual_seed(1)
    reference = ReferenceValues(
        start.chosen + torch.randn(16, generator=generator),
        start.rejected + torch.randn(16, generator=generator),
        start.chosen_tokens,
        start.rejected_tokens,
    )
    return config, pairs, reference, pad_id_of(tokenizer)


def fresh_policy(config: Config) -> torch.nn.Module:
    from lora_dpo.model import attach_lora, load_base_model

    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    return attach_lora(base, config.lora, gradient_checkpointing=False)


def poisoned(reference: ReferenceValues, rows: list[int], value: float) -> ReferenceValues:
    chosen = reference.chosen_logps.clone()
    chosen[rows] = value
    return dataclasses.replace(reference, chosen_logps=chosen)


def make_optimizer(name: str, params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    if name == "paged_adamw_8bit":  # build_optimizer refuses it on the CPU, where it is not paged
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return build_optimizer(params, dataclasses.replace(cfg, optimizer=name), CPU)


def run(setup, optimizer_name: str, reference: ReferenceValues, skip_step: int | None = None):
    """The loop's steps over STEPS; at `skip_step` only the schedule moves on (a step never
    taken). Returns the state and the finite flag of each step."""
    config, pairs, _, pad_id = setup
    policy = fresh_policy(config)
    train_cfg = dataclasses.replace(config.train, warmup_ratio=0.2, max_grad_norm=1.0, weight_decay=0.01)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer_name, params, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, len(STEPS))
    config = dataclasses.replace(config, train=train_cfg)
    loop = loop_alone(
        config, pairs, policy, pad_id, "padded", optimizer=optimizer, scheduler=scheduler, reference=reference
    )
    state = loop.state
    for number, indices in enumerate(STEPS):
        if number == skip_step:
            scheduler.step()
            continue
        loop.step([indices[:2], indices[2:]], len(indices), None)  # two micro-batches
    _, window = state.meter.flush()
    return state, [finite for finite, _ in window]


def leaves(value: Any):
    """The values inside nested dicts (bitsandbytes nests its quantization state one deeper)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    else:
        yield value


def assert_same(a: Any, b: Any, where: str) -> None:
    """Equal to the bit: tensors by torch.equal (and dtype), containers item by item."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where}: differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} vs {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("optimizer_name", ["adamw_8bit", "paged_adamw_8bit", "adamw_torch"])
@pytest.mark.parametrize(
    "bad_value",
    [math.nan, -math.inf],  # NaN gradients; an infinite reward with finite (zero) gradients
    ids=["nan", "inf"],
)
def test_a_skipped_step_leaves_no_trace_in_weights_or_optimizer_state(setup, optimizer_name, bad_value):
    _, _, reference, _ = setup
    bad_rows = STEPS[BAD][:1]
    bad, bad_flags = run(setup, optimizer_name, poisoned(reference, bad_rows, bad_value))
    control, control_flags = run(setup, optimizer_name, reference, skip_step=BAD)
    assert bad_flags == [True, True, False, True, True] and all(control_flags)
    state = bad.optimizer.state_dict()
    assert_same(state, control.optimizer.state_dict(), "optimizer")
    assert_same(bad.scheduler.state_dict(), control.scheduler.state_dict(), "scheduler")
    trained = dict(control.policy.named_parameters())
    for name, param in bad.policy.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    # what the comparison covers: the optimizer stepped 4 times, 8-bit moments where bitsandbytes
    # keeps them, and the weights moved off their initialisation
    values = list(leaves(state["state"]))
    if optimizer_name == "adamw_torch":
        assert all(float(s["step"]) == 4.0 for s in state["state"].values())
    else:
        assert all(s["step"] == 4 for s in state["state"].values())
        assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in values)
    assert any(
        not torch.equal(param, fresh)
        for param, fresh in zip(
            (p for p in bad.policy.parameters() if p.requires_grad),
            (p for p in fresh_policy(bad.config).parameters() if p.requires_grad),
        )
    )


def test_a_skipped_step_still_moves_the_learning_rate_schedule_on(setup):
    _, _, reference, _ = setup
    bad, flags = run(setup, "adamw_torch", poisoned(reference, STEPS[BAD][:1], math.nan))
    assert flags.count(False) == 1
    assert bad.scheduler.last_epoch == len(STEPS)  # the plan's steps, not the updates made
