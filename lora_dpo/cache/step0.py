"""The last identity check, made with numbers: the untrained policy must equal its cached reference."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_dpo.cache.manifest import Manifest
from lora_dpo.errors import CacheError
from lora_dpo.logps import SequenceLogps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step0Tolerance:
    """The largest allowed |policy - cache| of one response's summed log-prob, n tokens long:

        bound(n) = floor + per_sqrt_token * sqrt(n) + per_token * n   (nats)

    The policy at init (LoRA B = 0) and the cache compute the same function; they differ only
    by float rounding, because precompute (batch 8, eval, no grad) and training (batch 2,
    train mode, checkpointed) run other kernels with other reduction orders. Each token's
    log-prob carries its own rounding error; errors that are independent from token to token
    add up like a random walk, ~sqrt(n) for a sum of n (the bf16 term), while an error of the
    same sign at every token (a systematic one) grows ~n (the per_token term). The floor covers
    a response of a few tokens, whose gap is one or two tokens' rounding.
    """

    dtype: str
    floor: float
    per_sqrt_token: float
    per_token: float = 0.0

    def bound(self, tokens: torch.Tensor) -> torch.Tensor:  # [R] -> [R] nats
        n = tokens.to(torch.float32).clamp(min=1)  # every response has a token (EOS at least)
        return self.floor + self.per_sqrt_token * n.sqrt() + self.per_token * n

    def describe(self) -> str:
        terms = [f"{self.floor:g}"] if self.floor else []
        terms += [f"{self.per_sqrt_token:g}·√n"] if self.per_sqrt_token else []
        terms += [f"{self.per_token:g}·n"] if self.per_token else []
        return f"{' + '.join(terms)} nats over n response tokens ({self.dtype})"


# fp32: 1e-4 nats per token, as before; fp32 rounding of a ~-100 nat sum is ~1e-5, so the
#   linear bound has room for any reduction order and is still far below a real mismatch.
# bf16/fp16, measured by tests/test_step0.py on the tiny Llama and Qwen2 models (real nf4, CPU,
#   bf16; every one of 512 responses of 7-15 tokens; cache at batch 8, the policy at init run
#   as training runs it at batch 2): in the same layout the gap is 0 exactly (the CPU's kernels
#   do not depend on the batch), and from a padded cache it is 0 too now that packed rows
#   attend pair by pair with causal kernels (before that, with one dense mask per pair, it was
#   at most 0.0047 nats: Llama, n = 12; Qwen2 0.0031; largest gap/sqrt(n) 0.0014).
#   The GPU picks GEMM and attention kernels by batch shape and its 8B models are 64x wider and
#   16x deeper, which that measurement cannot show, so the bound is set well above it:
#   0.15·sqrt(n) allows independent per-token rounding of std 0.025 nats at 6 sigma (100x the
#   CPU's), 0.002·n a systematic drift of a tenth of the old 0.02 nats per token, 0.25 a
#   floor for one- or two-token responses. Bound at n = 5: 0.6 nats (the bf16 logps tests'
#   0.2 fits); at n = 1000: 4.99 nats (0.005 per token), where another model, template or
#   tokenizer is off by tenths of a nat per token or more: 100+ nats. fp16 rounds finer
#   (10 mantissa bits to bf16's 7): bf16's bound covers it.
TOLERANCES = {
    "float32": Step0Tolerance("float32", floor=0.0, per_sqrt_token=0.0, per_token=1e-4),
    "bfloat16": Step0Tolerance("bfloat16", floor=0.25, per_sqrt_token=0.15, per_token=0.002),
    "float16": Step0Tolerance("float16", floor=0.25, per_sqrt_token=0.15, per_token=0.002),
}


def step0_tolerance_for(manifest: Manifest) -> Step0Tolerance | None:
    """The step-0 bound for a cache, None when the check does not apply.

    A cache built at the policy's own precision must agree with the policy at init up to float
    rounding; anything more means another model, template or tokenizer slipped past the
    fingerprints. A reference at another precision by design differs, so its gap is only
    reported.
    """
    if manifest.reference.mode != "policy":
        return None
    return TOLERANCES.get(manifest.reference.dtype, TOLERANCES["bfloat16"])


def step0_gaps(
    policy_logps: SequenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|policy - reference| per response [2B] nats, its token counts [2B]); non-finite gaps
    are 0 (the skip logic's business: such a step is not applied)."""
    policy = torch.cat([policy_logps.chosen, policy_logps.rejected]).detach()  # [2B]
    reference = torch.cat([ref_chosen, ref_rejected]).to(policy.device)  # [2B]
    gaps = torch.nan_to_num((policy - reference).abs(), nan=0.0, posinf=0.0)  # [2B]
    return gaps, policy_logps.tokens.to(policy.device)


def check_step0_agreement(
    policy_logps: SequenceLogps,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    tolerance: Step0Tolerance,
    source_rows: Sequence[int] = (),
    pair_hashes: Sequence[bytes] = (),
) -> None:
    """Stop when the policy at init disagrees with the cached reference (one sync, step 1 only).

    `source_rows` and `pair_hashes` ([B], the batch's) name the worst pair in the error."""
    gaps, tokens = step0_gaps(policy_logps, ref_chosen, ref_rejected)
    bounds = tolerance.bound(tokens)  # [2B]
    gap_list, token_list, bound_list = gaps.tolist(), tokens.tolist(), bounds.tolist()  # the one sync
    worst = max(range(len(gap_list)), key=lambda i: gap_list[i] / bound_list[i])
    ordered = sorted(gap_list)
    log.info(
        "step-0 check: policy at init vs cached reference over %d responses, |Δ log π| nats "
        "min %.2e median %.2e p99 %.2e max %.2e; tolerance %s; worst gap/tolerance %.2f",
        len(ordered),
        ordered[0],
        ordered[len(ordered) // 2],
        ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
        ordered[-1],
        tolerance.describe(),
        gap_list[worst] / bound_list[worst],
    )
    gap, bound, n = gap_list[worst], bound_list[worst], int(token_list[worst])
    if gap <= bound:
        return
    pairs = len(gap_list) // 2
    pair = worst % pairs
    which = "chosen" if worst < pairs else "rejected"
    named = f"source row {source_rows[pair]}" if pair < len(source_rows) else f"batch pair {pair}"
    if pair < len(pair_hashes):
        named += f", pair {pair_hashes[pair].hex()[:12]}"
    raise CacheError(
        f"the policy at init disagrees with the cached reference by {gap / max(n, 1):.3g} nats per token "
        f"at {named} ({which}: {gap:.3g} nats over {n} tokens, allowed {bound:.3g} at {tolerance.dtype}): "
        "the cache was built from another model, template or tokenizer; rebuild it, or set "
        "train.accept_cache_mismatch=true if this is deliberate"
    )
