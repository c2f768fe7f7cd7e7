"""Text pairs to token ids.

Tokenization rules (each one guards against a known bug):
- prompt ids are what the model sees at inference: plain text gets the tokenizer's own
  special prefix (BOS), chat data is the template with the generation prompt; one BOS at most;
- response ids continue the prompt (prompt and response are tokenized together), decode back
  to the response text and end with EOS (or the template's end-of-turn) exactly once;
- over-long pairs: the prompt is cut from the left (BOS kept), then responses from the right.
Pad ids are never used here: sequence lengths say where the real tokens are.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from lora_dpo.config import DataConfig
from lora_dpo.data.formats import CompletionText, TextPair
from lora_dpo.data.report import EMPTY_PROMPT, EMPTY_RESPONSE, NOTHING_LEFT, Drop
from lora_dpo.errors import DataError

# Bump when a rule below changes the ids: it is part of the reference cache identity.
TOKENIZATION_VERSION = 1
TRUNCATION_POLICY = "prompt_left_keep_bos_then_responses_right"
EOS_POLICY = "append_eos_unless_response_ends_with_eos_or_template_end_of_turn"
TOKENIZE_CHUNK = 1024  # texts per batched tokenizer call


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source_index: int

    HASH_DOMAIN: ClassVar[bytes] = b"lora-dpo/pair/v1"

    @property
    def pair_hash(self) -> bytes:
        """sha256 of the final ids; each sequence is length-prefixed so boundaries can't shift."""
        digest = hashlib.sha256(self.HASH_DOMAIN)
        for ids in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            digest.update(struct.pack("<q", len(ids)))
            digest.update(struct.pack(f"<{len(ids)}q", *ids))
        return digest.digest()


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids add_special_tokens=True puts before the text (BOS for Llama-like tokenizers).

    Only the prefix is taken: a tokenizer configured to append EOS would otherwise end every
    prompt with EOS; EOS is placed by the response rule instead.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return list(special[:start])
    return []


def _collapse_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """One leading BOS at most: the text or template may carry its own BOS string."""
    start = 0
    while bos_id is not None and start + 1 < len(ids) and ids[start] == ids[start + 1] == bos_id:
        start += 1
    return ids[start:]


def _encode(tokenizer: Any, texts: list[str], prefix: list[int]) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [_collapse_bos(prefix + list(ids), tokenizer.bos_token_id) for ids in encoded]


def _response_ids(tokenizer: Any, prompt_ids: list[int], joint_ids: list[int], text: str) -> list[int]:
    # Tokenized together, the response gets the pieces it has after the prompt (e.g.
    # SentencePiece's leading "▁"); alone only when the boundary merged across.
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        return joint_ids[len(prompt_ids) :]
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _with_eos(ids: list[int], eos_id: int, closed: bool) -> list[int]:
    """End with EOS exactly once; a turn the chat template already closed is left as is."""
    if closed or (ids and ids[-1] == eos_id):
        return ids
    return ids + [eos_id]


def _cut_left(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if bos_id is not None and ids and ids[0] == bos_id:
        keep = max(limit - 1, 0)
        return [bos_id] + (ids[len(ids) - keep :] if keep else [])
    return ids[len(ids) - limit :] if limit > 0 else []


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], cfg: DataConfig, bos_id: int | None
) -> tuple[list[int], list[int], list[int], bool]:
    """Fit prompt + longest response into max_length: prompt from the left, then responses."""
    if len(prompt) + max(len(chosen), len(rejected)) <= cfg.max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > cfg.max_prompt_length:
        prompt = _cut_left(prompt, cfg.max_prompt_length, bos_id)
    room = max(cfg.max_length - len(prompt), 0)
    return prompt, chosen[:room], rejected[:room], True


