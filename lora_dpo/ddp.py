"""The policy's log-prob function as the module DistributedDataParallel wraps under torchrun."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from lora_dpo.logps import sequence_logps


def ddp_module(
    policy: torch.nn.Module, chunk_size: int, statistics: dict[str, bool], device: torch.device
) -> DistributedDataParallel:
    """DDP over the log-prob function: it all-reduces the LoRA gradients only (the frozen base is
    not synchronised: every rank loaded the same weights)."""
    module = PairLogpsModule(policy, chunk_size, statistics)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, so they
    # are not held twice (torch's DDP docs: it "can reduce peak memory usage, where the saved
    # memory size will be equal to the total gradients size" and "avoids the overhead of
    # copying between gradients and allreduce communication buckets"). What touches the
    # gradients stays correct: clipping scales them in place (the buckets); a gradient
    # replaced by a new tensor (the non-finite skip), or set to None by
    # zero_grad(set_to_none=True), is copied into its bucket at the next all-reduce and made
    # a view again (the reducer's check that a grad is not an alias of its bucket view), so
    # under set_to_none the saving holds after each backward, at the price of that copy.
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


class PairLogpsModule(torch.nn.Module):
    """The policy with the log-prob function as its forward: the module DDP wraps."""

    def __init__(self, policy: torch.nn.Module, chunk_size: int, statistics: dict[str, bool]):
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size
        self.statistics = statistics  # sequence_logps's optional statistics the loss reads

    def forward(self, batch: Any) -> tuple[torch.Tensor | None, ...]:
        out = sequence_logps(self.policy, batch, self.chunk_size, **self.statistics)
        return out.logps, out.tokens, out.shared_logps, out.log_sum_sq_probs
