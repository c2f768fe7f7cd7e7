"""How a packed batch attends: each pair sees only itself, each response the prompt and itself.

A PackedPairBatch (lora_dpo.batching) holds pairs as prompt + chosen + rejected, several to a
row (packed) or one per row (prompt_shared). Its attention follows one rule, `batching.visible`,
computed in one of three exact ways, by the model's attention implementation:

- flex (`flex_attention`): FlexAttention with a BlockMask from a mask_mod over per-token ids
  (pair, part, position). The kernel skips the blocks no query sees, so a long row costs what
  its pairs cost, and no [L, L] mask exists. CUDA only: torch has no FlexAttention backward on
  the CPU. Written to the documented use of torch and transformers; not run on a GPU here.
- pairwise (`PAIRWISE`, registered in transformers' AttentionInterface): the model's own eager
  or sdpa attention, called twice per pair on that pair's slices of the row: prompt + chosen,
  plain causal (sdpa: no mask, so the flash kernel skips the blocks above the diagonal; a mask
  where a sliding window cuts it, or for eager), then rejected over prompt + rejected with a
  mask of that size. The chosen x rejected block is never computed. Exact on any device;
  never a mask over the whole row.
- dense (a model left on eager or sdpa): one additive [R, 1, L, L] mask per row, the
  transformers way of passing a custom mask; the reference the other two are tested against.

`prepare_packed_attention` switches a model to flex where it can train, to pairwise otherwise.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lora_dpo.batching import PackedPairBatch, TokenIds, visible
from lora_dpo.errors import ConfigError

# Architectures whose attention code packing is tested against (custom masks, explicit
# position ids, sliding windows); others are refused rather than trusted.
PACKING_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2")
FLEX = "flex_attention"
# The implementation a model is switched to -> the one it runs per pair.
PAIRWISE = {"lora_dpo_pairwise_eager": "eager", "lora_dpo_pairwise_sdpa": "sdpa"}
PACKED_IMPLEMENTATIONS = ("eager", "sdpa", FLEX, *PAIRWISE)


@dataclass(frozen=True)
class PackedAttention:
    backend: str  # "flex" or "pairwise"
    notice: str | None  # why not flex, when it is not


def text_config(model: torch.nn.Module) -> Any:
    return base_model(model).config.get_text_config()


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base_model: Any = getattr(model, "get_base_model", None)
    base: Any = get_base_model() if get_base_model is not None else model
    return base


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why pairs cannot share a row in this model, or None if they can."""
    config = text_config(model)
    if config.model_type not in PACKING_ARCHITECTURES:
        return (
            f"not supported for model type {config.model_type!r} (tested: {', '.join(PACKING_ARCHITECTURES)})"
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in PACKED_IMPLEMENTATIONS:
        return f"needs eager, sdpa or flex_attention attention; this model uses {implementation!r}"
    if set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(set(config.layer_types))} are not supported"
    return None


def check_packing_support(model: torch.nn.Module, setting: str = "train.layout=packed") -> Any:
    """The text config, if packing is tested for this model; otherwise a one-line error."""
    problem = packing_problem(model)
    if problem is not None:
        raise ConfigError(f"{setting}: {problem}; use train.layout=padded")
    return text_config(model)


def flex_problem(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why FlexAttention cannot train this model here, or None if it can."""
    if device.type != "cuda":
        return "FlexAttention has no backward pass on the CPU"
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    if not getattr(base_model(model), "_supports_flex_attn", False):
        return f"{type(base_model(model)).__name__} does not support flex_attention"
    if getattr(text_config(model), "attention_dropout", 0.0):
        return "FlexAttention in transformers takes no attention dropout"
    return None


def prepare_packed_attention(model: torch.nn.Module, device: torch.device) -> PackedAttention:
    """Switch the model's attention to a packed backend (for good: gradient checkpointing
    recomputes layers in backward, which must see the same implementation). Idempotent."""
    config = check_packing_support(model)
    implementation = config._attn_implementation or "eager"
    if implementation == FLEX:
        return PackedAttention("flex", None)
    if implementation in PAIRWISE:
        return PackedAttention("pairwise", flex_problem(model, device))
    problem = flex_problem(model, device)
    base = base_model(model)
    if problem is None:
        base.set_attn_implementation(FLEX)
        return PackedAttention("flex", None)
    base.set_attn_implementation(next(name for name, inner in PAIRWISE.items() if inner == implementation))
    return PackedAttention("pairwise", problem)


def restore_unpacked_attention(model: torch.nn.Module) -> None:
    """Undo a pairwise switch (a base reused for a padded run): back to the implementation it wraps."""
    implementation = text_config(model)._attn_implementation
    if implementation in PAIRWISE:
        base_model(model).set_attn_implementation(PAIRWISE[implementation])


def packed_decoder_inputs(model: torch.nn.Module, batch: PackedPairBatch) -> dict[str, Any]:
    """Decoder keyword arguments for a packed batch: ids, restarting position ids, and how
    attention keeps pairs and responses apart, for the model's implementation."""
    config = check_packing_support(model)
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    implementation = config._attn_implementation or "eager"
    if implementation in PAIRWISE:
        inputs["pair_masks"] = PairMasks(batch, model_dtype(model), PAIRWISE[implementation] == "eager")
        return inputs
    if implementation == FLEX:
        inputs["attention_mask"] = per_layer_type(config, lambda window: block_mask(batch, window))
        return inputs
    dtype = model_dtype(model)
    inputs["attention_mask"] = per_layer_type(
        config, lambda window: additive(batch.visibility(window), dtype)
    )
    return inputs


