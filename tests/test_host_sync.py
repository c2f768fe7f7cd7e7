"""No host sync inside a micro-batch: the forward, the loss and the backward of one micro-batch
queue GPU work without ever waiting for it, in every layout.

On a GPU, an op whose output size or value the host must read (nonzero, bincount, .item(),
a copy to the host, repeat_interleave without output_size, a tensor in an `if`) stalls the
host until every queued kernel has run. The probe counts those ops whatever device they run
on, so the CPU run here shows what would stall on CUDA. It is seen to count a deliberate
`.item()`, the old nonzero/bincount indexing, and transformers' own check of a padding mask.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lora_dpo.batching import COLLATE, IGNORE_INDEX, LAYOUTS, PairBatch, collate
from policies import loop_alone, move_lora_b_off_zero

CPU = torch.device("cpu")
aten = torch.ops.aten
# Ops whose output the host must read (a size or a value) before it can go on.
SYNCING_OPS = {
    aten.nonzero,
    aten.bincount,
    aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t)
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}
# Tensor methods that hand a value to the host: on a GPU each waits for the kernels before it.
# (A `.to(cpu)` is not told apart: on a CPU-only run it reads like any same-device `.to`.)
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class HostSyncProbe:
    """`with HostSyncProbe() as probe:` ... `probe.calls`: each op that would make the host
    wait for a GPU, with the stack that called it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.stacks: dict[str, list[str]] = {}
        probe = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                packet = func.overloadpacket
                if packet in SYNCING_OPS:
                    probe.record(str(packet))
                elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
                    probe.record("repeat_interleave without output_size")
                return func(*args, **kwargs)

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", None) in SYNCING_METHODS:
                    probe.record(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._modes = (Methods(), Ops())

    def record(self, name: str) -> None:
        self.calls[name] += 1
        self.stacks.setdefault(name, traceback.format_stack(limit=14)[:-2])

    def __enter__(self) -> HostSyncProbe:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"{name} x{n}:\n{''.join(self.stacks[name])}" for name, n in self.calls.items())


