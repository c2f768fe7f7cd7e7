"""Rows to text: format detection, the explicit, implicit and conversational pair formats, the
unpaired formats (KTO's prompt, completion, label), and the chat renderer that turns
conversations into prompt and response text."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_dpo.data.report import (
    BAD_LABEL,
    BAD_ROLES,
    DIALOGUES_DIFFER,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    MISSING_FIELD,
    NO_FINAL_ASSISTANT_TURN,
    NOT_AN_OBJECT,
    NOT_UTF8,
    TEMPLATE_REJECTED,
    DataReport,
    Drop,
    location,
)
from lora_dpo.errors import DataError
from lora_dpo.sources import Unreadable, first_line, json_type

FORMATS = ("explicit", "implicit", "conversational")
# Rows of one completion and its label (TRL's unpaired preference format), for train.loss_type=kto.
UNPAIRED_FORMATS = ("unpaired", "unpaired_conversational")
# HH-RLHF style transcripts: the prompt ends right after the last assistant marker.
ASSISTANT_MARKER = "\n\nAssistant:"
# Roles a conversational row may use; chat templates know these three.
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TextPair:
    """A row as the text the model sees: the prompt, and each response after it."""

    prompt: str
    chosen: str
    rejected: str
    # True when the chat template already closed the response's turn (no EOS to append).
    chosen_closed: bool = False
    rejected_closed: bool = False


@dataclass(frozen=True)
class CompletionText:
    """An unpaired row as the text the model sees: the prompt, one completion, its label."""

    prompt: str
    completion: str
    label: bool  # True: desirable
    closed: bool = False  # the chat template already closed the completion's turn


# ------------------------------------------------------------------------- format detection


def detect_format(row: dict) -> str:
    """explicit / implicit / conversational from one row's keys and value types."""
    if not isinstance(row, dict):
        raise DataError(f"cannot detect the data format: rows are {type(row).__name__}, not objects")
    if "prompt" in row and "chosen" in row and "rejected" in row:
        return "conversational" if isinstance(row["prompt"], list) else "explicit"
    if "chosen" in row and "rejected" in row:
        return "conversational" if isinstance(row["chosen"], list) else "implicit"
    if "completion" in row and "label" in row:
        return "unpaired_conversational" if isinstance(row.get("prompt"), list) else "unpaired"
    raise DataError(
        f"cannot detect the data format from the first row's keys {sorted(map(str, row))}: "
        "expected prompt/chosen/rejected (explicit or conversational), chosen/rejected "
        "(implicit) or prompt/completion/label (unpaired); set data.format to say which"
    )


def resolve_format(configured: str, rows: Sequence[Any]) -> str:
    """The configured format, or the one of the first row that has the keys of one.

    Rows before it that are unreadable or lack a field are dropped later, row by row; when
    no row has the keys of any format, the first row's keys are named in the error.
    """
    if configured in FORMATS or configured in UNPAIRED_FORMATS:
        return configured
    if configured != "auto":
        raise DataError(f"data.format={configured!r}: must be auto, {', '.join(FORMATS)}")
    objects = [row for row in rows if isinstance(row, dict)]
    for row in objects:
        if ("chosen" in row and "rejected" in row) or ("completion" in row and "label" in row):
            return detect_format(row)
    return detect_format(objects[0]) if objects else "auto"


# ------------------------------------------------------------------- rows to text pairs


def _value(row: dict, key: str) -> Any:
    if key not in row:
        raise Drop(MISSING_FIELD, f"field {key!r} is missing")
    if row[key] is None:  # parquet, CSV and hub rows give a missing value as null
        raise Drop(MISSING_FIELD, f"field {key!r} is null")
    return row[key]


def _text_field(row: dict, key: str) -> str:
    value = _value(row, key)
    if not isinstance(value, str):
        raise Drop(MISSING_FIELD, f"field {key!r} is {json_type(value)}, expected a string")
    return value


def _check_texts(prompt: str, chosen: str, rejected: str) -> None:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise Drop(EMPTY_RESPONSE, f"the {name} response is empty")
    if chosen == rejected:
        raise Drop(IDENTICAL_RESPONSES, "chosen and rejected are the same text")
    if not prompt.strip():
        raise Drop(EMPTY_PROMPT, "the prompt is empty")


def check_encodable(text: TextPair | CompletionText) -> None:
    """Tokenizers take UTF-8 only: undecodable bytes in the file (kept as lone surrogates by
    the reader) and JSON-escaped lone surrogates (`\\ud800`) cannot be tokenized."""
    names = ("prompt", "completion") if isinstance(text, CompletionText) else ("prompt", "chosen", "rejected")
    for name in names:
        try:
            getattr(text, name).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Drop(
                NOT_UTF8,
                f"the {name} text is not valid UTF-8 at character {exc.start} "
                "(bytes that are not UTF-8, or an escaped lone surrogate)",
            ) from None


def _explicit_texts(row: dict) -> TextPair:
    prompt = _text_field(row, "prompt")
    chosen, rejected = _text_field(row, "chosen"), _text_field(row, "rejected")
    _check_texts(prompt, chosen, rejected)
    return TextPair(prompt, chosen, rejected)