def per_layer_type(config: Any, mask_for: Any) -> Any:
    """One mask for the model, or one per layer type (full and sliding) where layers differ."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        masks = {"full_attention": mask_for(None)}
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = mask_for(window)
        return masks
    return mask_for(window)  # Mistral: every layer slides, if any does


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(p for p in base_model(model).parameters() if p.is_floating_point()).dtype


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, L, L] bool -> [R, 1, L, L] additive mask: 0 where seen, the dtype's min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def mask_mod(batch: PackedPairBatch, sliding_window: int | None) -> Any:
    """FlexAttention's mask_mod for `batch`: `visible` on the ids of one query and one key."""
    documents, segments, positions = batch.documents, batch.segments, batch.position_ids

    def mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        query = (documents[b, q], segments[b, q], positions[b, q])
        key = (documents[b, k], segments[b, k], positions[b, k])
        return visible(query, key, q, k, sliding_window)

    return mod


def block_mask(batch: PackedPairBatch, sliding_window: int | None) -> Any:
    """The BlockMask of `batch` (all heads alike), built without a dense [L, L] on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    return create_block_mask(
        mask_mod(batch, sliding_window),
        B=rows,
        H=None,
        Q_LEN=length,
        KV_LEN=length,
        device=device,
        _compile=device.type == "cuda",
    )


@dataclass(frozen=True)
class PairParts:
    """One pair of a packed row, attended in two calls: its head (prompt + chosen, queries and
    keys alike) and its tail (rejected queries over prompt + rejected keys). Masks are
    additive, [1, 1, q, k]; a head without one is plain causal."""

    row: int
    start: int  # the pair's first column in its row
    prompt: int  # tokens: prompt
    head: int  # prompt + chosen
    tail: int  # rejected
    head_mask: torch.Tensor | None
    tail_mask: torch.Tensor | None  # None when the pair has no rejected tokens


class PairMasks:
    """How each pair of a packed batch attends (`PairParts`), per sliding window the layers ask
    for (None: full); built once per batch, shared by every layer. The two calls cover exactly
    the pair's visible (query, key) entries and skip the chosen x rejected block the rule hides."""

    def __init__(self, batch: PackedPairBatch, dtype: torch.dtype, always_mask: bool = False):
        self.spans = batch.spans
        self._batch, self._dtype = batch, dtype
        self._always_mask = always_mask  # eager attention has no is_causal: every head gets a mask
        self._lengths = batch.heads  # (prompt, chosen) tokens per pair, from collate: no device read
        self._parts: dict[int | None, list[PairParts]] = {}

    def parts(self, sliding_window: int | None) -> list[PairParts]:
        if sliding_window not in self._parts:
            built = []
            for (row, start, end), (prompt, chosen) in zip(self.spans, self._lengths):
                head_end = start + prompt + chosen
                # head positions run 0..n-1: a window of n or more cuts nothing, causal it is
                causal = not self._always_mask and (
                    sliding_window is None or sliding_window >= head_end - start
                )
                head_mask = (
                    None
                    if causal
                    else self._mask(row, [(start, head_end)], [(start, head_end)], sliding_window)
                )
                tail_mask = None
                if end > head_end:
                    keys = [(start, start + prompt), (head_end, end)]
                    tail_mask = self._mask(row, [(head_end, end)], keys, sliding_window)
                built.append(
                    PairParts(row, start, prompt, prompt + chosen, end - head_end, head_mask, tail_mask)
                )
            self._parts[sliding_window] = built
        return self._parts[sliding_window]

    def _mask(
        self,
        row: int,
        queries: list[tuple[int, int]],
        keys: list[tuple[int, int]],
        sliding_window: int | None,
    ) -> torch.Tensor:
        """THE rule (`visible`) on the ids of these columns of `row`, as an additive mask."""
        batch, device = self._batch, self._batch.input_ids.device
        query_index, key_index = (
            torch.cat([torch.arange(a, b, device=device) for a, b in ranges]) for ranges in (queries, keys)
        )
        ids = (batch.documents[row], batch.segments[row], batch.position_ids[row])
        query: TokenIds = (ids[0][query_index, None], ids[1][query_index, None], ids[2][query_index, None])
        key: TokenIds = (ids[0][None, key_index], ids[1][None, key_index], ids[2][None, key_index])
        allowed = visible(query, key, query_index[:, None], key_index[None], sliding_window)  # [q, k]
        return additive(allowed.unsqueeze(0), self._dtype)


