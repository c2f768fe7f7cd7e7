"""Preference data: read rows from any source, normalise the three formats, tokenize, report.

Tokenization rules (each one guards against a known bug):
- prompt ids are what the model sees at inference: plain text gets the tokenizer's own
  special prefix (BOS), chat data is the template with the generation prompt; one BOS at most;
- response ids continue the prompt (prompt and response are tokenized together), decode back
  to the response text and end with EOS (or the template's end-of-turn) exactly once;
- over-long pairs: the prompt is cut from the left (BOS kept), then responses from the right;
- every dropped row is counted under a reason and its first indices are kept for the report.
Pad ids are never used here: sequence lengths say where the real tokens are.

Validation: a row that cannot become a pair (unreadable line, missing or mistyped field, empty
prompt or response, identical responses, ill-formed conversation, nothing left after
truncation) is dropped and counted by reason, with the line (JSON Lines, CSV) or row of the
first few and what is wrong with each; with `data.strict` the first one is a DataError instead.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_dpo.config import DataConfig
from lora_dpo.errors import DataError
from lora_dpo.sources import (
    INVALID_JSON,
    MALFORMED_ROW,
    NOT_AN_OBJECT,
    NOT_UTF8,
    ROW_TOO_LARGE,
    Unreadable,
    first_line,
    json_type,
    read_source,
)

FORMATS = ("explicit", "implicit", "conversational")
# HH-RLHF style transcripts: the prompt ends right after the last assistant marker.
ASSISTANT_MARKER = "\n\nAssistant:"
# Bump when a rule below changes the ids: it is part of the reference cache identity.
TOKENIZATION_VERSION = 1
TRUNCATION_POLICY = "prompt_left_keep_bos_then_responses_right"
EOS_POLICY = "append_eos_unless_response_ends_with_eos_or_template_end_of_turn"
TOKENIZE_CHUNK = 1024
EXAMPLES_PER_REASON = 5
# Roles a conversational row may use; chat templates know these three.
ROLES = ("system", "user", "assistant")

# Drop reasons, the report's keys (the reading layer adds invalid_json, not_utf8,
# not_an_object and malformed_row).
MISSING_FIELD = "missing_field"  # absent, null, or not of the type the format needs
EMPTY_RESPONSE = "empty_response"
EMPTY_PROMPT = "empty_prompt"
IDENTICAL_RESPONSES = "identical_responses"
DIALOGUES_DIFFER = "dialogues_differ_before_last_turn"
NO_FINAL_ASSISTANT_TURN = "no_final_assistant_turn"
BAD_ROLES = "bad_roles"
TEMPLATE_REJECTED = "chat_template_rejected"
NOTHING_LEFT = "nothing_left_after_truncation"
DROP_REASONS = (
    INVALID_JSON, NOT_UTF8, NOT_AN_OBJECT, MALFORMED_ROW, ROW_TOO_LARGE, MISSING_FIELD, EMPTY_PROMPT,
    EMPTY_RESPONSE, IDENTICAL_RESPONSES, DIALOGUES_DIFFER, BAD_ROLES, NO_FINAL_ASSISTANT_TURN,
    TEMPLATE_REJECTED, NOTHING_LEFT,
)


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source_index: int

    @property
    def pair_hash(self) -> bytes:
        """sha256 of the final ids; each sequence is length-prefixed so boundaries can't shift."""
        digest = hashlib.sha256(b"lora-dpo/pair/v1")
        for ids in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            digest.update(struct.pack("<q", len(ids)))
            digest.update(struct.pack(f"<{len(ids)}q", *ids))
        return digest.digest()


