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


@dataclass
class EvalMetrics:
    reward_accuracy: float  # share of pairs with chosen reward > rejected reward (ties count half)
    reward_margin: float  # mean β·(Δchosen - Δrejected)
    preference_accuracy: float  # share with mean-token log-prob of chosen > rejected (no reference)
    # KL proxy: mean log πθ(yw|x) - log πref(yw|x). Large negative values mean the policy has
    # pushed the chosen responses down too (the classic DPO drift), large positive ones that it
    # has moved far from the reference.
    chosen_logratio: float
    pairs: int

    def to_dict(self, prefix: str = "eval/") -> dict[str, float]:
        return {
            f"{prefix}rewards/accuracies": self.reward_accuracy,
            f"{prefix}rewards/margins": self.reward_margin,
            f"{prefix}preference_accuracy": self.preference_accuracy,
            f"{prefix}kl_proxy": self.chosen_logratio,
        }


def tie_aware_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Share of positive margins, a tie counting half: a policy equal to its reference scores
    0.5 (chance), not 0."""
    return (margins > 0).float().mean() + 0.5 * (margins == 0).float().mean()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    cache: ReferenceCache,
    beta: float,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> EvalMetrics:
    was_training = model.training
    model.eval()  # no LoRA dropout
    margins, preferences, chosen_logratios = [], [], []
    batches = length_sorted_batches(pairs, batch_size)
    for indices in tqdm(batches, desc="eval", unit="batch", leave=False):
        batch = collate([pairs[i] for i in indices], pad_id).to(device)
        out = sequence_logps(model, batch)
        ref_chosen, ref_rejected = cache.lookup(batch.pair_hashes)
        chosen_logratio = out.chosen.cpu() - ref_chosen  # [B]
        margins.append(beta * (chosen_logratio - (out.rejected.cpu() - ref_rejected)))
        chosen_logratios.append(chosen_logratio)
        mean_chosen = out.chosen / out.chosen_tokens.clamp(min=1)
        mean_rejected = out.rejected / out.rejected_tokens.clamp(min=1)
        preferences.append((mean_chosen - mean_rejected).cpu())
    model.train(was_training)
    margin = torch.cat(margins)  # [N]
    preference = torch.cat(preferences)  # [N]
    return EvalMetrics(
        reward_accuracy=tie_aware_accuracy(margin).item(),
        reward_margin=margin.mean().item(),
        preference_accuracy=tie_aware_accuracy(preference).item(),
        chosen_logratio=torch.cat(chosen_logratios).mean().item(),
        pairs=len(margin),
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
        config.train.beta,
        pad_id_of(tokenizer),
        config.precompute.batch_size,
        device,
    )
