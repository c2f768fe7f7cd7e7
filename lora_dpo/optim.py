"""Optimizer steps: which pairs each one takes, the optimizer, its learning-rate schedule and
fp16 loss scaling, and the update that is not made when its loss or gradient is not finite."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from lora_dpo.batching import length_grouped_batches, token_budget_batches
from lora_dpo.config import TrainConfig
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import ConfigError

# One optimizer step of one rank: its micro-batches (lists of pair indices), and the number of
# pairs in the global step (over all ranks), which the loss is averaged over.
StepPlan = tuple[list[list[int]], int]


def optimizer_steps(
    pairs: Sequence[TokenizedPair],
    cfg: TrainConfig,
    rank: int = 0,
    world_size: int = 1,
    layout: str = "padded",
) -> Iterator[StepPlan]:
    """This rank's plan for each optimizer step, across epochs.

    The pairs of a step are a global batch of per_device_batch_size x world_size x
    gradient_accumulation_steps similar-length pairs, split evenly over the ranks and then into
    micro-batches (of per_device_batch_size pairs, or of at most max_tokens_per_batch decoder
    tokens in `layout`): the order depends on the global batch only, so one process with
    accumulation sees the same steps as several without. Each epoch reshuffles with its own
    seed; the step count is global, so the learning-rate schedule runs once over the whole run
    instead of restarting every epoch. A last global batch with fewer pairs than ranks is left
    out of its epoch (every rank needs a pair).
    """
    global_batch = cfg.per_device_batch_size * world_size * cfg.gradient_accumulation_steps
    step = 0
    for epoch in range(cfg.epochs):
        for step_pairs in length_grouped_batches(pairs, global_batch, seed=cfg.seed + epoch):
            if len(step_pairs) < world_size:
                continue
            if step == cfg.max_steps:
                return
            step += 1
            share = even_split(step_pairs, world_size)[rank]
            if cfg.max_tokens_per_batch:  # by tokens in the run's layout: as many pairs as fit
                yield token_budget_batches(pairs, share, layout, cfg.max_tokens_per_batch), len(step_pairs)
                continue
            micro_batches = math.ceil(len(share) / cfg.per_device_batch_size)
            yield even_split(share, micro_batches), len(step_pairs)


def even_split(items: list[int], parts: int) -> list[list[int]]:
    """`parts` consecutive slices whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def optimizer_name(cfg: TrainConfig, device: torch.device) -> str:
    """The optimizer `train.optimizer` means on this device; an impossible choice is an error."""
    name = cfg.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    if name == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError(
            "train.optimizer=paged_adamw_8bit needs CUDA (on the CPU bitsandbytes silently "
            "falls back to non-paged); use adamw_8bit or adamw_torch"
        )
    return name


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    name = optimizer_name(cfg, device)
    lr, weight_decay = cfg.learning_rate, cfg.weight_decay
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_ratio` of the run, then cosine decay to zero."""
    return get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)


def loss_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for an fp16 compute dtype (gradients through fp16 activations
    underflow to zero without it); for any other dtype a disabled scaler, whose scale, unscale
    and step are the identity, so one code path serves every dtype."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    finite: torch.Tensor,
) -> bool:
    """optimizer.step() (through the loss scaler) when `finite`, a 0-d bool on the device that
    every rank holds alike; otherwise no step at all. The learning-rate schedule moves on
    either way: it counts steps of the plan, not updates made. Returns whether the step was made.

    A step not made leaves the weights and every piece of optimizer state exactly as they
    were: bitsandbytes' 8-bit AdamW keeps a Python-int `step` and uint8 moments re-quantized
    with fresh absmax values, which no on-device select after the fact restores. Deciding
    first costs `finite.item()`, the one host sync of an optimizer step (it waits for the
    backward pass, which the update has to wait for anyway). The scaler's update runs either
    way: a gradient that overflowed at this loss scale lowers it for the next step.
    """
    applied = bool(finite.item())
    if applied:
        scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # a first step not made: torch warns of a call-order slip
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()
    return applied


def release_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Drop an optimizer's state at the end of a run, so that a process that trains again (a
    sweep) does not carry it into the next run.

    bitsandbytes keeps every paged buffer it allocates in `GlobalPageManager.paged_tensors`
    for the life of the process (for `prefetch_all`): this optimizer's are taken out of that
    list, else they would outlive it. bitsandbytes 0.50.2 has no call that frees the CUDA
    managed memory under a paged buffer (`cget_managed_ptr` allocates it, nothing releases
    it), so each buffer is first moved to host memory (`prefetch_tensor(to_cpu=True)`): the
    device pages are given back, the host copy stays mapped for the life of the process.
    """
    paged = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if getattr(value, "is_paged", False)
    ]
    if paged:
        from bitsandbytes.functional import GlobalPageManager, prefetch_tensor

        for buffer in paged:
            prefetch_tensor(buffer, to_cpu=True)
        ids = {id(buffer) for buffer in paged}
        manager = GlobalPageManager.get_instance()
        manager.paged_tensors = [t for t in manager.paged_tensors if id(t) not in ids]
    optimizer.state.clear()