def _implicit_texts(row: dict) -> TextPair:
    chosen_full, rejected_full = _text_field(row, "chosen"), _text_field(row, "rejected")
    prompt, chosen, rejected = split_implicit(chosen_full, rejected_full)
    _check_texts(prompt, chosen, rejected)
    return TextPair(prompt, chosen, rejected)


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
            raise Drop(DIALOGUES_DIFFER, f"only the {which} transcript lacks {ASSISTANT_MARKER!r}")
        if chosen[: c_at + end] != rejected[: r_at + end]:
            at = len(os.path.commonprefix([chosen[: c_at + end], rejected[: r_at + end]]))
            raise Drop(
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
        raise Drop(MISSING_FIELD, f"field {key!r} is {json_type(value)}, expected a list of messages")
    if not value:
        reason = EMPTY_PROMPT if key == "prompt" else EMPTY_RESPONSE
        raise Drop(reason, f"field {key!r} is an empty list of messages")
    for number, message in enumerate(value):
        where = f"message {number} of {key!r}"
        if not isinstance(message, dict):
            raise Drop(MISSING_FIELD, f"{where} is {json_type(message)}, expected an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise Drop(MISSING_FIELD, f"{where}: 'role' is {_missing_or_type(message, 'role')}")
        if role not in ROLES:
            raise Drop(BAD_ROLES, f"{where} has role {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise Drop(MISSING_FIELD, f"{where}: 'content' is {_missing_or_type(message, 'content')}")
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
        raise Drop(
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
        raise Drop(DIALOGUES_DIFFER, "the chosen and rejected dialogues differ before their last message")
    if not chosen[:-1]:
        raise Drop(EMPTY_PROMPT, "the dialogues hold only the assistant's reply, no prompt")
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
            raise Drop(TEMPLATE_REJECTED, f"the chat template rejected it: {first_line(exc)}") from None
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

    def texts(self, row: dict) -> TextPair:
        prompt, chosen, rejected = _conversation_parts(row)
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if not _has_text(reply):
                raise Drop(EMPTY_RESPONSE, f"the {name} response is empty")
        if chosen == rejected:
            raise Drop(IDENTICAL_RESPONSES, "chosen and rejected are the same messages")
        if not _has_text(prompt):
            raise Drop(EMPTY_PROMPT, "the prompt messages are empty")
        prompt_text = self.render(prompt, add_generation_prompt=True)
        chosen_text, chosen_closed = self.response(prompt_text, prompt, chosen)
        rejected_text, rejected_closed = self.response(prompt_text, prompt, rejected)
        return TextPair(prompt_text, chosen_text, rejected_text, chosen_closed, rejected_closed)


def row_texts(
    rows: Sequence[Any],
    normalise: Callable[[dict], Any] | None,
    report: DataReport,
    strict: bool,
    lines: Sequence[int] | None,
) -> list[tuple[int, Any]]:
    """(row index, `normalise(row)`) of every row that has its format's fields; the others are
    dropped into `report` (`DataReport.drop_row`). `normalise` None: no row has a known format."""
    texts: list[tuple[int, Any]] = []
    for index, row in enumerate(rows):
        try:
            if isinstance(row, Unreadable):
                raise Drop(row.reason, row.detail)
            if not isinstance(row, dict) or normalise is None:
                raise Drop(NOT_AN_OBJECT, f"expected an object, got {json_type(row)}")
            text = normalise(row)
            for part in text if isinstance(text, list) else [text]:
                check_encodable(part)
            texts.append((index, text))
        except Drop as problem:
            report.drop_row(index, problem, strict, lines)
        except DataError as exc:  # a chat-template problem: say where it showed up
            line = lines[index] if lines is not None else None
            raise DataError(f"{report.source}: {location(index, line)}: {exc}") from None
    return texts


def normaliser(fmt: str, tokenizer: Any) -> Callable[[dict], TextPair]:
    if fmt == "explicit":
        return _explicit_texts
    if fmt == "implicit":
        return _implicit_texts
    return _ChatRenderer(tokenizer).texts


# ------------------------------------------------------------------- unpaired rows to text


def _label(row: dict) -> bool:
    value = _value(row, "label")
    if not isinstance(value, bool):
        shown = f" {value!r}" if isinstance(value, (str, int, float)) else ""
        raise Drop(BAD_LABEL, f"field 'label' is {json_type(value)}{shown}, expected true or false")
    return value


def _unpaired_text(row: dict) -> CompletionText:
    prompt, completion = _text_field(row, "prompt"), _text_field(row, "completion")
    label = _label(row)
    if not completion.strip():
        raise Drop(EMPTY_RESPONSE, "the completion is empty")
    if not prompt.strip():
        raise Drop(EMPTY_PROMPT, "the prompt is empty")
    return CompletionText(prompt, completion, label)


def _unpaired_conversation(renderer: _ChatRenderer, row: dict) -> CompletionText:
    prompt, completion = _messages(row, "prompt"), _messages(row, "completion")
    label = _label(row)
    _last_turn_is_assistant("completion", completion)
    if not _has_text(completion):
        raise Drop(EMPTY_RESPONSE, "the completion is empty")
    if not _has_text(prompt):
        raise Drop(EMPTY_PROMPT, "the prompt messages are empty")
    prompt_text = renderer.render(prompt, add_generation_prompt=True)
    text, closed = renderer.response(prompt_text, prompt, completion)
    return CompletionText(prompt_text, text, label, closed)


def unpaired_normaliser(fmt: str, tokenizer: Any) -> Callable[[dict], list[CompletionText]]:
    """A row to its unpaired texts: one for an unpaired row; a pair split into its chosen
    completion (desirable) and its rejected one (undesirable), as TRL's unpair_preference_dataset."""
    if fmt == "unpaired":
        return lambda row: [_unpaired_text(row)]
    if fmt == "unpaired_conversational":
        renderer = _ChatRenderer(tokenizer)
        return lambda row: [_unpaired_conversation(renderer, row)]
    pair_texts = normaliser(fmt, tokenizer)

    def split(row: dict) -> list[CompletionText]:
        pair = pair_texts(row)
        return [
            CompletionText(pair.prompt, pair.chosen, True, pair.chosen_closed),
            CompletionText(pair.prompt, pair.rejected, False, pair.rejected_closed),
        ]

    return split
