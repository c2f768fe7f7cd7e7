"""Win rate of the policy over its reference, judged by a local reward model.

The reward model is any local `AutoModelForSequenceClassification` with one score per text
(`num_labels=1`, as TRL's reward trainer writes them). It reads each completion as plain text,
the held-out prompt followed by the completion (special tokens dropped), tokenized by its own
tokenizer. Per prompt the policy wins when its completion scores higher than the reference's,
ties count half (a policy equal to its reference scores exactly 0.5); the score gain is the
mean of policy score minus reference score, in the reward model's units.

Batches are right-padded with the reward model's own pad id and carry a mask from the lengths:
the model scores the last token that is not its pad id, as it does for an unpadded text, so a
text scores the same in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo.config import Config
from lora_dpo.errors import ConfigError
from lora_dpo.generate import Completion, HeldOut
from lora_dpo.metrics import tie_aware_accuracy


@dataclass(frozen=True)
class WinRate:
    win_rate: float  # share of prompts where the policy's completion scores higher; ties half
    score_gain: float  # mean policy score - reference score
    prompts: int


@dataclass
class RewardModel:
    model: Any  # an AutoModelForSequenceClassification with one score
    tokenizer: Any
    device: torch.device


def load_reward_model(path: str, device: torch.device) -> RewardModel:
    """A local reward model directory, in the compute dtype lora-dpo uses on `device`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_dpo.model import compute_dtype

    where = f"train.reward_model={path!r}"
    if not Path(path).expanduser().is_dir():
        raise ConfigError(f"{where}: no such directory (a local reward model directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=compute_dtype("auto", device), device_map={"": str(device)}
        )
    except (OSError, ValueError) as exc:  # not a model, or not one with a sequence-classification head
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"{where}: cannot load it as a sequence-classification model: {first[:300]}"
        ) from None
    if model.config.num_labels != 1:
        raise ConfigError(
            f"{where}: the model has {model.config.num_labels} labels; a reward model gives one score (num_labels=1)"
        )
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:  # it finds each text's last token by its pad id
        text_config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    model.requires_grad_(False)
    model.eval()
    return RewardModel(model, tokenizer, device)


@torch.no_grad()
def score_texts(reward: RewardModel, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """The reward model's score of each text, fp32 [N], in order."""
    pad_id = reward.model.config.get_text_config().pad_token_id
    encoded = reward.tokenizer(list(texts), truncation=True)["input_ids"] if texts else []
    scores = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [b, T] right-padded
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        out = reward.model(
            input_ids=input_ids.to(reward.device), attention_mask=attention_mask.to(reward.device)
        )
        scores.append(out.logits[:, 0].float().cpu())  # [b]
    return torch.cat(scores) if scores else torch.zeros(0)


def win_rate(reference_scores: torch.Tensor, policy_scores: torch.Tensor) -> WinRate:
    """Per prompt: 1 when the policy's score is higher, 0.5 on a tie, 0 otherwise; averaged."""
    gain = policy_scores.double() - reference_scores.double()  # [N]
    return WinRate(tie_aware_accuracy(gain).mean().item(), gain.mean().item(), len(gain))


def judge_texts(prompts: Sequence[str], completions: Sequence[Completion]) -> list[str]:
    """What the reward model reads: each prompt followed by its completion."""
    return [prompt + completion.text for prompt, completion in zip(prompts, completions, strict=True)]


class WinRateJudge:
    """Scores a policy's greedy completions of fixed held-out prompts against its reference's;
    the reference's scores are computed once, at the first call."""

    def __init__(self, reward: RewardModel, held_out: HeldOut):
        self.reward, self.held_out = reward, held_out
        self.reference_scores: torch.Tensor | None = None

    def __call__(self, policy: Any) -> WinRate:
        """`policy` is a peft model: its adapter on for the policy, disabled for the reference."""
        prompts = self.held_out.prompt_texts
        if self.reference_scores is None:
            self.reference_scores = score_texts(
                self.reward, judge_texts(prompts, self.held_out.reference(policy))
            )
        policy_scores = score_texts(self.reward, judge_texts(prompts, self.held_out.completions(policy)))
        return win_rate(self.reference_scores, policy_scores)


def judge_from_config(config: Config, held_out: HeldOut) -> WinRateJudge | None:
    """The judge `train.reward_model` asks for (None when it is empty), on `held_out`'s prompts."""
    if not config.train.reward_model:
        return None
    return WinRateJudge(load_reward_model(config.train.reward_model, held_out.device), held_out)