@dataclass
class DataReport:
    source: str
    format: str
    total: int
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    # The first rows dropped per reason (0-based, as `source_index`), and aligned with them:
    # the 1-based line each starts on (JSON Lines and CSV files only), and what is wrong.
    examples: dict[str, list[int]] = field(default_factory=dict)
    example_lines: dict[str, list[int]] = field(default_factory=dict)
    example_details: dict[str, list[str]] = field(default_factory=dict)

    def record_drop(self, reason: str, index: int, detail: str = "", line: int | None = None) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        first = self.examples.setdefault(reason, [])
        # Drops come from two passes (text, then tokens): keep the smallest indices.
        at = bisect.bisect(first, index)
        if at >= EXAMPLES_PER_REASON:
            return
        columns = [(first, index), (self.example_details.setdefault(reason, []), detail)]
        if line is not None:
            columns.append((self.example_lines.setdefault(reason, []), line))
        for values, value in columns:
            values.insert(at, value)
            del values[EXAMPLES_PER_REASON:]

    def first_problem(self) -> str:
        """Where the first dropped row is and what is wrong with it, for an error message."""
        if not self.examples:
            return ""
        reason = min(self.examples, key=lambda r: self.examples[r][0])
        return f"{self._where(reason, 0)}: {self.example_details[reason][0]}"

    def _where(self, reason: str, at: int) -> str:
        lines = self.example_lines.get(reason)
        return location(self.examples[reason][at], lines[at] if lines else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        n_dropped = sum(self.dropped.values())
        lines = [
            f"{self.source}: {self.format} format, {self.total} rows, "
            f"{self.kept} pairs kept, {n_dropped} dropped"
        ]
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            rows = ", ".join(str(i) for i in self.examples.get(reason, []))
            more = ", ..." if count > EXAMPLES_PER_REASON else ""
            lines.append(f"  dropped {count} {reason} (rows {rows}{more})")
            for at, detail in enumerate(self.example_details.get(reason, [])):
                lines.append(f"    {self._where(reason, at)}: {detail}")
        lines.append(f"  truncated to max_length: {self.truncated} kept pairs")
        if self.lengths:
            parts = [
                f"{name} {int(s['p50'])}/{int(s['p90'])}/{int(s['p99'])}/{int(s['max'])}"
                for name, s in self.lengths.items()
            ]
            lines.append("  tokens p50/p90/p99/max: " + ", ".join(parts))
        return "\n".join(lines)


def location(index: int, line: int | None) -> str:
    return f"line {line} (row {index})" if line is not None else f"row {index}"


class _Drop(Exception):
    """A row cannot become a pair; `reason` is the report key, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class _TextPair:
    prompt: str
    chosen: str
    rejected: str
    # True when the chat template already closed the response's turn (no EOS to append).
    chosen_closed: bool = False
    rejected_closed: bool = False


# ---------------------------------------------------------------------------------- loading


def load_rows(path: str, split: str = "train") -> list[dict]:
    """Rows of a local file, a `save_to_disk` directory, or a hub data set (see module doc).

    Every line or item must be a row: the first that is not is a DataError naming it.
    """
    source = read_source(path, split)
    for index, row in enumerate(source.rows):
        if isinstance(row, Unreadable):
            where = f"line {source.lines[index]}" if source.lines else f"item {index}"
            raise DataError(f"{os.path.expanduser(path)}: {where}: {row.detail}")
    return source.rows


# ------------------------------------------------------------------------- format detection


def detect_format(row: dict) -> str:
    """explicit / implicit / conversational from one row's keys and value types."""
    if not isinstance(row, dict):
        raise DataError(
            f"cannot detect the data format: rows are {type(row).__name__}, not objects"
        )
    if "prompt" in row and "chosen" in row and "rejected" in row:
        return "conversational" if isinstance(row["prompt"], list) else "explicit"
    if "chosen" in row and "rejected" in row:
        return "conversational" if isinstance(row["chosen"], list) else "implicit"
    raise DataError(
        f"cannot detect the data format from the first row's keys {sorted(map(str, row))}: "
        "expected prompt/chosen/rejected (explicit or conversational) or chosen/rejected "
        "(implicit); set data.format to say which"
    )


def _resolve_format(configured: str, rows: Sequence[Any]) -> str:
    """The configured format, or the one of the first row that has the keys of one.

    Rows before it that are unreadable or lack a field are dropped later, row by row; when
    no row has the keys of any format, the first row's keys are named in the error.
    """
    if configured in FORMATS:
        return configured
    if configured != "auto":
        raise DataError(f"data.format={configured!r}: must be auto, {', '.join(FORMATS)}")
    objects = [row for row in rows if isinstance(row, dict)]
    for row in objects:
        if "chosen" in row and "rejected" in row:
            return detect_format(row)
    return detect_format(objects[0]) if objects else "auto"


# ------------------------------------------------------------------- rows to text pairs


def _value(row: dict, key: str) -> Any:
    if key not in row:
        raise _Drop(MISSING_FIELD, f"field {key!r} is missing")
    if row[key] is None:  # parquet, CSV and hub rows give a missing value as null
        raise _Drop(MISSING_FIELD, f"field {key!r} is null")
    return row[key]


def _text_field(row: dict, key: str) -> str:
    value = _value(row, key)
    if not isinstance(value, str):
        raise _Drop(MISSING_FIELD, f"field {key!r} is {json_type(value)}, expected a string")
    return value


def _check_texts(prompt: str, chosen: str, rejected: str) -> None:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _Drop(EMPTY_RESPONSE, f"the {name} response is empty")
    if chosen == rejected:
        raise _Drop(IDENTICAL_RESPONSES, "chosen and rejected are the same text")
    if not prompt.strip():
        raise _Drop(EMPTY_PROMPT, "the prompt is empty")


def _check_encodable(text: _TextPair) -> None:
    """Tokenizers take UTF-8 only: undecodable bytes in the file (kept as lone surrogates by
    the reader) and JSON-escaped lone surrogates (`\\ud800`) cannot be tokenized."""
    for name in ("prompt", "chosen", "rejected"):
        try:
            getattr(text, name).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Drop(
                NOT_UTF8,
                f"the {name} text is not valid UTF-8 at character {exc.start} "
                "(bytes that are not UTF-8, or an escaped lone surrogate)",
            ) from None


def _explicit_texts(row: dict) -> _TextPair:
    prompt = _text_field(row, "prompt")
    chosen, rejected = _text_field(row, "chosen"), _text_field(row, "rejected")
    _check_texts(prompt, chosen, rejected)
    return _TextPair(prompt, chosen, rejected)


def _implicit_texts(row: dict) -> _TextPair:
    chosen_full, rejected_full = _text_field(row, "chosen"), _text_field(row, "rejected")
    prompt, chosen, rejected = split_implicit(chosen_full, rejected_full)
    _check_texts(prompt, chosen, rejected)
    return _TextPair(prompt, chosen, rejected)


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two transcripts sharing a prompt.

    With assistant markers, each prompt runs through its transcript's last marker and the two
    must match exactly. Without, the prompt is the longest common prefix, backed off to
    before its last whitespace run so that no word is split between prompt and response.
    """
    c_at, r_at = chosen.rfind(ASSISTANT_MARKER), rejected.rfind(ASSISTANT_MARKER)
    if c_at >= 0 or r_at >= 0:
        end = len(ASSISTANT_MARKER)
        if c_at < 0 or r_at < 0:
            which = "rejected" if r_at < 0 else "chosen"
            raise _Drop(DIALOGUES_DIFFER, f"only the {which} transcript lacks {ASSISTANT_MARKER!r}")
        if chosen[: c_at + end] != rejected[: r_at + end]:
            at = len(os.path.commonprefix([chosen[: c_at + end], rejected[: r_at + end]]))
            raise _Drop(
                DIALOGUES_DIFFER,
                f"the transcripts differ at character {at}, before the last {ASSISTANT_MARKER!r}",
            )
        return chosen[: c_at + end], chosen[c_at + end :], rejected[r_at + end :]
    common = os.path.commonprefix([chosen, rejected])
    tail = re.search(r"\s+\S*$", common)
    cut = tail.start() if tail else len(common)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _messages(row: dict, key: str) -> list[dict]:
    """The message list in `row[key]`: each an object with a known role and string content."""
    value = _value(row, key)
    if not isinstance(value, list):
        raise _Drop(MISSING_FIELD, f"field {key!r} is {json_type(value)}, expected a list of messages")
    if not value:
        reason = EMPTY_PROMPT if key == "prompt" else EMPTY_RESPONSE
        raise _Drop(reason, f"field {key!r} is an empty list of messages")
    for number, message in enumerate(value):
        where = f"message {number} of {key!r}"
        if not isinstance(message, dict):
            raise _Drop(MISSING_FIELD, f"{where} is {json_type(message)}, expected an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise _Drop(MISSING_FIELD, f"{where}: 'role' is {_missing_or_type(message, 'role')}")
        if role not in ROLES:
            raise _Drop(BAD_ROLES, f"{where} has role {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Drop(MISSING_FIELD, f"{where}: 'content' is {_missing_or_type(message, 'content')}")
    return value


def _missing_or_type(message: dict, key: str) -> str:
    if key not in message:
        return "missing"
    return f"{json_type(message[key])}, expected a string"


def _has_text(messages: list[dict]) -> bool:
    return any(m["content"].strip() for m in messages)


def _last_turn_is_assistant(key: str, messages: list[dict]) -> None:
    role = messages[-1]["role"]
    if role != "assistant":
        raise _Drop(
            NO_FINAL_ASSISTANT_TURN, f"the last message of {key!r} is from {role!r}, not the assistant"
        )


def _conversation_parts(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen response messages, rejected response messages)."""
    prompt = _messages(row, "prompt") if "prompt" in row else None
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    _last_turn_is_assistant("chosen", chosen)
    _last_turn_is_assistant("rejected", rejected)
    if prompt is not None:
        return prompt, chosen, rejected
    # Implicit conversational: full dialogues that differ only in the last assistant message.
    if chosen[:-1] != rejected[:-1]:
        raise _Drop(DIALOGUES_DIFFER, "the chosen and rejected dialogues differ before their last message")
    if not chosen[:-1]:
        raise _Drop(EMPTY_PROMPT, "the dialogues hold only the assistant's reply, no prompt")
    return chosen[:-1], chosen[-1:], rejected[-1:]


class _ChatRenderer:
    """Renders conversations with the tokenizer's chat template and splits prompt/response."""

    SENTINEL = "SENTINEL-RESPONSE-7f3a"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "conversational data needs a chat template, and the tokenizer has none "
                "(set tokenizer.chat_template, or give the data as explicit text)"
            )
        self.tokenizer = tokenizer
        self.end_of_turn: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # jinja raises its own types, templates raise anything
            # Templates reject rows they cannot render (e.g. roles that do not alternate):
            # that costs the row, not the run.
            raise _Drop(TEMPLATE_REJECTED, f"the chat template rejected it: {first_line(exc)}") from None
        if not isinstance(text, str):
            raise DataError("the chat template did not render to text")
        return text

    def learn_end_of_turn(self, prompt_messages: list[dict]) -> str:
        """What the template writes after an assistant message's content (e.g. `</s>\\n`)."""
        if self.end_of_turn is None:
            probe = prompt_messages + [{"role": "assistant", "content": self.SENTINEL}]
            text = self.render(probe, add_generation_prompt=False)
            at = text.rfind(self.SENTINEL)
            self.end_of_turn = text[at + len(self.SENTINEL) :] if at >= 0 else ""
        return self.end_of_turn

    def response(self, prompt_text: str, prompt: list[dict], reply: list[dict]) -> tuple[str, bool]:
        """(response text, whether the template closed the turn) for `reply` after `prompt`."""
        full = self.render(prompt + reply, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError(
                "the chat template renders the prompt with add_generation_prompt=True "
                "differently from the start of the full conversation, so the response "
                "cannot be separated from the prompt; fix the template's generation prompt"
            )
        text = full[len(prompt_text) :]
        end = self.learn_end_of_turn(prompt)
        closed = bool(end.strip()) and text.endswith(end)
        if closed:
            # Keep the end-of-turn token, drop what follows it (e.g. the newline after
            # `<|im_end|>`): generation stops at the end-of-turn, so it is never produced.
            text = text[: len(text) - len(end)] + end.rstrip()
        return text, closed

    def texts(self, row: dict) -> _TextPair:
        prompt, chosen, rejected = _conversation_parts(row)
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if not _has_text(reply):
                raise _Drop(EMPTY_RESPONSE, f"the {name} response is empty")
        if chosen == rejected:
            raise _Drop(IDENTICAL_RESPONSES, "chosen and rejected are the same messages")
        if not _has_text(prompt):
            raise _Drop(EMPTY_PROMPT, "the prompt messages are empty")
        prompt_text = self.render(prompt, add_generation_prompt=True)
        chosen_text, chosen_closed = self.response(prompt_text, prompt, chosen)
        rejected_text, rejected_closed = self.response(prompt_text, prompt, rejected)
        return _TextPair(prompt_text, chosen_text, rejected_text, chosen_closed, rejected_closed)


def _normaliser(fmt: str, tokenizer: Any) -> Callable[[dict], _TextPair]:
    if fmt == "explicit":
        return _explicit_texts
    if fmt == "implicit":
        return _implicit_texts
    return _ChatRenderer(tokenizer).texts


# ---------------------------------------------------------------------------- tokenization


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


def _response_ids(
    tokenizer: Any, prompt_ids: list[int], joint_ids: list[int], text: str
) -> list[int]:
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


def _tokenize_chunk(
    tokenizer: Any, texts: list[_TextPair], chat: bool
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


def _finish_pair(
    index: int,
    text: _TextPair,
    ids: tuple[list[int], list[int], list[int]],
    tokenizer: Any,
    cfg: DataConfig,
) -> tuple[TokenizedPair, bool]:
    """EOS, truncation and the last checks; raises _Drop for a pair that cannot be kept."""
    prompt, chosen, rejected = ids
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise _Drop(EMPTY_RESPONSE, f"the {name} response has no tokens")
    chosen = _with_eos(chosen, tokenizer.eos_token_id, text.chosen_closed)
    rejected = _with_eos(rejected, tokenizer.eos_token_id, text.rejected_closed)
    full_prompt = len(prompt)
    prompt, chosen, rejected, cut = truncate(prompt, chosen, rejected, cfg, tokenizer.bos_token_id)
    if not chosen or not rejected:
        raise _Drop(
            NOTHING_LEFT,
            f"no response token fits: the prompt ({full_prompt} tokens, cut to {len(prompt)}) "
            f"fills data.max_length={cfg.max_length}",
        )
    if not prompt:
        # The first response token is scored from the token before it: there must be one.
        raise _Drop(EMPTY_PROMPT, "the prompt has no tokens (and the tokenizer adds no BOS)")
    return TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), index), cut


