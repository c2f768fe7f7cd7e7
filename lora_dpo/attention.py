"""How a packed batch attends: each pair sees only itself, each response the prompt and itself.

A PackedPairBatch (lora_dpo.batching) holds pairs as prompt + chosen + rejected, several to a
row (packed) or one per row (prompt_shared). Its attention follows one rule, `batching.visible`,
computed in one of three exact ways, by the model's attention implementation:

- flex (`flex_attention`): FlexAttention with a BlockMask from a mask_mod over per-token ids
  (pair, part, position). The kernel skips the blocks no query sees, so a long row costs what
  its pairs cost, and no [L, L] mask exists. CUDA only: torch has no FlexAttention backward on
  the CPU. Written to the documented use of torch and transformers; not run on a GPU here.
- pairwise (`PAIRWISE`, registered in transformers' AttentionInterface): the model's own eager
  or sdpa attention, called once per pair on that pair's slice of the row with a dense mask of
  that pair's size. Exact on any device; never a mask over the whole row.
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

from lora_dpo.batching import PackedPairBatch, visible
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
        inputs["pair_masks"] = PairMasks(batch, model_dtype(model))
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


class PairMasks:
    """Each pair's span in the batch and its dense additive mask, [1, 1, n, n] for a pair of n
    tokens, per sliding window the layers ask for (None: full); built once per batch."""

    def __init__(self, batch: PackedPairBatch, dtype: torch.dtype):
        self.spans = batch.spans
        self._ids = [
            (
                batch.documents[row, start:end],
                batch.segments[row, start:end],
                batch.position_ids[row, start:end],
            )
            for row, start, end in batch.spans
        ]
        self._dtype = dtype
        self._masks: dict[int | None, list[torch.Tensor]] = {}

    def masks(self, sliding_window: int | None) -> list[torch.Tensor]:
        if sliding_window not in self._masks:
            built = []
            for documents, segments, positions in self._ids:
                index = torch.arange(len(documents), device=documents.device)
                query = (documents.unsqueeze(1), segments.unsqueeze(1), positions.unsqueeze(1))
                key = (documents.unsqueeze(0), segments.unsqueeze(0), positions.unsqueeze(0))
                allowed = visible(query, key, index.unsqueeze(1), index.unsqueeze(0), sliding_window)
                built.append(additive(allowed.unsqueeze(0), self._dtype))
            self._masks[sliding_window] = built
        return self._masks[sliding_window]


def pairwise_attention(inner_name: str) -> Any:
    """An attention function that runs `inner_name` (eager or sdpa) pair by pair."""

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
        inner = inner_attention(module, inner_name)
        rows, heads, length, head_dim = query.shape
        pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        filled = [0] * rows
        for (row, start, end), mask in zip(pair_masks.spans, pair_masks.masks(kwargs.get("sliding_window"))):
            assert start == filled[row], "pairs lie side by side in a row"
            out, _ = inner(
                module, *(t[row : row + 1, :, start:end] for t in (query, key, value)), mask, **kwargs
            )
            pieces[row].append(out[0])  # [n, Hq, D]
            filled[row] = end
        for row in range(rows):  # padding after the last pair: attends to nothing, outputs zeros
            if filled[row] < length:
                pieces[row].append(query.new_zeros(length - filled[row], heads, head_dim))
        return torch.stack([torch.cat(row) for row in pieces]), None  # [R, L, Hq, D]

    return attention


def inner_attention(module: torch.nn.Module, name: str) -> Any:
    """The attention function `module` runs under implementation `name`: transformers' sdpa,
    or the eager function of the module's own modeling file (Gemma 2's soft-caps its scores)."""
    if name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return importlib.import_module(type(module).__module__).eager_attention_forward


for _name, _inner in PAIRWISE.items():
    AttentionInterface.register(_name, pairwise_attention(_inner))