def pairwise_attention(inner_name: str) -> Any:
    """An attention function that runs `inner_name` (eager or sdpa) pair by pair, in the parts
    of `PairMasks`: nothing across pairs, no [L, L] mask, causal kernels where the rule is
    causal (the flash kernels then skip the blocks above the diagonal). Rows are cut with
    `unbind` and `split`, whose backward writes each gradient once (a slice's would allocate a
    row-sized zero tensor per pair)."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,  # [R, Hq, L, D]
        key: torch.Tensor,  # [R, Hkv, L, D]
        value: torch.Tensor,
        attention_mask: Any,
        pair_masks: PairMasks | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if pair_masks is None:
            raise RuntimeError(
                "this model's attention runs packed batches only (lora_dpo.attention.prepare_packed_attention)"
            )
        kwargs.pop("is_causal", None)
        inner = inner_attention(module, inner_name)
        rows, heads, length, head_dim = query.shape
        by_row: list[list[PairParts]] = [[] for _ in range(rows)]
        for part in pair_masks.parts(kwargs.get("sliding_window")):
            by_row[part.row].append(part)
        out_rows = []
        for row, q_row, k_row, v_row in zip(by_row, query.unbind(0), key.unbind(0), value.unbind(0)):
            sizes = [n for part in row for n in (part.head, part.tail)]
            assert [part.start for part in row] == [sum(sizes[: 2 * i]) for i in range(len(row))], (
                "pairs lie side by side from the row's start"
            )
            sizes.append(length - sum(sizes))  # padding after the last pair
            q_cuts, k_cuts, v_cuts = (t.split(sizes, 1) for t in (q_row, k_row, v_row))  # [H, n, D] each
            outs = []
            for i, part in enumerate(row):
                q, k, v = (cuts[2 * i].unsqueeze(0) for cuts in (q_cuts, k_cuts, v_cuts))  # the head
                if part.head_mask is None:
                    out, _ = inner(module, q, k, v, None, is_causal=True, **kwargs)
                else:
                    out, _ = inner(module, q, k, v, part.head_mask, **kwargs)
                outs.append(out)  # [1, n, Hq, D]
                if part.tail:
                    q = q_cuts[2 * i + 1].unsqueeze(0)
                    k, v = (
                        torch.cat([cuts[2 * i][:, : part.prompt], cuts[2 * i + 1]], 1).unsqueeze(0)
                        for cuts in (k_cuts, v_cuts)
                    )
                    out, _ = inner(module, q, k, v, part.tail_mask, **kwargs)
                    outs.append(out)
            if sizes[-1]:  # padding attends to nothing here: zeros
                outs.append(query.new_zeros(1, sizes[-1], heads, head_dim))
            out_rows.append(torch.cat(outs, 1))
        return torch.cat(out_rows), None  # [R, L, Hq, D]

    return attention


def inner_attention(module: torch.nn.Module, name: str) -> Any:
    """The attention function `module` runs under implementation `name`: transformers' sdpa,
    or the eager function of the module's own modeling file (Gemma 2's soft-caps its scores)."""
    if name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return importlib.import_module(type(module).__module__).eager_attention_forward


for _name, _inner in PAIRWISE.items():
    AttentionInterface.register(_name, pairwise_attention(_inner))
