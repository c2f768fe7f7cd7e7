"""THE sequence log-prob function: both the reference precompute and the policy call it.

If the two stages computed log π(y|x) differently, the implicit reward at step 0 would not be
zero. So there is exactly one function, and it is exact: fp32 log-softmax, explicit shift,
explicit response mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import PreTrainedModel

from lora_dpo.batching import IGNORE_INDEX, PairBatch


@dataclass
class SequenceLogps:
    """Summed response log-probs of a stacked batch: chosen rows first, then rejected."""

    logps: torch.Tensor  # [2B] fp32, sum over response tokens of log π(token | prefix)
    tokens: torch.Tensor  # [2B] number of response tokens

    @property
    def chosen(self) -> torch.Tensor:  # [B]
        return self.logps[: len(self.logps) // 2]

    @property
    def rejected(self) -> torch.Tensor:  # [B]
        return self.logps[len(self.logps) // 2 :]

    @property
    def chosen_tokens(self) -> torch.Tensor:  # [B]
        return self.tokens[: len(self.tokens) // 2]

    @property
    def rejected_tokens(self) -> torch.Tensor:  # [B]
        return self.tokens[len(self.tokens) // 2 :]


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(decoder, head) of a causal LM, through a peft wrapper if there is one.

    `head` maps hidden states to the logits the model itself would return, including the
    non-linear touches some heads have (Gemma 2's final soft-capping, Cohere's logit scale).
    Anything else unusual is refused rather than silently mis-computed.
    """
    base: PreTrainedModel = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    for attribute in ("output_multiplier_scale", "logits_scaling", "mup_width_multiplier"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} rescales its logits ({attribute}); not supported yet"
            )
    lm_head = base.get_output_embeddings()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return base.get_decoder(), head


def sequence_logps(model: torch.nn.Module, batch: PairBatch) -> SequenceLogps:
    """Per-sequence sums of response-token log-probs for a [2B, T] batch.

    Only the hidden states at response positions reach the LM head: prompt and padding
    logits are never computed. Position t predicts token t+1, hence the shift.
    """
    decoder, head = causal_lm_parts(model)
    input_ids, labels = batch.input_ids, batch.labels  # [2B, T]
    assert input_ids.shape == labels.shape == batch.attention_mask.shape, "batch shapes differ"
    hidden = decoder(
        input_ids=input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # [2B, T, H]
    targets = labels[:, 1:]  # [2B, T-1] the token each position predicts
    predicted = targets != IGNORE_INDEX  # [2B, T-1]
    rows = predicted.nonzero(as_tuple=True)[0]  # [N] which sequence each response token is in
    response_hidden = hidden[:, :-1][predicted]  # [N, H]
    logits = head(response_hidden).float()  # [N, V] fp32 before the softmax
    token_logps = logits.log_softmax(dim=-1).gather(-1, targets[predicted].unsqueeze(-1))
    sums = torch.zeros(len(input_ids), dtype=torch.float32, device=hidden.device)
    sums = sums.index_add(0, rows, token_logps.squeeze(-1))  # [2B]
    return SequenceLogps(logps=sums, tokens=predicted.sum(dim=1))
