"""Held-out metrics of a policy against the reference cache."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import batch_tokens, length_sorted_batches, pad_id_of
from lora_dpo.cache import ReferenceValues
from lora_dpo.config import Config
from lora_dpo.data import TokenizedPair, labels_of, load_preference_data
from lora_dpo.distributed import all_gather_objects, dist_info
from lora_dpo.errors import ConfigError
from lora_dpo.logps import SequenceLogps
from lora_dpo.losses import KTOOutput, LossSettings, PairLogps, compute_loss, kto_metrics
from lora_dpo.metrics import PAIR_METRICS, pair_metrics, tie_aware_accuracy
from lora_dpo.packing import choose_layout
from lora_dpo.rank_work import balanced_assignment
from lora_dpo.scoring import PairScores, score_pairs, scoring_batches

if TYPE_CHECKING:
    from lora_dpo.judge import WinRate

log = logging.getLogger(__name__)


@dataclass
class EvalMetrics:
    """Means over the held-out pairs; `to_dict` names them as training does, under `eval/`."""

    # PAIR_METRICS name -> mean, computed as in training (same loss, same per-pair function)
    pair_means: dict[str, float]
    preference_accuracy: float  # share with mean-token log-prob of chosen > rejected (no reference)
    # Mean of log πθ(yw|x) - log πref(yw|x) over the chosen responses, in nats. Large negative
    # values mean the policy has pushed the chosen responses down too (the classic DPO drift),
    # large positive ones that it has moved far from the reference. None without a reference.
    chosen_logratio: float | None
    pairs: int
    # The policy's completions of held-out prompts judged against the reference's by
    # train.reward_model (lora_dpo/judge.py); None without a reward model.
    win_rate: float | None = None  # share of prompts the policy wins, ties half
    score_gain: float | None = None  # mean reward-model score, policy minus reference
    # KTO's own metrics (lora_dpo.losses.kto.kto_metrics), logged under `eval/kto/`; None for pairs
    kto: dict[str, float] | None = None

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

    def judged(self, won: WinRate) -> EvalMetrics:
        """These metrics with a judge's win rate and score gain."""
        return dataclasses.replace(self, win_rate=won.win_rate, score_gain=won.score_gain)

    def to_dict(self, prefix: str = "eval/") -> dict[str, float]:
        values = {
            **{prefix + name: value for name, value in self.pair_means.items()},
            f"{prefix}preference_accuracy": self.preference_accuracy,
            **({f"{prefix}win_rate": self.win_rate} if self.win_rate is not None else {}),
            **({f"{prefix}score_gain": self.score_gain} if self.score_gain is not None else {}),
        }
        if self.chosen_logratio is not None:
            values[f"{prefix}logratio/chosen"] = self.chosen_logratio
        for name, value in (self.kto or {}).items():
            values[f"{prefix}kto/{name}"] = value
        return values


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    reference: ReferenceValues | None,
    loss: LossSettings,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    layout: str = "padded",
    max_tokens: int = 0,
) -> EvalMetrics:
    """Score `pairs` (aligned with `reference`; None for a reference-free objective) with the
    training objective and training's per-pair metrics, over all held-out pairs at once (RPO's
    per-token NLL is over all of them). Batches as the precompute makes them: `batch_size`
    pairs, or `max_tokens` in `layout`. Under torchrun every rank calls it: each scores a share
    of the batches (`score_across_ranks`) and every rank gets the metrics one process would."""
    was_training = model.training
    model.eval()  # no LoRA dropout
    order = [i for batch in length_sorted_batches(pairs, batch_size) for i in batch]  # little padding
    ordered = [pairs[i] for i in order]
    batches = scoring_batches(ordered, batch_size, layout, max_tokens)
    scores = score_across_ranks(model, ordered, batches, pad_id, device, layout, loss.statistics)
    model.train(was_training)
    policy = SequenceLogps(
        logps=torch.cat([scores.chosen, scores.rejected]),  # [2N], chosen first
        tokens=torch.cat([scores.chosen_tokens, scores.rejected_tokens]),
        shared_logps=scores.shared_logps,
        log_sum_sq_probs=scores.log_sum_sq_probs,
    )
    ref_chosen, ref_rejected = reference.logps(order) if reference is not None else (None, None)  # [N] each
    ref_shared = reference.shared_logps(order) if reference is not None and loss.needs_shared_prefix else None
    labels = labels_of([pairs[i] for i in order])  # KTO's rows; None for pairs
    # KTO: the reference point z0 is estimated over all held-out rows at once
    out = compute_loss(loss, PairLogps.of(policy, ref_chosen, ref_rejected, ref_shared, labels))
    mean_chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)  # [N] per-token log-prob
    mean_rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
    return EvalMetrics(
        pair_means=dict(zip(PAIR_METRICS, pair_metrics(out, policy).mean(dim=1).tolist())),
        preference_accuracy=tie_aware_accuracy(mean_chosen - mean_rejected).mean().item(),
        chosen_logratio=None
        if ref_chosen is None
        else (policy.chosen.double() - ref_chosen.double()).mean().item(),
        pairs=len(pairs),
        kto=kto_metrics(out, loss.beta) if isinstance(out, KTOOutput) else None,
    )


