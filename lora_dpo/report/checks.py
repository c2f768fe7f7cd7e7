"""Health checks of a run, from its training records and its latest samples.

Health checks over the training records (β from config.yaml). They read the rewards, not
the raw `logps/*`: a record's `logps/chosen` is a mean over whichever pairs fell into its
logging window, so it moves with their lengths, while `rewards/chosen / β` is each pair's
change against its own cached reference value, averaged: the drift of the chosen
log-likelihood in nats, free of batch composition. The rewards are β·(summed log-ratio) for
every loss type (IPO's per-token normalisation stays inside its loss), so the thresholds below
mean the same nats whatever `train.loss_type` is.

- **chosen log-probs falling while margins rise** (the classic DPO failure: the margin grows
  by pushing both responses down). Needs >= 4 training records; fires when the least-squares
  slope of `rewards/chosen` over steps is negative, the last two records are both at most
  -1 nat (`rewards/chosen / β <= -1`: chosen responses at least e times less likely than
  under the reference, and not for one noisy window only), and the least-squares slope of
  `rewards/margins` is positive.
- **drift from the reference**: the mean absolute summed log-ratio against the reference,
  `(|rewards/chosen| + |rewards/rejected|) / (2β)` nats, relative to the reference's own mean
  |log-prob| of the same responses, `(|logps/chosen - rewards/chosen/β| + |logps/rejected -
  rewards/rejected/β|) / 2`. Fires when the last record's ratio is >= 0.5: the policy's
  summed log-probs have moved by half their own size. (Not a KL estimate: the KL would need
  samples from the policy; this is a drift on the training responses.)
- **reward accuracy stuck at chance**: needs >= 4 training records; fires when the mean of
  `rewards/accuracies` over the last half is within 0.5 +- 0.05 (a policy equal to its
  reference scores exactly 0.5: ties count half).
- **non-finite values**: any NaN or infinite training metric, or any optimizer step skipped
  for a non-finite loss or gradient (`skipped_steps`).

Checks over what the policy writes, on the samples of the latest step in `samples.jsonl`
(written with `train.generate_every` or `lora-dpo generate`; a run without one has neither):

- **generated length**: mean generated tokens of the policy over the reference's, on the same
  held-out prompts. Fires when the ratio is outside [0.5, 2]: the policy writes less than half
  or more than twice as much as its reference (rambling, or answers cut to nothing).
- **repetition**: the share of the policy's word 4-grams that repeat an earlier 4-gram of the
  same completion. Fires when it is above 0.3 (looping text); the reference's share is shown
  beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lora_dpo.samples import Sample, repeated_ngram_share

MIN_TREND_RECORDS = 4  # fewer logged steps than this cannot show a trend
CHOSEN_DROP_NATS = 1.0  # chosen responses e times less likely than under the reference
DRIFT_RATIO_LIMIT = 0.5  # policy log-probs moved by half the reference's own |log-prob|
CHANCE_BAND = 0.05  # accuracy within 0.5 +- this is chance
LENGTH_RATIO_BAND = (0.5, 2.0)  # policy / reference mean generated length
REPEAT_NGRAM, REPEAT_LIMIT = 4, 0.3  # share of word 4-grams repeating an earlier one


@dataclass
class Check:
    """One health check: `warning` is a sentence when it fired, None when the run looks fine."""

    name: str
    detail: str  # what was measured, shown whether or not it fired
    warning: str | None = None


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0


def _series(records: Sequence[dict[str, float]], name: str) -> list[float]:
    return [float(r[name]) for r in records if name in r]


def _finite(record: dict[str, float], *names: str) -> bool:
    """Whether the record has every name with a finite value (a window of skipped steps has NaN)."""
    return all(isinstance(record.get(n), (int, float)) and math.isfinite(record[n]) for n in names)


def check_chosen_falling(train: Sequence[dict[str, float]], beta: float) -> Check:
    name = "chosen log-probs vs margins"
    records = [r for r in train if _finite(r, "rewards/chosen", "rewards/margins")]
    if len(records) < MIN_TREND_RECORDS:
        return Check(name, f"not judged: {len(records)} training records, trends need {MIN_TREND_RECORDS}")
    steps = _series(records, "step")
    drift = [r["rewards/chosen"] / beta for r in records]  # nats vs the reference
    margins = _series(records, "rewards/margins")
    detail = (
        f"chosen log-prob drift {drift[0]:+.2f} -> {drift[-1]:+.2f} nats vs the reference, "
        f"margins {margins[0]:+.3f} -> {margins[-1]:+.3f}"
    )
    falling = _slope(steps, drift) < 0 and max(drift[-2:]) <= -CHOSEN_DROP_NATS
    if falling and _slope(steps, margins) > 0:
        return Check(
            name,
            detail,
            f"chosen log-probs falling while margins rise: at step {int(steps[-1])} chosen responses "
            f"are {-drift[-1]:.2f} nats less likely than under the reference (rewards/chosen "
            f"{records[-1]['rewards/chosen']:+.3f} at beta {beta:g}) while rewards/margins rose "
            f"{margins[0]:+.3f} -> {margins[-1]:+.3f}: the margin grows by pushing both responses "
            "down, the classic DPO failure. Try a lower learning rate or a larger beta, an NLL term "
            "on the chosen responses (train.rpo_alpha > 0), and check that the chosen responses are "
            "likely under the base model (SFT on them first).",
        )
    return Check(name, detail)


def check_drift(train: Sequence[dict[str, float]], beta: float) -> Check:
    name = "drift from the reference"
    keys = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
    records = [r for r in train if _finite(r, *keys)]
    if not records:
        return Check(name, "not judged: no training records with rewards and log-probs")
    last = records[-1]
    drift = (abs(last["rewards/chosen"]) + abs(last["rewards/rejected"])) / (2 * beta)
    reference = (
        abs(last["logps/chosen"] - last["rewards/chosen"] / beta)
        + abs(last["logps/rejected"] - last["rewards/rejected"] / beta)
    ) / 2
    ratio = drift / reference if reference > 0 else math.inf
    detail = (
        f"mean |log-prob drift| {drift:.2f} nats = {ratio:.1%} of the reference's own "
        f"|log-prob| ({reference:.1f} nats) at step {int(last['step'])}"
    )
    if ratio >= DRIFT_RATIO_LIMIT:
        return Check(
            name,
            detail,
            f"policy drifting far from the reference: at step {int(last['step'])} its summed log-probs "
            f"have moved {drift:.1f} nats from the reference on average, {ratio:.0%} of the reference's "
            f"own {reference:.1f}: the policy has left the reference far behind (degenerate text "
            "is likely). Try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def check_accuracy_stuck(train: Sequence[dict[str, float]]) -> Check:
    name = "reward accuracy"
    records = [r for r in train if _finite(r, "rewards/accuracies")]
    if len(records) < MIN_TREND_RECORDS:
        return Check(name, f"not judged: {len(records)} training records, trends need {MIN_TREND_RECORDS}")
    half = records[len(records) // 2 :]
    mean = sum(r["rewards/accuracies"] for r in half) / len(half)
    span = f"steps {int(half[0]['step'])}-{int(half[-1]['step'])}"
    detail = f"mean {mean:.3f} over the last {len(half)} training records ({span})"
    if abs(mean - 0.5) <= CHANCE_BAND:
        return Check(
            name,
            detail,
            f"reward accuracy stuck at chance: mean {mean:.3f} over the last {len(half)} logging "
            f"steps ({span}). The policy is not separating chosen from rejected: check the "
            "learning rate (lr panel), that gradients flow (grad_norm panel), and that chosen and "
            "rejected are not swapped or identical.",
        )
    return Check(name, detail)


def check_finite(train: Sequence[dict[str, float]]) -> Check:
    name = "finite values"

    def non_finite(r: dict[str, float]) -> list[str]:
        return [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]

    bad = sorted({k for r in train for k in non_finite(r)})
    skipped = [(int(r["step"]), int(r["skipped_steps"])) for r in train if r.get("skipped_steps")]
    total_skipped = sum(n for _, n in skipped)
    detail = f"non-finite: {', '.join(bad)}" if bad else f"all {len(train)} training records finite"
    detail += f"; {total_skipped} step(s) skipped" if skipped else ""
    if bad:
        first = next(int(r["step"]) for r in train if non_finite(r))
        return Check(
            name,
            detail,
            f"non-finite training metrics from step {first} on ({', '.join(bad)}): the run diverged. "
            "Try a lower learning rate or a smaller train.max_grad_norm.",
        )
    if skipped:
        return Check(
            name,
            detail,
            f"{total_skipped} optimizer step(s) skipped for a non-finite loss or gradient, the first "
            f"in the logging window ending at step {skipped[0][0]}: the run is close to diverging. "
            "Try a lower learning rate or a smaller train.max_grad_norm.",
        )
    return Check(name, detail)


def check_generated_length(samples: Sequence[Sample]) -> Check:
    name = "generated length"
    if not samples:
        return Check(name, "not judged: no samples")
    policy = sum(s.policy_tokens for s in samples) / len(samples)
    reference = sum(s.reference_tokens for s in samples) / len(samples)
    ratio = policy / reference if reference > 0 else math.inf
    low, high = LENGTH_RATIO_BAND
    step = samples[0].step
    detail = (
        f"mean {policy:.1f} tokens (policy) vs {reference:.1f} (reference), ratio {ratio:.2f}, "
        f"{len(samples)} held-out prompts at step {step}"
    )
    if not low <= ratio <= high:
        return Check(
            name,
            detail,
            f"generated length far from the reference's: at step {step} the policy writes {policy:.1f} "
            f"tokens on average where the reference writes {reference:.1f} (ratio {ratio:.2f}, outside "
            f"[{low:g}, {high:g}]): look at samples.md. Rambling or truncated answers often mean the "
            "policy has drifted too far; try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def check_repetition(samples: Sequence[Sample]) -> Check:
    name = "repetition"
    if not samples:
        return Check(name, "not judged: no samples")
    policy = repeated_ngram_share([s.policy for s in samples], REPEAT_NGRAM)
    reference = repeated_ngram_share([s.reference for s in samples], REPEAT_NGRAM)
    step = samples[0].step
    detail = f"repeated word {REPEAT_NGRAM}-grams {policy:.1%} (policy) vs {reference:.1%} (reference) at step {step}"
    if policy > REPEAT_LIMIT:
        return Check(
            name,
            detail,
            f"degenerate repetition: at step {step} {policy:.0%} of the policy's word {REPEAT_NGRAM}-grams "
            f"repeat an earlier one in the same completion (the reference: {reference:.0%}): look at "
            "samples.md. Try a larger beta, a lower learning rate, or fewer steps.",
        )
    return Check(name, detail)


def health_checks(
    train: Sequence[dict[str, float]], beta: float, reference_free: bool = False
) -> list[Check]:
    """`reference_free`: the objective (simpo, orpo, cpo) logs its own rewards, not log-ratios
    against a reference, so the two checks that read them as nats of drift do not apply."""
    if reference_free:
        unjudged = "not judged: a reference-free objective's rewards are not log-ratios against a reference"
        reference_checks = [
            Check("chosen log-probs vs margins", unjudged),
            Check("drift from the reference", unjudged),
        ]
    else:
        reference_checks = [check_chosen_falling(train, beta), check_drift(train, beta)]
    return [
        *reference_checks,
        check_accuracy_stuck(train),
        check_finite(train),
    ]
