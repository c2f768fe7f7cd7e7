"""The step-0 check's bound, measured: a bf16 cache built at batch 8 against the bf16 policy at
init run as training runs it (batch 2, train mode, checkpointed, the training layout), every
pair, on tiny Llama and Qwen2 models with real nf4 weights. The measured gaps are what
lora_dpo.cache.step0.TOLERANCES records; the bound must hold them with room, and still refuse
a cache whose values are another model's."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from cache_edit import edited_cache_copy
from lora_dpo.batching import COLLATE, pad_id_of
from lora_dpo.cache import check_step0_agreement, step0_tolerance_for
from lora_dpo.cache.step0 import TOLERANCES, Step0Tolerance, step0_gaps
from lora_dpo.demo import demo_config
from lora_dpo.demo.models import build_tiny_model
from lora_dpo.errors import CacheError
from lora_dpo.inputs import load_run_inputs
from lora_dpo.logps import SequenceLogps, sequence_logps
from lora_dpo.model import attach_lora
from lora_dpo.packing import choose_layout
from lora_dpo.train import train
from precompute import precompute_reference

# The bound must exceed every measured gap this many times over: rounding on another CPU,
# another torch build or a real model's longer responses must not trip it.
MARGIN = 2.0


def bf16_config(root: Path):
    config = demo_config(root)
    config.model.dtype = "bf16"
    config.precompute.cache_dir = str(root / "cache")
    config.precompute.batch_size = 8
    config.train.per_device_batch_size = 2
    config.train.output_dir = str(root / "run")
    return config


# (architecture, the layout precompute scores in); training runs in its own default layout
# (packed for both). On the CPU, one layout at batch 8 and at batch 2 gives the same bits, and
# since packed rows attend pair by pair with causal kernels (prompt + chosen, then rejected over
# prompt + rejected), a padded cache gives them too: every measured gap here is 0. The bound's
# room for the GPU's batch-shape-dependent kernels is set by reasoning (lora_dpo.cache.step0);
# that it still refuses a wrong cache is tested below.
CASES = [("llama", "auto"), ("llama", "padded"), ("qwen2", "auto"), ("qwen2", "padded")]


def bf16_cache(demo_workdir: Path, root: Path, tokenizer, arch: str, precompute_layout: str):
    """The demo's data and an `arch` model in `root`, its bf16 cache built in `precompute_layout`;
    returns the config training would run (its default layout)."""
    shutil.copytree(demo_workdir / "data", root / "data")
    if arch == "llama":
        shutil.copytree(demo_workdir / "model", root / "model")
    else:
        build_tiny_model(root / "model", tokenizer, arch, hidden_size=64)
    config = bf16_config(root)
    config.train.layout = precompute_layout
    precompute_reference(config)
    config.train.layout = "auto"
    return config


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def bf16_gaps(request, demo_workdir, tmp_path_factory, tiny_tokenizer):
    """(case, gaps [R] nats, token counts [R], the cache's tolerance, the workdir) over every
    train response."""
    arch, precompute_layout = request.param
    root = tmp_path_factory.mktemp(f"step0-{arch}-{precompute_layout}")
    config = bf16_cache(demo_workdir, root, tiny_tokenizer, arch, precompute_layout)
    inputs = load_run_inputs(config)
    assert inputs.reference is not None and inputs.cache is not None
    assert inputs.cache.manifest.reference.dtype == "bfloat16"
    assert inputs.cache.manifest.reference.quantization == "nf4"
    torch.manual_seed(config.train.seed)
    policy = attach_lora(inputs.base, config.lora, gradient_checkpointing=True)
    layout = choose_layout(config.train.layout, policy, inputs.device)
    policy.train()
    pad_id = pad_id_of(inputs.tokenizer)
    gaps, tokens = [], []
    for start in range(0, len(inputs.pairs), 2):
        indices = list(range(start, min(start + 2, len(inputs.pairs))))
        batch = COLLATE[layout.name]([inputs.pairs[i] for i in indices], pad_id)
        out = sequence_logps(policy, batch, config.train.logits_chunk_size)
        gap, count = step0_gaps(out, *inputs.reference.logps(indices))
        gaps.append(gap)
        tokens.append(count)
    case = f"{arch}, {precompute_layout} cache"
    return case, torch.cat(gaps), torch.cat(tokens), step0_tolerance_for(inputs.cache.manifest), root


def test_bf16_policy_at_init_is_within_the_bound_with_room(bf16_gaps):
    case, gaps, tokens, tolerance, _ = bf16_gaps
    assert tolerance == TOLERANCES["bfloat16"]
    assert len(gaps) >= 100
    worst = int((gaps / tolerance.bound(tokens)).argmax())
    print(
        f"\n{case}, bf16, {len(gaps)} responses of {int(tokens.min())}-{int(tokens.max())} tokens: "
        f"|Δ| median {gaps.median():.4f} p99 {gaps.quantile(0.99):.4f} max {gaps.max():.4f} "
        f"(n = {int(tokens[gaps.argmax()])}); max |Δ|/√n {(gaps / tokens.sqrt()).max():.4f}; "
        f"worst gap/bound {float(gaps[worst] / tolerance.bound(tokens[worst])):.3f}"
    )
    assert (MARGIN * gaps <= tolerance.bound(tokens)).all()


def test_the_bound_grows_like_sqrt_of_the_length():
    """a + b·sqrt(n) + c·n: a floor for short responses, the random walk of independent
    roundings, a small systematic drift; fp32 keeps its 1e-4 nats per token."""
    bound = TOLERANCES["bfloat16"].bound(torch.tensor([1, 4, 100, 10_000]))
    assert torch.allclose(bound, torch.tensor([0.402, 0.558, 1.95, 35.25]))
    fp32 = TOLERANCES["float32"].bound(torch.tensor([1, 50]))
    assert torch.allclose(fp32, torch.tensor([1e-4, 5e-3]))  # 1e-4 nats per token
    assert (
        TOLERANCES["bfloat16"].describe() == "0.25 + 0.15·√n + 0.002·n nats over n response tokens (bfloat16)"
    )


def logps_of(chosen: list[float], rejected: list[float], tokens: list[int]) -> SequenceLogps:
    return SequenceLogps(torch.tensor(chosen + rejected), torch.tensor(tokens))


def test_the_error_names_the_worst_pair_and_the_log_the_distribution(caplog):
    """The worst pair relative to its own bound, by source row and pair hash, with its gap,
    bound, token count and dtype, on one line."""
    tolerance = Step0Tolerance("bfloat16", floor=0.1, per_sqrt_token=0.05)
    reference = torch.tensor([-10.0, -20.0]), torch.tensor([-30.0, -40.0])
    # gaps 0.05 / 0.5 / 0.3 / 0.1 over 4 / 100 / 9 / 1 tokens: bounds 0.2 / 0.6 / 0.25 / 0.15
    policy = logps_of([-10.05, -20.5], [-30.3, -40.1], [4, 100, 9, 1])
    hashes = [bytes.fromhex("ab" * 32), bytes.fromhex("cd" * 32)]
    with caplog.at_level(logging.INFO, logger="lora_dpo.cache.step0"):
        with pytest.raises(CacheError) as error:
            check_step0_agreement(policy, *reference, tolerance, [17, 42], hashes)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "the policy at init disagrees with the cached reference by 0.0333 nats per token at "
        "source row 17, pair abababababab (rejected: 0.3 nats over 9 tokens, allowed 0.25 at bfloat16)"
    )
    (record,) = [r.getMessage() for r in caplog.records if "step-0 check" in r.getMessage()]
    assert "over 4 responses" in record and "min 5.00e-02" in record and "max 5.00e-01" in record
    assert "tolerance 0.1 + 0.05·√n nats over n response tokens (bfloat16)" in record
    assert "worst gap/tolerance 1.20" in record

    within = logps_of([-10.05, -20.5], [-30.2, -40.1], [4, 100, 9, 1])  # 0.2 over 9 tokens: allowed
    check_step0_agreement(within, *reference, tolerance, [17, 42], hashes)
    # a non-finite value is the skip logic's business, not a mismatch
    check_step0_agreement(logps_of([math.nan, -20.0], [-30.0, -40.0], [4, 100, 9, 1]), *reference, tolerance)


def test_a_bf16_cache_off_by_half_a_nat_per_token_fails(demo_workdir, tiny_tokenizer, tmp_path):
    """The bound is loose for rounding only: bf16 values 0.5 nats per token off (another model
    is off by several) stop training at step 0, and the error names the pair, end to end."""
    root = tmp_path / "work"
    root.mkdir()
    bf16_cache(demo_workdir, root, tiny_tokenizer, "llama", "auto")

    def half_a_nat_per_token_off(tensors):
        tensors["chosen_logps"] -= 0.5 * tensors["chosen_tokens"]

    config = bf16_config(root)
    config.precompute.cache_dir = str(
        edited_cache_copy(root / "cache", tmp_path / "cache", half_a_nat_per_token_off)
    )
    config.train.output_dir = str(tmp_path / "run")
    config.train.max_steps = 1
    pattern = (
        r"^the policy at init disagrees with the cached reference by 0\.5\d* nats per token at source row "
        r"\d+, pair [0-9a-f]{12} \(chosen: [\d.]+ nats over \d+ tokens, allowed [\d.]+ at bfloat16\)"
    )
    with pytest.raises(CacheError, match=pattern):
        train(config)
