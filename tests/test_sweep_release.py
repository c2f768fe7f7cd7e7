"""A sweep trains several runs in one process: each run's optimizer, its state and (on CUDA)
bitsandbytes' paged buffers are gone before the next run starts."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_sweep import sweep_config, sweep_workdir  # noqa: F401  (a fixture)
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora_dpo.sweep import run_sweep


def test_each_sweep_run_starts_after_the_previous_runs_optimizer_is_gone(sweep_workdir, tmp_path):  # noqa: F811
    config = sweep_config(sweep_workdir, tmp_path)
    config.train.optimizer = "adamw_8bit"  # bitsandbytes' (not paged on the CPU)
    seen: list[weakref.ref] = []
    alive_at_first_step: list[int] = []  # earlier runs' optimizers still alive when a run starts

    def first_steps(optimizer, args, kwargs) -> None:
        if not any(ref() is optimizer for ref in seen):
            alive_at_first_step.append(sum(ref() is not None for ref in seen))
            seen.append(weakref.ref(optimizer))

    hook = register_optimizer_step_post_hook(first_steps)
    gc.disable()  # the sweep must free them itself, not wait for a collection by chance
    try:
        run_sweep(config, [0.05, 0.1, 0.2])
    finally:
        hook.remove()
        gc.enable()
    assert len(seen) == 3 and alive_at_first_step == [0, 0, 0]
    assert all(ref() is None for ref in seen)


def test_a_released_optimizer_holds_no_state():
    import bitsandbytes as bnb

    from lora_dpo.optim import release_optimizer

    param = torch.nn.Parameter(torch.zeros(8192))
    optimizer = bnb.optim.AdamW8bit([param])
    param.grad = torch.ones(8192)
    optimizer.step()
    assert optimizer.state[param]["state1"].dtype == torch.uint8
    release_optimizer(optimizer)
    assert len(optimizer.state) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes pages buffers on CUDA only")
def test_a_released_paged_optimizer_leaves_no_buffer_with_the_page_manager():
    import bitsandbytes as bnb
    from bitsandbytes.functional import GlobalPageManager

    from lora_dpo.optim import release_optimizer

    manager = GlobalPageManager.get_instance()
    before = len(manager.paged_tensors)
    param = torch.nn.Parameter(torch.zeros(2**17, device="cuda"))  # paged from 1e5 values on
    optimizer = bnb.optim.PagedAdamW8bit([param])
    param.grad = torch.ones_like(param)
    optimizer.step()
    torch.cuda.synchronize()
    assert getattr(optimizer.state[param]["state1"], "is_paged", False)
    assert len(manager.paged_tensors) == before + 2  # both moments
    release_optimizer(optimizer)
    torch.cuda.synchronize()
    assert len(manager.paged_tensors) == before and len(optimizer.state) == 0