def tokenize_chunk(
    tokenizer: Any, texts: list[TextPair], chat: bool
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids per text pair; EOS and truncation not yet applied."""
    # Chat templates write their own BOS, like apply_chat_template(tokenize=True) at inference.
    prefix = [] if chat else special_prefix(tokenizer)
    prompts = _encode(tokenizer, [t.prompt for t in texts], prefix)
    joint_chosen = _encode(tokenizer, [t.prompt + t.chosen for t in texts], prefix)
    joint_rejected = _encode(tokenizer, [t.prompt + t.rejected for t in texts], prefix)
    return [
        (
            p,
            _response_ids(tokenizer, p, jc, t.chosen),
            _response_ids(tokenizer, p, jr, t.rejected),
        )
        for t, p, jc, jr in zip(texts, prompts, joint_chosen, joint_rejected)
    ]


def finish_pair(
    index: int,
    text: TextPair,
    ids: tuple[list[int], list[int], list[int]],
    tokenizer: Any,
    cfg: DataConfig,
) -> tuple[TokenizedPair, bool]:
    """EOS, truncation and the last checks; raises Drop for a pair that cannot be kept."""
    prompt, chosen, rejected = ids
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise Drop(EMPTY_RESPONSE, f"the {name} response has no tokens")
    chosen = _with_eos(chosen, tokenizer.eos_token_id, text.chosen_closed)
    rejected = _with_eos(rejected, tokenizer.eos_token_id, text.rejected_closed)
    full_prompt = len(prompt)
    prompt, chosen, rejected, cut = truncate(prompt, chosen, rejected, cfg, tokenizer.bos_token_id)
    if not chosen or not rejected:
        raise Drop(
            NOTHING_LEFT,
            f"no response token fits: the prompt ({full_prompt} tokens, cut to {len(prompt)}) "
            f"fills data.max_length={cfg.max_length}",
        )
    if not prompt:
        # The first response token is scored from the token before it: there must be one.
        raise Drop(EMPTY_PROMPT, "the prompt has no tokens (and the tokenizer adds no BOS)")
    return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), index), cut


def tokenize_completions(
    tokenizer: Any, texts: list[CompletionText], chat: bool
) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) ids per unpaired text, by the rules of `tokenize_chunk`."""
    prefix = [] if chat else special_prefix(tokenizer)
    prompts = _encode(tokenizer, [t.prompt for t in texts], prefix)
    joint = _encode(tokenizer, [t.prompt + t.completion for t in texts], prefix)
    return [(p, _response_ids(tokenizer, p, j, t.completion)) for t, p, j in zip(texts, prompts, joint)]


def finish_completion(
    text: CompletionText, ids: tuple[list[int], list[int]], tokenizer: Any, cfg: DataConfig
) -> tuple[list[int], list[int], bool]:
    """(prompt, completion, whether cut): EOS, truncation and the checks of `finish_pair` for
    an unpaired row alone; raises Drop for a row that cannot be kept."""
    prompt, completion = ids
    if not completion:
        raise Drop(EMPTY_RESPONSE, "the completion has no tokens")
    completion = _with_eos(completion, tokenizer.eos_token_id, text.closed)
    full_prompt = len(prompt)
    prompt, completion, _, cut = truncate(prompt, completion, completion, cfg, tokenizer.bos_token_id)
    if not completion:
        raise Drop(
            NOTHING_LEFT,
            f"no completion token fits: the prompt ({full_prompt} tokens, cut to {len(prompt)}) "
            f"fills data.max_length={cfg.max_length}",
        )
    if not prompt:
        raise Drop(EMPTY_PROMPT, "the prompt has no tokens (and the tokenizer adds no BOS)")
    return prompt, completion, cut


def require_eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token: responses must end with one "
            "(set tokenizer.eos_token, e.g. in tokenizer_config.json)"
        )
    return tokenizer.eos_token_id


def tokenization_settings(tokenizer: Any, cfg: DataConfig) -> dict:
    """Everything that changes the token ids, for the reference cache identity.

    The pad id is not part of it: masks come from lengths, so padding never changes a value.
    """
    template = getattr(tokenizer, "chat_template", None)
    prefix = special_prefix(tokenizer)
    return {
        "version": TOKENIZATION_VERSION,
        "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length,
        "truncation": TRUNCATION_POLICY,
        "eos_policy": EOS_POLICY,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "special_prefix_ids": prefix,
        "adds_bos": tokenizer.bos_token_id is not None and tokenizer.bos_token_id in prefix,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "chat_template_sha256": _sha256(json.dumps(template, sort_keys=True)) if template else None,
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary, merges, added tokens and pipeline, in canonical JSON."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        canonical = json.dumps(json.loads(backend.to_str()), sort_keys=True)
    else:
        canonical = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256(canonical)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
