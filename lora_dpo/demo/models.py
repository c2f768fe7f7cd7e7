"""Random tiny causal LMs built in code and saved like a real checkpoint (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Tiny configs of the architectures users bring most; same code path as the real ones.
ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2")


def tiny_config(
    arch: str, vocab_size: int, hidden_size: int = 32, num_layers: int = 2, **special_ids: int
) -> PretrainedConfig:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return AutoConfig.for_model(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **special_ids,
    )


def build_tiny_model(
    out_dir: str | Path,
    tokenizer,
    arch: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random `arch` model sized to `tokenizer`, saved with `save_pretrained` beside it."""
    config = tiny_config(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_llama(
    out_dir: str | Path, tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    return build_tiny_model(out_dir, tokenizer, "llama", hidden_size, num_layers, seed)


def build_last_token_reward_model(out_dir: str | Path, tokenizer, token_scores: torch.Tensor) -> Path:
    """A Llama reward model (one score, `num_labels=1`) whose score of a text is known exactly:
    `token_scores[last token]` (up to the final norm's epsilon), saved beside `tokenizer`.

    Every decoder weight is zero, so the residual stream at each position is that token's
    embedding; embeddings are one-hot, scaled so the final RMSNorm leaves them at unit RMS,
    and the score head reads each token's own score off its one-hot dimension."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    vocab = len(tokenizer)
    if token_scores.shape != (vocab,):
        raise ValueError(f"token_scores must be [{vocab}], got {list(token_scores.shape)}")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=512,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab) * vocab**0.5)
        model.score.weight.copy_(token_scores.float().reshape(1, vocab) / vocab**0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
