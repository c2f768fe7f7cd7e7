"""Preference objectives as pure tensor functions: TRL's DPO loss types, the reference-free
objectives, and the options that combine with them.

    settings        LossSettings (the configured objective), LOSS_TYPES, which loss reads what
    output          DPOOutput (losses and rewards) and the helpers the formulas share
    dpo             sigmoid (DPO, cDPO), robust, hinge, ipo, sigmoid_norm, exo_pair, discopop:
                    functions of the reward margin, so an f-divergence applies to them
    pairwise        nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, aot, aot_unpaired
    reference_free  simpo, cpo, orpo: no reference model, so no cache
    kto             kto: unpaired rows, each a completion labelled desirable or not
    terms           the chosen NLL (rpo_alpha, sft), LD-DPO's ld_logps, WPO's weights
    divergence      f-DPO's f'(u) for reverse KL, forward KL, JS and α-divergences
    objective       PairLogps and compute_loss: the configured combination on a batch

Every loss takes per-pair summed response log-probs, all `[B]`, and returns a `DPOOutput` of
`[B]` tensors. The reference terms never meet β, so one reference cache serves every loss type
and every β (KTO's rows read a cache of their own: each completion and its KL completion).
Names and parameters follow TRL (DPOTrainer, CPOTrainer, ORPOTrainer, KTOTrainer) so
settings carry over.
"""

from lora_dpo.losses.divergence import FDivergence
from lora_dpo.losses.dpo import (
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_dpo_loss,
    sigmoid_norm_loss,
)
from lora_dpo.losses.kto import KTOOutput, kto_kl, kto_loss, kto_metrics
from lora_dpo.losses.objective import PairLogps, compute_loss, preference_loss
from lora_dpo.losses.output import DPOOutput
from lora_dpo.losses.pairwise import (
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    nca_pair_loss,
    sppo_hard_loss,
)
from lora_dpo.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from lora_dpo.losses.settings import (
    DPO_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    SMOOTHED_LOSS_TYPES,
    UNPAIRED_LOSS_TYPES,
    LossSettings,
)
from lora_dpo.losses.terms import ld_logps, rpo_nll_term, sft_loss, wpo_weights

__all__ = [
    "DPOOutput",
    "DPO_LOSS_TYPES",
    "FDivergence",
    "KTOOutput",
    "LOSS_TYPES",
    "LossSettings",
    "PairLogps",
    "REFERENCE_FREE_LOSS_TYPES",
    "SMOOTHED_LOSS_TYPES",
    "UNPAIRED_LOSS_TYPES",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "compute_loss",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "exo_pair_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "kto_metrics",
    "ld_logps",
    "nca_pair_loss",
    "orpo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "rpo_nll_term",
    "sft_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "wpo_weights",
]