def _require_eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no EOS token: responses must end with one "
            "(set tokenizer.eos_token, e.g. in tokenizer_config.json)"
        )
    return tokenizer.eos_token_id


# --------------------------------------------------------------------------------- public


def build_pairs(
    rows: Sequence[Any],
    tokenizer: Any,
    cfg: DataConfig,
    source: str,
    *,
    lines: Sequence[int] | None = None,
) -> tuple[list[TokenizedPair], DataReport]:
    """Validate, normalise, tokenize and fit each row.

    A row that cannot become a pair is counted in the report under its reason, with where it
    is (`lines`: the 1-based line of each row in its file, when it has lines) and what is
    wrong; with `cfg.strict` the first such row is a DataError instead.
    """
    _require_eos(tokenizer)
    fmt = _resolve_format(cfg.format, rows)
    report = DataReport(source=source, format=fmt, total=len(rows))

    def drop(index: int, problem: _Drop) -> None:
        line = lines[index] if lines is not None else None
        if cfg.strict:
            raise DataError(
                f"{source}: {location(index, line)}: {problem.detail} ({problem.reason}; "
                "data.strict=true stops at the first bad row)"
            )
        report.record_drop(problem.reason, index, problem.detail, line)

    normalise = _normaliser(fmt, tokenizer) if fmt in FORMATS else None
    texts: list[tuple[int, _TextPair]] = []
    for index, row in enumerate(rows):
        try:
            if isinstance(row, Unreadable):
                raise _Drop(row.reason, row.detail)
            if not isinstance(row, dict) or normalise is None:
                raise _Drop(NOT_AN_OBJECT, f"expected an object, got {json_type(row)}")
            text = normalise(row)
            _check_encodable(text)
            texts.append((index, text))
        except _Drop as problem:
            drop(index, problem)
        except DataError as exc:  # a chat-template problem: say where it showed up
            line = lines[index] if lines is not None else None
            raise DataError(f"{source}: {location(index, line)}: {exc}") from None
    pairs: list[TokenizedPair] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        ids = _tokenize_chunk(tokenizer, [t for _, t in chunk], chat=fmt == "conversational")
        for (index, text), pair_ids in zip(chunk, ids):
            try:
                pair, cut = _finish_pair(index, text, pair_ids, tokenizer, cfg)
            except _Drop as problem:
                drop(index, problem)
                continue
            pairs.append(pair)
            report.truncated += cut
    report.kept = len(pairs)
    report.lengths = length_stats(pairs)
    return pairs, report