def test_the_probe_counts_what_would_sync():
    """The failing control: each kind of sync is seen, a plain device op is not."""
    labels = torch.tensor([[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 5]])
    with HostSyncProbe() as probe:
        (labels * 2).sum(0)  # queued work only
    assert not probe.calls
    with HostSyncProbe() as probe:
        labels.sum().item()
        (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # how response tokens used to be found
        torch.bincount(torch.tensor([0, 0, 1]), minlength=2)  # how they used to be counted
        torch.repeat_interleave(torch.tensor([1, 2]))
        bool(labels.any())
        labels.tolist()
        labels.cpu()
    assert probe.calls == {
        "aten._local_scalar_dense": 2,
        "Tensor.item": 1,
        "aten.nonzero": 1,
        "aten.bincount": 1,
        "repeat_interleave without output_size": 1,
        "Tensor.__bool__": 1,
        "Tensor.tolist": 1,
        "Tensor.cpu": 1,
    }, probe.report()


@pytest.fixture(scope="module")
def demo_policy(demo_workdir):
    """The real setting: a 4-bit base with LoRA on all linear layers and its dropout, gradient
    checkpointing, LoRA B moved off zero; 4 demo pairs with prompts and responses of different lengths."""
    from lora_dpo.batching import pad_id_of
    from lora_dpo.data import load_preference_data
    from lora_dpo.demo import demo_config
    from lora_dpo.model import build_policy, load_base_model, load_tokenizer

    config = demo_config(demo_workdir)
    config.lora.dropout = 0.05  # the default: Dropout16 draws its masks in every forward
    tokenizer = load_tokenizer(config.model)
    pairs = load_preference_data(config.data, tokenizer, "train")[0][:4]
    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    policy = build_policy(base, config, gradient_checkpointing=True)
    move_lora_b_off_zero(policy)
    policy.train()
    return policy, pairs, pad_id_of(tokenizer), config


def one_micro_batch(demo_policy, layout: str, attention: str, probe: HostSyncProbe, **loss_settings):
    """What TrainLoop.step does with one micro-batch: collate and move it (before the probe),
    then the forward (TrainLoop.logps), the loss, the backward and the metrics (under it)."""
    from lora_dpo.losses import PairLogps, compute_loss
    from lora_dpo.packing import choose_layout

    policy, pairs, pad_id, config = demo_policy
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **loss_settings))
    policy.get_base_model().set_attn_implementation(attention)
    assert choose_layout(layout, policy, CPU).name == layout
    loop = loop_alone(config, pairs, policy, pad_id, layout)
    state, meter = loop.state, loop.state.meter
    batch = COLLATE[layout](pairs, pad_id)
    tokens = batch.sequence_tokens  # counted on the host, before the move
    batch = batch.to(CPU)
    generator = torch.Generator().manual_seed(0)
    references = [torch.randn(len(pairs), generator=generator) - 30 for _ in range(4)]
    meter.begin_step()
    with probe:
        logps = loop.logps(batch)
        shared = (references[2], references[3]) if state.loss.needs_shared_prefix else None
        out = compute_loss(state.loss, PairLogps.of(logps, references[0], references[1], shared))
        (out.losses.sum() / len(pairs)).backward()
        meter.add_pairs(out, logps, tokens)
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(
        g.abs().sum() > 0 for g in grads
    )
    policy.zero_grad(set_to_none=True)
    return logps


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "loss_settings",
    [{}, {"ld_alpha": 0.5, "use_weighting": True, "rpo_alpha": 0.5}],
    ids=["dpo", "ld-wpo-rpo"],
)
def test_a_micro_batch_never_waits_for_the_device(demo_policy, layout, attention, loss_settings):
    probe = HostSyncProbe()
    logps = one_micro_batch(demo_policy, layout, attention, probe, **loss_settings)
    assert logps.logps.requires_grad and (logps.shared_logps is not None) == bool(loss_settings)
    if layout == "padded" and attention == "sdpa":
        # transformers' sdpa mask asks on the host whether the 2D padding mask has any zero
        # (to drop the mask for a pure causal kernel): its only syncs, none of ours.
        stacks = "".join("".join(stack) for stack in probe.stacks.values())
        assert set(probe.calls) <= {"aten._local_scalar_dense", "Tensor.__bool__"}, probe.report()
        assert all("masking_utils.py" in "".join(stack) for stack in probe.stacks.values()), stacks
        return
    assert not probe.calls, probe.report()


def test_batches_bring_their_index_tensors_and_move_them_all():
    """The index tensors a collated batch brings equal those the labels imply, and `to` moves
    every tensor without deriving any anew (on the meta device, deriving would fail)."""
    from lora_dpo.data import TokenizedPair

    pairs = [
        TokenizedPair((1, 2), (3, 4, 5), (6,), 0),
        TokenizedPair((), (7, 8), (9, 10, 11), 1),  # no prompt: a response's first token has no predictor
        TokenizedPair((12,), (13,), (14, 15), 2),
    ]
    padded = collate(pairs, pad_id=0)
    targets = padded.labels[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    assert torch.equal(padded.predictors, rows * padded.labels.shape[1] + columns)
    assert torch.equal(padded.targets, targets[rows, columns]) and torch.equal(padded.sequences, rows)
    assert padded.tokens.tolist() == [3, 1, 1, 1, 2, 2]
    for name in ("prompt_shared", "packed"):
        shared = COLLATE[name](pairs, pad_id=0)
        assert torch.equal(shared.tokens, padded.tokens)
    for batch in (padded, COLLATE["packed"](pairs, pad_id=0)):
        moved = batch.to(torch.device("meta"))
        assert type(moved) is type(batch)
        for field in dataclasses.fields(batch):
            value = getattr(batch, field.name)
            if isinstance(value, torch.Tensor):
                assert getattr(moved, field.name).device.type == "meta", field.name
            else:
                assert getattr(moved, field.name) == value, field.name
    assert isinstance(padded, PairBatch)
