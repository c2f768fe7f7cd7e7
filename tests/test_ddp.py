"""The DDP wrapper over the log-prob function, in a real one-rank gloo process group: the LoRA
gradients are views into the all-reduce buckets (gradient_as_bucket_view), also after
zero_grad(set_to_none=True) and clipping, and equal those of no DDP bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_offload import pairs, policy_for

from lora_dpo.batching import collate
from lora_dpo.ddp import ddp_module
from lora_dpo.logps import SequenceLogps, sequence_logps
from lora_dpo.losses import preference_loss

CPU = torch.device("cpu")


def loss_of(logps: SequenceLogps) -> torch.Tensor:
    zeros = torch.zeros(logps.chosen.shape[0])
    return preference_loss(logps.chosen, logps.rejected, zeros, zeros, beta=0.1).losses.sum()


def test_lora_gradients_are_bucket_views_and_exact(demo_workdir, tmp_path):
    policy = policy_for(demo_workdir, gradient_checkpointing=False)
    policy.eval()  # no dropout: the two passes see the same function
    batch = collate(pairs(policy.get_base_model().config.vocab_size), pad_id=0)
    params = [p for p in policy.parameters() if p.requires_grad]

    loss_of(sequence_logps(policy, batch, chunk_size=5)).backward()
    plain = [p.grad.clone() for p in params]
    policy.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = ddp_module(policy, 5, {}, CPU)
        for _ in range(2):  # the second backward starts from grads set to None
            loss_of(SequenceLogps(*ddp(batch))).backward()
            storages = {p.grad.untyped_storage().data_ptr() for p in params}
            assert len(storages) < len(params) / 4, len(storages)  # a few buckets, not a grad each
            for p, expected in zip(params, plain):
                assert torch.equal(p.grad, expected)
            torch.nn.utils.clip_grad_norm_(params, 1e-3)  # scales in place, through the views
            assert torch.stack([p.grad.norm() for p in params]).norm().item() == pytest.approx(1e-3, rel=1e-3)
            assert {p.grad.untyped_storage().data_ptr() for p in params} == storages
            policy.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
