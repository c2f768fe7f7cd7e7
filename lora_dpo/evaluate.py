"""Held-out metrics of a policy against the reference cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import collate, length_sorted_batches, pad_id_of
from lora_dpo.cache import ReferenceCache
from lora_dpo.config import Config
from lora_dpo.errors import ConfigError
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.logps import sequence_logps
from lora_dpo.loss import LossSettings, preference_loss
from lora_dpo.metrics import PAIR_METRICS, pair_metrics, tie_aware_accuracy


@dataclass
class EvalMetrics:
    """Means over the held-out pairs; `to_dict` names them as training does, under `eval/`."""

    # PAIR_METRICS name -> mean, computed as in training (same loss, same per-pair function)
    pair_means: dict[str, float]
    preference_accuracy: float  # share with mean-token log-prob of chosen > rejected (no reference)
    # Mean of log πθ(yw|x) - log πref(yw|x) over the chosen responses, in nats. Large negative
    # values mean the policy has pushed the chosen responses down too (the classic DPO drift),
    # large positive ones that it has moved far from the reference.
    chosen_logratio: float
    pairs: int

    @property
    def loss(self) -> float:
        return self.pair_means["loss"]

    @property
    def reward_accuracy(self) -> float:
        """Share of pairs with chosen reward > rejected reward (ties count half)."""
        return self.pair_means["rewards/accuracies"]

    @property
    def reward_margin(self) -> float:
        """Mean β·(Δchosen - Δrejected), log-ratios summed over each response."""
        return self.pair_means["rewards/margins"]

    def to_dict(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            **{prefix + name: value for name, value in self.pair_means.items()},
            f"{prefix}preference_accuracy": self.preference_accuracy,
            f"{prefix}logratio/chosen": self.chosen_logratio,
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    cache: ReferenceCache,
    loss: LossSettings,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> EvalMetrics:
    """Score `pairs` with the training objective and training's per-pair metrics."""
    was_training = model.training
    model.eval()  # no LoRA dropout
    sums = torch.zeros(len(PAIR_METRICS), dtype=torch.float64, device=device)
    preferences, chosen_logratios = [], []
    batches = length_sorted_batches(pairs, batch_size)
    for indices in tqdm(batches, desc="eval", unit="batch", leave=False):
        batch = collate([pairs[i] for i in indices], pad_id).to(device)
        policy = sequence_logps(model, batch)
        ref_chosen, ref_rejected = (t.to(device) for t in cache.lookup(batch.pair_hashes))
        out = preference_loss(
            policy.chosen, policy.rejected, ref_chosen, ref_rejected, loss.beta,
            loss_type=loss.loss_type, label_smoothing=loss.label_smoothing, rpo_alpha=loss.rpo_alpha,
            chosen_tokens=policy.chosen_tokens, rejected_tokens=policy.rejected_tokens,
        )
        sums += pair_metrics(out, policy).sum(dim=1)  # [M]
        chosen_logratios.append(policy.chosen.double() - ref_chosen.double())  # [B]
        mean_chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
        mean_rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
        preferences.append(tie_aware_accuracy(mean_chosen - mean_rejected))  # [B]
    model.train(was_training)
    count = len(pairs)
    return EvalMetrics(
        pair_means=dict(zip(PAIR_METRICS, (sums / max(count, 1)).tolist())),
        preference_accuracy=torch.cat(preferences).mean().item(),
        chosen_logratio=torch.cat(chosen_logratios).mean().item(),
        pairs=count,
    )


def evaluate_run(config: Config, adapter_dir: str | None) -> EvalMetrics:
    """`lora-dpo eval`: the eval split of `config` against its cache, for an adapter or the base."""
    from lora_dpo.identity import open_checked_cache, policy_precision
    from lora_dpo.model import default_device, load_adapter, load_base_model, load_tokenizer

    if not config.data.eval_path:
        raise ConfigError("data.eval_path is not set: eval needs held-out pairs")
    device = default_device()
    precision = policy_precision(config, device)
    tokenizer = load_tokenizer(config.model)
    pairs, _ = load_preference_data(config.data, tokenizer, "eval")
    cache = open_checked_cache(config, tokenizer, precision, accept_mismatch=config.train.accept_cache_mismatch)
    cache.check_covers(pairs, "eval")
    model = load_base_model(
        config.model, quantize=precision.quantization == "nf4", dtype=precision.dtype, device=device
    )
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    return evaluate(
        model,
        pairs,
        cache,
        LossSettings.of(config.train),
        pad_id_of(tokenizer),
        config.precompute.batch_size,
        device,
    )
