"""train.offload_activations: the layer inputs checkpointing keeps go to host copies and come
back for the recompute; log-probs and LoRA gradients are bit for bit those of no offload
(4-bit LoRA policy on the demo's tiny Llama, dropout on, with and without checkpointing)."""

from __future__ import annotations

import random

import pytest
import torch

from lora_dpo.batching import collate
from lora_dpo.config import LoraConfig, ModelConfig, load_config
from lora_dpo.data import TokenizedPair
from lora_dpo.logps import sequence_logps
from lora_dpo.losses import preference_loss
from lora_dpo.model import attach_lora, load_base_model
from lora_dpo.offload import OffloadSavedTensors, offload_saved_tensors


def pairs(vocab: int, count: int = 3, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)

    def ids(low: int, high: int) -> tuple[int, ...]:
        return tuple(rng.randrange(vocab) for _ in range(rng.randint(low, high)))

    return [TokenizedPair(ids(3, 9), ids(2, 8), ids(2, 8), i) for i in range(count)]


def policy_for(demo_workdir, gradient_checkpointing: bool):
    base = load_base_model(
        ModelConfig(name_or_path=str(demo_workdir / "model")),
        quantize=True,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    torch.manual_seed(0)
    policy = attach_lora(
        base, LoraConfig(r=4, alpha=8, dropout=0.1), gradient_checkpointing=gradient_checkpointing
    )
    with torch.no_grad():  # a trained adapter, so gradients reach every LoRA matrix
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    policy.train()
    return policy


def step(policy, batch, offload: bool):
    torch.manual_seed(1)  # the same dropout masks in both runs
    with offload_saved_tensors(offload) as hooks:
        logps = sequence_logps(policy, batch, chunk_size=5)
    zeros = torch.zeros(batch.num_pairs)
    preference_loss(logps.chosen, logps.rejected, zeros, zeros, beta=0.1).losses.sum().backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad(set_to_none=True)
    return logps.logps.detach(), grads, hooks


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_offload_is_exact(demo_workdir, gradient_checkpointing: bool):
    policy = policy_for(demo_workdir, gradient_checkpointing)
    config = policy.get_base_model().config
    batch = collate(pairs(config.vocab_size), pad_id=0)
    plain_logps, plain_grads, _ = step(policy, batch, offload=False)
    logps, grads, hooks = step(policy, batch, offload=True)
    assert torch.equal(logps, plain_logps)
    assert grads.keys() == plain_grads.keys() and len(grads) == 7 * 2 * config.num_hidden_layers
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name
        assert grads[name].abs().sum() > 0, name  # a real gradient, not two empty ones
    # Each layer's input [2B, T, H] went to a host copy (on the CPU, a copy in CPU memory), and
    # nothing from inside a checkpointed layer did.
    layer_input = (torch.Size([*batch.input_ids.shape, config.hidden_size]), torch.bfloat16)
    inputs = hooks.moved.count(layer_input)
    inside = [shape for shape, _ in hooks.moved if config.intermediate_size in shape]
    if gradient_checkpointing:
        assert inputs == config.num_hidden_layers and not inside, hooks.moved
        assert len(hooks.moved) <= config.num_hidden_layers + 5  # final norm, LM head gradients
    else:  # every saved activation moves
        assert inside and len(hooks.moved) > 10 * config.num_hidden_layers


def test_offload_keeps_parameters_and_indices_in_place():
    weight = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    x = torch.randn(4, 3, requires_grad=True)
    index = torch.tensor([0, 2])
    with OffloadSavedTensors() as hooks:
        y = (x @ weight)[index].square().sum()  # saves weight, x (not: frozen weight), index, a result
    y.backward()
    assert hooks.moved == [(torch.Size([2, 3]), torch.float32)]  # only what square() saves
    reference = x.detach().clone().requires_grad_()
    (reference @ weight)[index].square().sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_disabled_is_a_no_op():
    with offload_saved_tensors(False) as hooks:
        assert hooks is None
    config = load_config(None, ["model.name_or_path=x"])
    assert config.train.offload_activations is False