def load_preference_data(
    cfg: DataConfig, tokenizer: Any, split: str = "train", *, allow_empty: bool = False
) -> tuple[list[TokenizedPair], DataReport]:
    """Pairs and report of the train or eval split: the validation pass that precompute-ref
    and train run before any model work. A DataError when no pair survives, unless
    `allow_empty` (for `lora-dpo data check`, which prints the report first)."""
    if split == "train":
        path, source_split = cfg.train_path, cfg.train_split
    elif split == "eval":
        path, source_split = cfg.eval_path, cfg.eval_split
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not path:
        raise DataError(f"data.{split}_path is empty: no {split} data configured")
    source = read_source(path, source_split, cfg.max_row_bytes)
    rows, lines = source.rows, source.lines
    if cfg.max_pairs > 0:
        rows = rows[: cfg.max_pairs]
        lines = lines[: cfg.max_pairs] if lines is not None else None
    pairs, report = build_pairs(rows, tokenizer, cfg, source=path, lines=lines)
    if not pairs and not allow_empty:
        raise DataError(no_pairs_message(report))
    return pairs, report


def no_pairs_message(report: DataReport) -> str:
    why = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items()) or "no rows"
    first = f"; first: {report.first_problem()}" if report.dropped else ""
    return f"{report.source}: no usable preference pair out of {report.total} rows ({why}{first})"


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


def _percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(math.ceil(q / 100 * len(sorted_values)), 1)
    return float(sorted_values[rank - 1])


def length_stats(pairs: list[TokenizedPair]) -> dict[str, dict[str, float]]:
    """Token-length percentiles; "pair" is prompt + longer response, what max_length bounds."""
    if not pairs:
        return {}
    columns = {
        "prompt": [len(p.prompt_ids) for p in pairs],
        "chosen": [len(p.chosen_ids) for p in pairs],
        "rejected": [len(p.rejected_ids) for p in pairs],
        "pair": [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
    }
    stats = {}
    for name, values in columns.items():
        values.sort()
        stats[name] = {
            "p50": _percentile(values, 50),
            "p90": _percentile(values, 90),
            "p99": _percentile(values, 99),
            "max": float(values[-1]),
        }
    return stats
