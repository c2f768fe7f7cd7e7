"""THE sequence log-prob function: both the reference precompute and the policy call it.

If the two stages computed log π(y|x) differently, the implicit reward at step 0 would not be
zero. So there is exactly one function, and it is exact: fp32 log-softmax, explicit shift,
explicit response mask.

Memory: only the hidden states at response positions reach the LM head (prompt and padding
logits are never computed), and those N tokens go through the head `chunk_size` at a time, so
at most a [chunk_size, V] block of logits exists at once, never [N, V] or [2B, T, V]:

- a frozen plain linear head (the LoRA case: peft never trains the LM head unless asked)
  takes the fused path, `_FrozenHeadLogps`: each chunk's forward also computes the exact
  gradient of its log-probs with respect to the hidden states ([C, H], a few bytes per token)
  and then frees the logits, so backward needs no recompute and the head gets no weight
  gradient. Two matmuls per chunk instead of the three that checkpointing takes;
- any other head (a trainable or adapter-wrapped one) takes the checkpointed path: each
  chunk's logits are recomputed in backward (activation checkpointing per chunk).

Both paths compute the values with the same operations and are tested against the plain
full-logits oracle, values and gradients; the fused path's head matmul also returns its logits
in fp32 where a kernel does (`fp32_linear`), rather than rounded to a bf16 model's dtype.

A bf16 model's decoder runs under bf16 autocast (`decoder_autocast`), the head and the
log-softmax after it in fp32. Nothing here reads a device value on the host: the batch brings
its index tensors (lora_dpo.batching), so a micro-batch never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_dpo.attention import base_model, packed_decoder_inputs
from lora_dpo.batching import PackedPairBatch, PairBatch
from lora_dpo.config import TrainConfig

log = logging.getLogger(__name__)

# Response tokens per LM-head chunk, train.logits_chunk_size's default. At a 128,256 vocabulary
# one chunk of fp32 logits is 263 MB; the fused path holds about one such block at a time (two
# with soft-capping).
DEFAULT_LOGITS_CHUNK_SIZE = TrainConfig.logits_chunk_size


@dataclass
class SequenceLogps:
    """Summed response log-probs of a stacked batch: chosen rows first, then rejected."""

    logps: torch.Tensor  # [2B] fp32, sum over response tokens of log π(token | prefix)
    tokens: torch.Tensor  # [2B] number of response tokens
    # [2B] fp32, the sum over each response's first min(|yw|, |yl|) tokens (its pair's shared
    # length; LD-DPO), when asked for
    shared_logps: torch.Tensor | None = None
    # [2B] fp32, Σ over response tokens of log Σ_v π(v | prefix)², no gradient (WPO), when asked for
    log_sum_sq_probs: torch.Tensor | None = None

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


@dataclass
class LogitHead:
    """The LM head with the touches some models add after it (Cohere's logit scale, Gemma 2's
    final soft-capping). Calling it maps hidden states [.., H] to fp32 logits [.., V]: the
    linear map runs in the model's dtype, the touches in fp32."""

    module: torch.nn.Module  # the output embedding, possibly wrapped by peft
    scale: float | None  # logits *= scale
    softcap: float | None  # logits = softcap * tanh(logits / softcap)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @property
    def frozen_linear(self) -> bool:
        """A plain, frozen `nn.Linear` (not a peft or bitsandbytes subclass): the fused path."""
        return type(self.module) is torch.nn.Linear and not any(
            p.requires_grad for p in self.module.parameters()
        )


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, LogitHead]:
    """(decoder, head) of a causal LM, through a peft wrapper if there is one.

    `head` maps hidden states to the logits the model itself would return, including the
    non-linear touches some heads have (Gemma 2's final soft-capping, Cohere's logit scale).
    Anything else unusual is refused rather than silently mis-computed.
    """
    base = base_model(model)
    config = base.config.get_text_config()
    for attribute in (
        "output_multiplier_scale",
        "logits_scaling",
        "mup_width_multiplier",
        "lm_head_multiplier",
    ):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} rescales its logits ({attribute}); not supported yet"
            )
    head = LogitHead(
        module=base.get_output_embeddings(),
        scale=getattr(config, "logit_scale", None),
        softcap=getattr(config, "final_logit_softcapping", None),
    )
    return base.get_decoder(), head


