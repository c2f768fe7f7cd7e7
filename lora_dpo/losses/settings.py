"""The objective `train.*` configures, as one value, and which setting each loss type reads.

Torch-free: the config validation reads these tables without importing the losses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_dpo.config import TrainConfig

# TRL's DPOTrainer `loss_type` list (the first four in the order this project had them).
DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# No reference model at all: TRL's CPOTrainer (`cpo`, its `loss_type="simpo"`) and ORPOTrainer.
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo", "cpo")
# Unpaired rows (a completion and its label), TRL's KTOTrainer: lora_dpo.losses.kto.
UNPAIRED_LOSS_TYPES = ("kto",)
LOSS_TYPES = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES + UNPAIRED_LOSS_TYPES
# Several DPO loss types are combined as `a+b+c` (TRL's list `loss_type=[a, b, c]`), weighted by
# `loss_weights`.
LOSS_JOINER = "+"

# Loss types whose formula reads `label_smoothing`; elsewhere a non-zero value is a config error.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
# TRL: the f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in the chosen
# minus rejected reward difference, so only the losses built on that difference generalise.
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL: the aot losses sort the batch, which would misalign WPO's per-pair weights.
UNWEIGHTED_LOSS_TYPES = ("aot", "aot_unpaired")
# A setting that only these loss types read; another value than its default elsewhere is an error.
PARAMETER_USERS = {
    "discopop_tau": ("discopop",),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("cpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}
# DPO options that read a pair's two responses; KTO's rows have one completion each.
PAIR_OPTIONS = ("rpo_alpha", "ld_alpha", "use_weighting")


@dataclass(frozen=True)
class LossSettings:
    """The objective `train.*` configures, as one value for every caller of the losses
    (training and eval score pairs with the same loss). Names and defaults are TRL's."""

    beta: float
    loss_type: str = "sigmoid"  # one of LOSS_TYPES, or DPO loss types joined with "+"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    loss_weights: tuple[float, ...] = ()  # one per joined loss type; () = all 1.0 (TRL's None)
    ld_alpha: float = 1.0  # LD-DPO's α; 1.0 = no down-weighting (TRL's ld_alpha=None)
    use_weighting: bool = False  # WPO
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0  # KTO's λD
    undesirable_weight: float = 1.0  # KTO's λU

    @classmethod
    def of(cls, train: TrainConfig) -> LossSettings:
        values = {f.name: getattr(train, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "loss_weights": tuple(values["loss_weights"] or ())})

    @property
    def loss_types(self) -> tuple[str, ...]:
        return tuple(self.loss_type.split(LOSS_JOINER))

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights or (1.0,) * len(self.loss_types)

    @property
    def reference_free(self) -> bool:
        """Whether the objective reads no reference values at all (no cache needed)."""
        return self.loss_type in REFERENCE_FREE_LOSS_TYPES

    @property
    def unpaired(self) -> bool:
        """Whether the objective reads unpaired rows (KTO) instead of preference pairs."""
        return self.loss_type in UNPAIRED_LOSS_TYPES

    @property
    def needs_shared_prefix(self) -> bool:
        """LD-DPO: the log-probs of each response's first min(|yw|, |yl|) tokens, policy and reference."""
        return self.ld_alpha != 1.0

    @property
    def statistics(self) -> dict[str, bool]:
        """The optional per-sequence statistics of lora_dpo.logps.sequence_logps this objective reads."""
        return {"shared_prefix": self.needs_shared_prefix, "log_sum_sq_probs": self.use_weighting}

    def problem(self, prefix: str = "") -> str | None:
        """The first combination of settings that cannot run or would be silently ignored, as
        one line naming the settings (each name after `prefix`, e.g. "train."); None if sound."""
        p = prefix
        types = self.loss_types
        unknown = [t for t in types if t not in LOSS_TYPES]
        if unknown:
            return (
                f"{p}loss_type={self.loss_type!r}: must be one of {', '.join(LOSS_TYPES)}, or DPO loss "
                f"types joined with {LOSS_JOINER} (e.g. sigmoid{LOSS_JOINER}bco_pair{LOSS_JOINER}sft)"
            )
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            return f"{p}f_divergence_type={self.f_divergence_type!r}: must be one of {', '.join(F_DIVERGENCE_TYPES)}"
        if len(types) > 1 and set(types) & set(REFERENCE_FREE_LOSS_TYPES):
            return f"{p}loss_type={self.loss_type}: {', '.join(REFERENCE_FREE_LOSS_TYPES)} take no reference and stand alone"
        if len(types) > 1 and set(types) & set(UNPAIRED_LOSS_TYPES):
            return f"{p}loss_type={self.loss_type}: kto reads unpaired rows and stands alone"
        if self.loss_weights and len(self.loss_weights) != len(types):
            return (
                f"{p}loss_weights={list(self.loss_weights)}: one weight per loss type of "
                f"{p}loss_type={self.loss_type} ({len(types)}), got {len(self.loss_weights)}"
            )
        if not all(math.isfinite(w) and w >= 0 for w in self.loss_weights):
            return f"{p}loss_weights={list(self.loss_weights)}: each weight must be >= 0 and finite"
        if self.label_smoothing and not set(types) & set(SMOOTHED_LOSS_TYPES):
            return (
                f"{p}label_smoothing={self.label_smoothing} has no effect with {p}loss_type={self.loss_type}; "
                f"it applies to {', '.join(SMOOTHED_LOSS_TYPES)}"
            )
        if "exo_pair" in types and not self.label_smoothing:
            return f"{p}loss_type=exo_pair needs {p}label_smoothing > 0 (the EXO paper uses 1e-3)"
        for name, users in PARAMETER_USERS.items():
            if getattr(self, name) != _DEFAULTS[name] and not set(types) & set(users):
                return f"{p}{name}={getattr(self, name)} has no effect with {p}loss_type={self.loss_type}; it applies to {', '.join(users)}"
        if self.f_divergence_type != "reverse_kl":
            others = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
            if others:
                return (
                    f"{p}f_divergence_type={self.f_divergence_type} does not apply to {p}loss_type={', '.join(others)}; "
                    f"it applies to {', '.join(F_DIVERGENCE_LOSS_TYPES)}"
                )
        if (
            self.f_divergence_type != "alpha_divergence"
            and self.f_alpha_divergence_coef != _DEFAULTS["f_alpha_divergence_coef"]
        ):
            return f"{p}f_alpha_divergence_coef has no effect unless {p}f_divergence_type=alpha_divergence"
        if self.unpaired:
            for name in PAIR_OPTIONS:
                if getattr(self, name) != _DEFAULTS[name]:
                    return f"{p}{name}={getattr(self, name)} is a DPO option on pairs; {p}loss_type=kto reads unpaired rows"
        if self.reference_free:
            for name in ("ld_alpha", "use_weighting"):
                if getattr(self, name) != _DEFAULTS[name]:
                    return f"{p}{name}={getattr(self, name)} is a DPO option; {p}loss_type={self.loss_type} has no reference"
            if self.rpo_alpha and self.loss_type != "simpo":
                nll = (
                    f"{p}cpo_alpha weighs its NLL term"
                    if self.loss_type == "cpo"
                    else "its loss holds the NLL term"
                )
                return f"{p}rpo_alpha={self.rpo_alpha} does not apply to {p}loss_type={self.loss_type}: {nll}"
        if self.use_weighting and set(types) & set(UNWEIGHTED_LOSS_TYPES):
            return f"{p}use_weighting=true does not apply to {p}loss_type={self.loss_type}: the aot losses sort the batch"
        return None

    def check(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossSettings)}
