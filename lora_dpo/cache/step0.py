"""The last identity check, made with numbers: the untrained policy must equal its cached reference."""

from __future__ import annotations

import logging

import torch

from lora_dpo.cache.manifest import Manifest
from lora_dpo.errors import CacheError
from lora_dpo.logps import SequenceLogps

log = logging.getLogger(__name__)


def step0_tolerance_for(manifest: Manifest) -> float | None:
    """Largest allowed mean per-token gap between the untrained policy and the cache.

    A cache built at the policy's own precision must agree with the policy at init (LoRA B = 0)
    up to float rounding from different batch shapes; anything more means another model,
    template or tokenizer slipped past the fingerprints. A reference at another precision by
    design differs, so its gap is only reported.
    """
    if manifest.reference.mode != "policy":
        return None
    return 1e-4 if manifest.reference.dtype == "float32" else 2e-2


def check_step0_agreement(
    policy_logps: SequenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, tolerance: float
) -> None:
    """Stop when the policy at init disagrees with the cached reference (one sync, step 1 only)."""
    policy = torch.cat([policy_logps.chosen, policy_logps.rejected]).detach()  # [2B]
    reference = torch.cat([ref_chosen, ref_rejected])  # [2B]
    per_token = (policy - reference).abs() / policy_logps.tokens.clamp(min=1)  # [2B]
    # Non-finite values are the skip logic's business (the step will not be applied).
    gap = torch.nan_to_num(per_token, nan=0.0, posinf=0.0).max().item()
    log.info("step-0 check: policy at init vs cached reference, max mean per-token gap %.2e", gap)
    if gap > tolerance:
        raise CacheError(
            f"the policy at init disagrees with the cached reference by {gap:.3g} nats per token "
            f"(allowed {tolerance:g}): the cache was built from another model, template or "
            "tokenizer; rebuild it, or set train.accept_cache_mismatch=true if this is deliberate"
        )