def sequence_logps(
    model: torch.nn.Module,
    batch: PairBatch | PackedPairBatch,
    chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    *,
    shared_prefix: bool = False,
    log_sum_sq_probs: bool = False,
) -> SequenceLogps:
    """Per-sequence sums of response-token log-probs of a batch of B pairs.

    `batch` is a right-padded [2B, T] PairBatch, or a PackedPairBatch (prompt + chosen +
    rejected per pair, the prompt forwarded once; lora_dpo.attention keeps the pairs apart).
    Either way the batch names the N response tokens: which hidden state predicts each
    (position t predicts token t+1, hence the shift), its target id and its sequence (chosen
    0..B-1, rejected B..2B-1).

    `shared_prefix` adds `shared_logps`, `log_sum_sq_probs` the statistic of the same name;
    both come from the same forward and the same log-probs.
    """
    decoder, head = causal_lm_parts(model)
    device = batch.input_ids.device
    if isinstance(batch, PackedPairBatch):
        inputs = packed_decoder_inputs(model, batch)
    else:
        assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape, (
            "batch shapes differ"
        )
        # (transformers' sdpa mask reads on the host whether this mask has padding: one sync
        # per forward, the padded layout's only one; eager attention and packed rows have none)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with decoder_autocast(model, device):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # [R, T, H]
    predictors, targets, sequence_of = batch.response_tokens()  # [N] each
    response_hidden = hidden.reshape(-1, hidden.shape[-1])[predictors]  # [N, H]
    token_sq = torch.empty(len(targets), dtype=torch.float32, device=device) if log_sum_sq_probs else None
    token_logps = response_token_logps(head, response_hidden, targets, chunk_size, token_sq)  # [N] fp32
    sequences = 2 * batch.num_pairs
    zeros = torch.zeros(sequences, dtype=torch.float32, device=device)
    assert batch.tokens is not None  # counted when the batch was made
    out = SequenceLogps(logps=zeros.index_add(0, sequence_of, token_logps), tokens=batch.tokens)
    if shared_prefix:
        out.shared_logps = prefix_sums(token_logps, sequence_of, shared_lengths(out.tokens))
    if token_sq is not None:
        out.log_sum_sq_probs = zeros.index_add(0, sequence_of, token_sq)
    return out


