"""f-DPO: the divergence that regularises the policy against the reference (TRL's `f_divergence_type`).

Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints", Theorem 1: for an f-divergence regulariser the implicit reward is
β·f'(πθ/πref) instead of β·log(πθ/πref), so a margin loss sees

    d = f'(u_w) - f'(u_l),   u = πθ(y|x) / πref(y|x) = e^Δ   (Δ the summed log-ratio)

in place of z = Δw - Δl. With TRL's `f_alpha_divergence_coef` a:

    reverse_kl        f'(u) = log u                    = Δ          (standard DPO)
    forward_kl        f'(u) = 1 - 1/u                  = 1 - e^-Δ
    js_divergence     f'(u) = log(2u / (1 + u))        = log 2 + log σ(Δ)
    alpha_divergence  f'(u) = (u^(a-1) - 1) / (a - 1)  = (e^((a-1)Δ) - 1) / (a - 1)

TRL's a is 1 - α of the paper's α-divergence f'(u) = (1 - u^-α)/α: a = 1 is reverse KL (the
limit, taken as Δ), a = 0 forward KL. As in TRL, (a-1)Δ is clamped at 80 before the
exponential, so a huge log-ratio cannot overflow float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_dpo.losses.settings import F_DIVERGENCE_TYPES

_EXP_CLAMP = 80.0


@dataclass(frozen=True)
class FDivergence:
    kind: str = "reverse_kl"
    alpha_coef: float = 0.5  # TRL's f_alpha_divergence_coef, read by alpha_divergence only

    def __post_init__(self) -> None:
        if self.kind not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"unknown f_divergence_type {self.kind!r}; known: {', '.join(F_DIVERGENCE_TYPES)}"
            )

    def scores(self, logratios: torch.Tensor) -> torch.Tensor:
        """f'(e^Δ) per response, [B] -> [B]."""
        if self.kind == "reverse_kl" or (
            self.kind == "alpha_divergence" and abs(self.alpha_coef - 1.0) < 1e-6
        ):
            return logratios
        if self.kind == "forward_kl":
            return 1 - torch.exp(-logratios)
        if self.kind == "js_divergence":
            return math.log(2) + F.logsigmoid(logratios)
        shift = self.alpha_coef - 1.0
        return torch.expm1(torch.clamp(shift * logratios, max=_EXP_CLAMP)) / shift


REVERSE_KL = FDivergence()