def score_across_ranks(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    batches: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    layout: str,
    statistics: dict[str, bool],
) -> PairScores:
    """`pairs` scored in `batches` (one process's, covering `pairs` in order), the rows in pair
    order. Under torchrun each rank scores whole batches, dealt by their decoder tokens, and
    the ranks gather the rows: a pair is scored in the batch it has in one process, so its
    values are the one-process values bit for bit on any device (a batch of another shape may
    round differently on a GPU), and so are the metrics computed from them in that order."""
    info = dist_info()
    tokens = [batch_tokens(layout, [pairs[i] for i in batch]) for batch in batches]
    share = balanced_assignment(tokens, info.world_size)[info.rank]
    quiet = {} if info.is_main else {"disable": True}  # one bar per job, not per rank
    progress = tqdm(total=sum(len(batches[k]) for k in share), desc="eval", unit="pair", leave=False, **quiet)
    mine = None  # a rank dealt no batch (fewer batches than ranks) scores nothing
    if share:
        mine = score_pairs(
            model,
            pairs,
            batch_size=len(pairs),  # unused: the batches are given
            pad_id=pad_id,
            device=device,
            progress=progress,
            layout=layout,
            batches=[batches[k] for k in share],
            **statistics,
        )
    progress.close()
    if not info.enabled:
        assert mine is not None, "one process scores every batch"
        return mine
    return in_pair_order(all_gather_objects((share, mine)), batches, len(pairs))


def in_pair_order(
    parts: Sequence[tuple[list[int], PairScores | None]], batches: Sequence[Sequence[int]], total: int
) -> PairScores:
    """The ranks' rows (each: the indices of the batches it scored, and their scores) placed
    where their pairs are in the flattened `batches`: a copy, so values come out unchanged."""
    starts = [0, *accumulate(len(batch) for batch in batches)]
    whole: dict[str, torch.Tensor | None] = dict.fromkeys(PAIR_SCORE_FIELDS)
    for share, scores in parts:
        if scores is None:
            continue
        rows = torch.tensor([row for k in share for row in range(starts[k], starts[k] + len(batches[k]))])
        for name in PAIR_SCORE_FIELDS:
            value = getattr(scores, name)
            if value is None:  # a statistic not asked for
                continue
            per_row = value.view(-1, len(rows))  # [1, n], or [2, n]: chosen rows, then rejected
            placed = whole[name]
            if placed is None:
                placed = whole[name] = per_row.new_empty(per_row.shape[0], total)
            placed[:, rows] = per_row
    flat = {name: None if value is None else value.flatten() for name, value in whole.items()}
    return PairScores(**flat)  # type: ignore[arg-type]


PAIR_SCORE_FIELDS = tuple(field.name for field in dataclasses.fields(PairScores))


def evaluate_run(config: Config, adapter_dir: str | Path | None, *, base: str | None = None) -> EvalMetrics:
    """`lora-dpo eval`: the eval split of `config` against its cache, for an adapter or the base.
    Under torchrun the ranks share the scoring and all return the metrics; rank 0 alone judges.

    `base` (`--base`) replaces `model.name_or_path` and accepts an adapter recorded for
    another base; the adapter's shapes are checked against the base either way. The adapter
    is read and checked before anything is loaded."""
    from lora_dpo.adapters import read_adapter
    from lora_dpo.cache import open_checked_cache, policy_precision
    from lora_dpo.model import (
        check_adapter_base,
        default_device,
        load_adapter,
        load_base_at,
        load_tokenizer,
    )

    if base:
        config = copy.deepcopy(config)
        config.model.name_or_path = base
    adapter = read_adapter(adapter_dir) if adapter_dir else None
    if not config.data.eval_path:
        raise ConfigError("data.eval_path is not set: eval needs held-out pairs")
    if adapter is not None:
        check_adapter_base(adapter, config.model, explicit_base=bool(base))
    device = default_device()
    precision = policy_precision(config, device)
    tokenizer = load_tokenizer(config.model)
    loss = LossSettings.of(config.train)
    pairs, report = load_preference_data(config.data, tokenizer, "eval", unpaired=loss.unpaired)
    reference = None  # a reference-free objective reads no cache
    if not loss.reference_free:
        cache = open_checked_cache(
            config,
            tokenizer,
            precision,
            accept_mismatch=config.train.accept_cache_mismatch,
            shared_prefix=loss.needs_shared_prefix,
        )
        cache.manifest.require_rows(loss.unpaired, cache.cache_dir, config.train.loss_type)
        reference = cache.aligned(pairs, "eval")
    judge = None
    # (the bare base is its own reference: nothing to judge; under torchrun, rank 0 judges)
    if adapter is not None and dist_info().is_main:
        from lora_dpo.generate import HeldOut
        from lora_dpo.judge import judge_from_config

        held_out = HeldOut.from_config(config, tokenizer, pairs, report.conversational, device)
        judge = judge_from_config(config, held_out)
    model = load_base_at(config.model, precision, device)
    if adapter is not None:
        model = load_adapter(model, adapter)
    layout = choose_layout(config.train.layout, model, device)
    log.info("%s", layout.describe(config.precompute.max_tokens_per_batch, config.precompute.batch_size))
    metrics = evaluate(
        model,
        pairs,
        reference,
        loss,
        pad_id_of(tokenizer),
        config.precompute.batch_size,
        device,
        layout.name,
        config.precompute.max_tokens_per_batch,
    )
    return metrics.judged(judge(model)) if judge is not None else metrics
