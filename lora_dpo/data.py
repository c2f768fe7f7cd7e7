"""Preference data: read rows from any source, normalise the three formats, tokenize, report.

Tokenization rules (each one guards against a known bug):
- prompt ids are what the model sees at inference: plain text gets the tokenizer's own
  special prefix (BOS), chat data is the template with the generation prompt; one BOS at most;
- response ids continue the prompt (prompt and response are tokenized together), decode back
  to the response text and end with EOS (or the template's end-of-turn) exactly once;
- over-long pairs: the prompt is cut from the left (BOS kept), then responses from the right;
- every dropped row is counted under a reason and its first indices are kept for the report.
Pad ids are never used here: sequence lengths say where the real tokens are.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_dpo.config import DataConfig
from lora_dpo.errors import DataError

FORMATS = ("explicit", "implicit", "conversational")
# HH-RLHF style transcripts: the prompt ends right after the last assistant marker.
ASSISTANT_MARKER = "\n\nAssistant:"
# Bump when a rule below changes the ids: it is part of the reference cache identity.
TOKENIZATION_VERSION = 1
TRUNCATION_POLICY = "prompt_left_keep_bos_then_responses_right"
EOS_POLICY = "append_eos_unless_response_ends_with_eos_or_template_end_of_turn"
# Suffixes that make a name a local file rather than a hub data set.
LOCAL_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
TOKENIZE_CHUNK = 1024
EXAMPLES_PER_REASON = 5

MISSING_FIELD = "missing_field"
EMPTY_RESPONSE = "empty_response"
EMPTY_PROMPT = "empty_prompt"
IDENTICAL_RESPONSES = "identical_responses"
DIALOGUES_DIFFER = "dialogues_differ_before_last_turn"
NO_FINAL_ASSISTANT_TURN = "no_final_assistant_turn"
NOTHING_LEFT = "nothing_left_after_truncation"


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
    examples: dict[str, list[int]] = field(default_factory=dict)

    def record_drop(self, reason: str, index: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        first = self.examples.setdefault(reason, [])
        first.append(index)
        # Drops come from two passes (text, then tokens): keep the smallest indices.
        if len(first) > EXAMPLES_PER_REASON:
            first.sort()
            del first[EXAMPLES_PER_REASON:]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        n_dropped = sum(self.dropped.values())
        lines = [
            f"{self.source}: {self.format} format, {self.total} rows, "
            f"{self.kept} pairs kept, {n_dropped} dropped"
        ]
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            rows = ", ".join(str(i) for i in sorted(self.examples.get(reason, [])))
            more = ", ..." if count > EXAMPLES_PER_REASON else ""
            lines.append(f"  dropped {count} {reason} (rows {rows}{more})")
        lines.append(f"  truncated to max_length: {self.truncated} kept pairs")
        if self.lengths:
            parts = [
                f"{name} {int(s['p50'])}/{int(s['p90'])}/{int(s['p99'])}/{int(s['max'])}"
                for name, s in self.lengths.items()
            ]
            lines.append("  tokens p50/p90/p99/max: " + ", ".join(parts))
        return "\n".join(lines)


class _Drop(Exception):
    """A row cannot become a pair; `reason` is the report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
    """Rows of a local file, a `save_to_disk` directory, or a hub data set (see module doc)."""
    if not path:
        raise DataError("no data path given")
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return _read_saved_dataset(local, split)
    if local.is_file():
        return _read_file(local)
    if _looks_local(path):
        raise DataError(f"file not found: {path}")
    return _read_hub(path, split)


def _looks_local(path: str) -> bool:
    # A hub name is "owner/name" or "name": one slash at most, relative, no file suffix.
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or path.lower().endswith(LOCAL_SUFFIXES)
    )


def _read_file(path: Path) -> list[dict]:
    name = path.name.lower()
    try:
        if name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                return _parse_jsonl(lines, path)
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as lines:
                return _parse_jsonl(lines, path)
        if name.endswith(".json"):
            return _read_json(path)
        if name.endswith(".parquet"):
            return _read_parquet(path)
        if name.endswith(".csv"):
            return _read_csv(path)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {_first_line(exc)}") from None
    raise DataError(
        f"{path}: unsupported file type; use .jsonl, .json, .jsonl.gz, .parquet, .csv "
        "or a datasets save_to_disk directory"
    )


def _parse_jsonl(lines: Iterable[str], path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # many ".json" files on the hub are really JSON Lines
            return _parse_jsonl(text.splitlines(), path)
        raise DataError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a list of objects or {{"data": [...]}}')
    return _require_objects(data, path)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path}: not a readable parquet file: {_first_line(exc)}") from None


def _read_csv(path: Path) -> list[dict]:
    # Transcripts are longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            return list(csv.DictReader(handle))
        except csv.Error as exc:
            raise DataError(f"{path}: not a readable CSV file: {exc}") from None


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # the library raises several types for "not a dataset dir"
        raise DataError(
            f"{path}: a directory, but not a datasets save_to_disk directory: {_first_line(exc)}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # HTTP, offline-mode, not-found and split errors all end here
        raise DataError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face "
            f"Hub (split {split!r}) failed: {_first_line(exc)}. Hub data sets need network "
            "access; offline, give a local path (.jsonl, .json, .jsonl.gz, .parquet, .csv "
            "or a save_to_disk directory)"
        ) from None
    return loaded.to_list()


def _require_objects(rows: Sequence[Any], path: Path) -> list[dict]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index}: expected an object, got {type(row).__name__}")
    return list(rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


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
        f"cannot detect the data format from the first row's keys {sorted(row)}: expected "
        "prompt/chosen/rejected (explicit or conversational) or chosen/rejected (implicit); "
        "set data.format to say which"
    )