def decoder_autocast(model: torch.nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the decoder of a bf16 model, nothing otherwise.

    peft keeps LoRA weights in fp32 (master weights) and, without autocast, casts each LoRA
    input up to fp32, so backward keeps an fp32 copy of the input of every adapted layer
    (about 195 KB per token per recomputed layer at 8B instead of 117 KB). Under autocast the
    LoRA matmuls take bf16 casts of their input and weights, and the weights' gradients are
    still fp32. Training, eval and the reference precompute all score through here, so the
    reference is computed on the same numeric path as the policy: with LoRA B = 0 the
    untrained policy's values equal the reference's bit for bit.
    """
    dtype = base_model(model).get_input_embeddings().weight.dtype
    if dtype != torch.bfloat16 or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def shared_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """[2B] response token counts (chosen first) -> [2B] min(|yw|, |yl|) of each row's pair."""
    shared = torch.minimum(*tokens.chunk(2))  # [B]
    return torch.cat([shared, shared])


def prefix_sums(values: torch.Tensor, sequence_of: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of its first lengths[s] values: values [N] and sequence_of [N]
    list each sequence's tokens in order (interleaved with other sequences' or not), lengths
    [S]; -> [S]."""
    order = torch.sort(sequence_of, stable=True).indices  # [N] tokens grouped by sequence, in order
    # [S], counted with index_add: bincount sizes its output from the data (a host sync on a GPU)
    counts = torch.zeros_like(lengths).index_add_(0, sequence_of, torch.ones_like(sequence_of))
    starts = torch.cumsum(counts, 0) - counts  # [S] where each sequence's group begins
    position = torch.empty_like(sequence_of)
    position[order] = (
        torch.arange(len(sequence_of), device=sequence_of.device) - starts[sequence_of[order]]
    )  # [N]
    kept = position < lengths[sequence_of]  # [N]; position 0 is a sequence's first token
    sums = torch.zeros(len(lengths), dtype=values.dtype, device=values.device)
    return sums.index_add(0, sequence_of, values * kept)


def response_token_logps(
    head: LogitHead,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_LOGITS_CHUNK_SIZE,
    log_sum_sq_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(head(hidden))[target] per token, fp32 [N], chunk_size tokens at a time.

    `log_sum_sq_out` ([N] fp32), when given, is filled with log Σ_v softmax(head(hidden))_v²
    per token, without a gradient, while each chunk's logits exist (no second pass)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    assert hidden.ndim == 2 and targets.shape == hidden.shape[:1], "expected hidden [N, H], targets [N]"
    if head.frozen_linear:
        # (forward runs with grad mode off, so whether a gradient is wanted is decided here)
        wants_grad = torch.is_grad_enabled() and hidden.requires_grad
        logps, log_sum_sq = _FrozenHeadLogps.apply(
            hidden, targets, head, chunk_size, wants_grad, log_sum_sq_out is not None
        )
        if log_sum_sq_out is not None:
            log_sum_sq_out.copy_(log_sum_sq)
        return logps
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.module.parameters())
    )
    pieces = []
    for start in range(0, len(hidden), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]  # [C, H], [C]
        if needs_grad:  # keep only h and t; the [C, V] logits are recomputed in backward
            logps, log_sum_sq = checkpoint(_chunk_logps, head, h, t, use_reentrant=False)
        else:
            logps, log_sum_sq = _chunk_logps(head, h, t)
        pieces.append(logps)
        if log_sum_sq_out is not None:
            log_sum_sq_out[start : start + len(h)] = log_sum_sq.detach()
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(
    head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logps, exps, totals = _log_softmax_at(head(hidden), targets, inplace=False)
    return logps, _log_sum_sq(exps, totals)  # [C], [C]


def _log_sum_sq(exps: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """log Σ_v p_v² [C] from exps = exp(logits - max) [C, V] and totals = Σ_v exps [C]:
    p = exps / totals, so Σ p² = ‖exps‖² / totals² (the norm is >= 1: the max entry is e^0)."""
    return 2 * (torch.linalg.vector_norm(exps, dim=-1).log() - totals.log())


def _log_softmax_at(
    logits: torch.Tensor, targets: torch.Tensor, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log softmax(logits)[target] [C], exp(logits - max) [C, V] and its row sums [C].

    `inplace` reuses the logits' memory (one [C, V] buffer instead of three); the out-of-place
    variant is for autograd. Both run the same operations, so they give the same bits.
    """
    maxes = logits.amax(dim=-1, keepdim=True)  # [C, 1]
    shifted = logits.sub_(maxes) if inplace else logits - maxes
    target = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [C]
    exps = shifted.exp_() if inplace else shifted.exp()
    totals = exps.sum(dim=-1)  # [C]
    return target - totals.log(), exps, totals


class _FrozenHeadLogps(torch.autograd.Function):
    """Chunked log-probs through a frozen linear head, with the gradient folded into forward.

    For one token, with z = scale·(W h + b), l = softcap·tanh(z / softcap) and p = softmax(l):
        d log p[y] / d l = onehot(y) - p
        d log p[y] / d h = ((onehot(y) - p) · (1 - tanh²(z / softcap)) · scale) W
    Forward computes this [H] vector per token while the chunk's logits exist, then frees
    them; backward only scales it by the incoming gradient. Exact, no recompute, no [N, V].
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        head: LogitHead,
        chunk_size: int,
        wants_grad: bool,
        wants_log_sum_sq: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        linear = head.module
        assert isinstance(linear, torch.nn.Linear)  # frozen_linear chose this path
        weight, bias = linear.weight, linear.bias  # [V, H], [V] or None
        logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)  # [N]
        # [N] log Σ_v p_v² when asked for (WPO), else empty; never differentiated
        log_sum_sq = torch.empty(
            len(hidden) if wants_log_sum_sq else 0, dtype=torch.float32, device=hidden.device
        )
        ctx.mark_non_differentiable(log_sum_sq)
        grads = torch.empty_like(hidden) if wants_grad else None  # [N, H]
        linear_fp32 = fp32_linear(weight, bias)
        for start in range(0, len(hidden), chunk_size):
            h = hidden[start : start + chunk_size]  # [C, H]
            t = targets[start : start + chunk_size]  # [C]
            # [C, V]: the same operations as LogitHead, in place where they can be
            logits = linear_fp32(h)
            if head.scale is not None:
                logits.mul_(head.scale)
            tanh = None
            if head.softcap:  # a second [C, V] buffer: backward needs tanh
                tanh = logits.div_(head.softcap).tanh_()
                logits = tanh * head.softcap
            logps[start : start + len(h)], exps, totals = _log_softmax_at(logits, t, inplace=True)
            del logits  # exps is the same memory; dropped below before the next chunk's is made
            if wants_log_sum_sq:
                log_sum_sq[start : start + len(h)] = _log_sum_sq(exps, totals)
            if not wants_grad:
                del exps, tanh
                continue
            # In place, exps becomes d log p[y] / d z: onehot - p, through the cap and the scale.
            grad_logits = exps.div_(totals.unsqueeze(-1)).neg_()
            grad_logits.scatter_add_(
                -1, t.unsqueeze(-1), torch.ones_like(t, dtype=grad_logits.dtype).unsqueeze(-1)
            )
            if tanh is not None:
                grad_logits.mul_(tanh.square_().neg_().add_(1.0))
            if head.scale is not None:
                grad_logits.mul_(head.scale)
            assert grads is not None
            grads[start : start + len(h)] = grad_logits.to(weight.dtype) @ weight  # [C, H]
            del exps, grad_logits, tanh  # one chunk of logits at a time, not two
        if wants_grad:
            ctx.save_for_backward(grads)
        return logps, log_sum_sq

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_logps: torch.Tensor, _: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # [N]
        (grads,) = ctx.saved_tensors
        grad_hidden = (grads * grad_logps.unsqueeze(-1)).to(grads.dtype)  # [N, H]
        return grad_hidden, None, None, None, None, None


def fp32_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """h [C, H] -> h @ weight.T + bias [C, V] in fp32, for the fused head (no autograd).

    A bf16 matmul accumulates in fp32 but rounds its output to bf16: logits of magnitude 20
    move by up to 0.06 before the fp32 log-softmax. Instead, where torch has the kernel (CUDA,
    `torch.mm(..., out_dtype=torch.float32)`), the fp32 accumulator is the output; on the CPU
    the weight is upcast a block of rows at a time (exact; a block is no bigger than the
    hidden states' fp32 copy or 256 rows); elsewhere the rounded path stays, with a notice.
    """
    if weight.dtype == torch.float32:
        return lambda h: F.linear(h, weight, bias)
    if has_fp32_output_mm(weight.device.type, weight.dtype):

        def linear(h: torch.Tensor) -> torch.Tensor:
            logits = torch.mm(h, weight.t(), out_dtype=torch.float32)  # [C, V]
            return logits if bias is None else logits.add_(bias)

        return linear
    if weight.device.type == "cpu":

        def upcast_linear(h: torch.Tensor) -> torch.Tensor:
            h_fp32 = h.float()  # [C, H]
            logits = torch.empty(len(h), len(weight), dtype=torch.float32, device=h.device)  # [C, V]
            rows = max(len(h), 256)
            for start in range(0, len(weight), rows):
                block = weight[start : start + rows].float()  # [rows, H]
                torch.mm(h_fp32, block.t(), out=logits[:, start : start + len(block)])
            return logits if bias is None else logits.add_(bias)

        return upcast_linear
    return lambda h: F.linear(h, weight, bias).float()


@functools.cache
def has_fp32_output_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch.mm(a, b, out_dtype=torch.float32)` runs for `dtype` inputs on this device
    type (documented for CUDA with fp16/bf16 inputs); tried once on 1x1 matrices."""
    one = torch.ones(1, 1, dtype=dtype, device=device_type)
    try:
        torch.mm(one, one, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):
        if device_type != "cpu":
            log.warning(
                "torch %s has no %s matmul with an fp32 output on %s: the LM head's logits are "
                "rounded to %s before the fp32 log-softmax",
                torch.__version__,
                dtype,
                device_type,
                dtype,
            )
        return False
    return True
