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
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
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