def _resolve_format(configured: str, rows: list[dict]) -> str:
    if configured in FORMATS:
        return configured
    if configured != "auto":
        raise DataError(f"data.format={configured!r}: must be auto, {', '.join(FORMATS)}")
    if not rows:
        return "auto"
    return detect_format(rows[0])


# ------------------------------------------------------------------- rows to text pairs


def _text_field(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise _Drop(MISSING_FIELD)
    return value


def _check_responses(chosen: str, rejected: str) -> None:
    if not chosen.strip() or not rejected.strip():
        raise _Drop(EMPTY_RESPONSE)
    if chosen == rejected:
        raise _Drop(IDENTICAL_RESPONSES)


def _explicit_texts(row: dict) -> _TextPair:
    prompt = _text_field(row, "prompt")
    chosen, rejected = _text_field(row, "chosen"), _text_field(row, "rejected")
    _check_responses(chosen, rejected)
    return _TextPair(prompt, chosen, rejected)


def _implicit_texts(row: dict) -> _TextPair:
    chosen_full, rejected_full = _text_field(row, "chosen"), _text_field(row, "rejected")
    prompt, chosen, rejected = split_implicit(chosen_full, rejected_full)
    _check_responses(chosen, rejected)
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
        if c_at < 0 or r_at < 0 or chosen[: c_at + end] != rejected[: r_at + end]:
            raise _Drop(DIALOGUES_DIFFER)
        return chosen[: c_at + end], chosen[c_at + end :], rejected[r_at + end :]
    common = os.path.commonprefix([chosen, rejected])
    tail = re.search(r"\s+\S*$", common)
    cut = tail.start() if tail else len(common)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _messages(value: Any) -> list[dict]:
    valid = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not valid or not value:
        raise _Drop(MISSING_FIELD)
    return value


def _has_text(messages: list[dict]) -> bool:
    return any(m["content"].strip() for m in messages)


def _conversation_parts(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen response messages, rejected response messages)."""
    chosen, rejected = _messages(row.get("chosen")), _messages(row.get("rejected"))
    if "prompt" in row:
        return _messages(row["prompt"]), chosen, rejected
    # Implicit conversational: full dialogues that differ only in the last assistant message.
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _Drop(NO_FINAL_ASSISTANT_TURN)
    if chosen[:-1] != rejected[:-1]:
        raise _Drop(DIALOGUES_DIFFER)
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
            raise DataError(f"the chat template failed: {_first_line(exc)}") from None
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
        if not _has_text(chosen) or not _has_text(rejected):
            raise _Drop(EMPTY_RESPONSE)
        if chosen == rejected:
            raise _Drop(IDENTICAL_RESPONSES)
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
    if not chosen or not rejected:
        raise _Drop(EMPTY_RESPONSE)
    chosen = _with_eos(chosen, tokenizer.eos_token_id, text.chosen_closed)
    rejected = _with_eos(rejected, tokenizer.eos_token_id, text.rejected_closed)
    prompt, chosen, rejected, cut = truncate(prompt, chosen, rejected, cfg, tokenizer.bos_token_id)
    if not chosen or not rejected:
        raise _Drop(NOTHING_LEFT)
    if not prompt:
        # The first response token is scored from the token before it: there must be one.
        raise _Drop(EMPTY_PROMPT)
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
    rows: list[dict], tokenizer: Any, cfg: DataConfig, source: str
) -> tuple[list[TokenizedPair], DataReport]:
    """Normalise, tokenize, and fit each row; dropped rows are counted in the report."""
    _require_eos(tokenizer)
    fmt = _resolve_format(cfg.format, rows)
    report = DataReport(source=source, format=fmt, total=len(rows))
    if not rows:
        return [], report
    normalise = _normaliser(fmt, tokenizer)
    texts: list[tuple[int, _TextPair]] = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Drop(MISSING_FIELD)
            texts.append((index, normalise(row)))
        except _Drop as drop:
            report.record_drop(drop.reason, index)
        except DataError as exc:  # a chat-template problem: say where it showed up
            raise DataError(f"{source}: row {index}: {exc}") from None
    pairs: list[TokenizedPair] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        ids = _tokenize_chunk(tokenizer, [t for _, t in chunk], chat=fmt == "conversational")
        for (index, text), pair_ids in zip(chunk, ids):
            try:
                pair, cut = _finish_pair(index, text, pair_ids, tokenizer, cfg)
            except _Drop as drop:
                report.record_drop(drop.reason, index)
                continue
            pairs.append(pair)
            report.truncated += cut
    report.kept = len(pairs)
    report.lengths = length_stats(pairs)
    return pairs, report


def load_preference_data(
    cfg: DataConfig, tokenizer: Any, split: str = "train"
) -> tuple[list[TokenizedPair], DataReport]:
    """Pairs and report of the train or eval split; a DataError when no pair survives."""
    if split == "train":
        path, source_split = cfg.train_path, cfg.train_split
    elif split == "eval":
        path, source_split = cfg.eval_path, cfg.eval_split
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not path:
        raise DataError(f"data.{split}_path is empty: no {split} data configured")
    rows = load_rows(path, source_split)
    if cfg.max_pairs > 0:
        rows = rows[: cfg.max_pairs]
    pairs, report = build_pairs(rows, tokenizer, cfg, source=path)
    if not pairs:
        why = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.items()) or "no rows"
        raise DataError(f"{path}: no usable preference pair out of {report.total} rows ({why})")
    return pairs, report


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
