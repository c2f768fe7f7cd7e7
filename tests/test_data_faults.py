"""Bad data: a corpus of broken inputs gives the documented drop (with its line) or, in strict
mode, a one-line error naming file, line and field; a fuzz shows no input ends in anything
but pairs or the project's own errors."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lora_dpo.config import DataConfig
from lora_dpo.data import (
    BAD_ROLES,
    DIALOGUES_DIFFER,
    EMPTY_PROMPT,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    INVALID_JSON,
    MALFORMED_ROW,
    MISSING_FIELD,
    NO_FINAL_ASSISTANT_TURN,
    NOT_AN_OBJECT,
    NOT_UTF8,
    NOTHING_LEFT,
    TEMPLATE_REJECTED,
    build_pairs,
    load_preference_data,
)
from lora_dpo.demo.tokenizer import train_bpe_tokenizer
from lora_dpo.errors import DataError, LoraDpoError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "Human: What is the capital of France? Assistant: Paris, on the Seine.",
    "How do I bake bread? Mix flour, water, salt and yeast, then bake it.",
] * 10


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(TEXTS, out, vocab_size=300)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return AutoTokenizer.from_pretrained(str(bpe_dir))


def config(path: Path | str = "", **overrides) -> DataConfig:
    return DataConfig(**{"train_path": str(path), "max_length": 128, "max_prompt_length": 64, **overrides})


def line(row) -> bytes:
    return json.dumps(row).encode() + b"\n"


def msg(role, content) -> dict:
    return {"role": role, "content": content}


GOOD = {"prompt": "How do I bake bread?", "chosen": " Mix flour and water.", "rejected": " No."}

# (reason, the line's bytes, a fragment of the detail); each lands on its own line.
EXPLICIT_CORPUS = [
    (INVALID_JSON, b'{"prompt": "p", "chosen": \n', "not valid JSON"),
    (NOT_AN_OBJECT, b"[1, 2]\n", "expected a JSON object, got a list"),
    (NOT_UTF8, b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n', "byte 0xe9 at byte offset"),
    (
        NOT_UTF8,
        b'{"prompt": "p", "chosen": " \\ud800", "rejected": " b"}\n',
        "chosen text is not valid UTF-8",
    ),
    (MISSING_FIELD, line({"prompt": "p", "chosen": " a"}), "field 'rejected' is missing"),
    (
        MISSING_FIELD,
        line({"prompt": "p", "chosen": " a", "rejected": 7}),
        "field 'rejected' is a number, expected a string",
    ),
    (MISSING_FIELD, line({"prompt": None, "chosen": " a", "rejected": " b"}), "field 'prompt' is null"),
    (EMPTY_PROMPT, line({"prompt": "  \n", "chosen": " a", "rejected": " b"}), "the prompt is empty"),
    (
        EMPTY_RESPONSE,
        line({"prompt": "p", "chosen": " a", "rejected": " "}),
        "the rejected response is empty",
    ),
    (IDENTICAL_RESPONSES, line({"prompt": "p", "chosen": " same", "rejected": " same"}), "same text"),
]

CONVERSATIONAL_CORPUS = [
    (
        BAD_ROLES,
        {
            "prompt": [msg("bot", "hi")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        },
        "message 0 of 'prompt' has role 'bot'",
    ),
    (
        MISSING_FIELD,
        {
            "prompt": [msg("user", ["hi"])],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "b")],
        },
        "message 0 of 'prompt': 'content' is a list, expected a string",
    ),
    (
        MISSING_FIELD,
        {
            "prompt": [msg("user", "hi")],
            "chosen": [{"role": "assistant"}],
            "rejected": [msg("assistant", "b")],
        },
        "message 0 of 'chosen': 'content' is missing",
    ),
    (
        MISSING_FIELD,
        {"prompt": [msg("user", "hi")], "chosen": "a", "rejected": [msg("assistant", "b")]},
        "field 'chosen' is a string, expected a list of messages",
    ),
    (
        NO_FINAL_ASSISTANT_TURN,
        {"prompt": [msg("user", "hi")], "chosen": [msg("user", "a")], "rejected": [msg("assistant", "b")]},
        "the last message of 'chosen' is from 'user'",
    ),
    (
        NO_FINAL_ASSISTANT_TURN,
        {"chosen": [msg("user", "hi"), msg("assistant", "a")], "rejected": [msg("user", "hi")]},
        "the last message of 'rejected' is from 'user'",
    ),
    (
        DIALOGUES_DIFFER,
        {
            "chosen": [msg("user", "hi"), msg("assistant", "a")],
            "rejected": [msg("user", "yo"), msg("assistant", "b")],
        },
        "differ before their last message",
    ),
    (
        EMPTY_RESPONSE,
        {
            "prompt": [msg("user", "hi")],
            "chosen": [msg("assistant", "")],
            "rejected": [msg("assistant", "b")],
        },
        "the chosen response is empty",
    ),
    (
        EMPTY_PROMPT,
        {"prompt": [], "chosen": [msg("assistant", "a")], "rejected": [msg("assistant", "b")]},
        "field 'prompt' is an empty list",
    ),
    (
        IDENTICAL_RESPONSES,
        {
            "prompt": [msg("user", "hi")],
            "chosen": [msg("assistant", "a")],
            "rejected": [msg("assistant", "a")],
        },
        "same messages",
    ),
]
GOOD_CONVERSATION = {
    "prompt": [msg("user", "hi")],
    "chosen": [msg("assistant", "Hello!")],
    "rejected": [msg("assistant", "Go.")],
}


def write_corpus(path: Path, corpus, good_line: bytes) -> dict[str, list[int]]:
    """A good line, then each broken line followed by a good one; returns reason -> lines."""
    content, lines = [good_line], {}
    for reason, raw, _ in corpus:
        lines.setdefault(reason, []).append(len(content) + 1)
        content += [raw, good_line]
    path.write_bytes(b"".join(content))
    return lines


def assert_reported(report, corpus, lines: dict[str, list[int]]) -> None:
    expected = {}
    for reason, _, _ in corpus:
        expected[reason] = expected.get(reason, 0) + 1
    assert report.dropped == expected, report.summary()
    assert report.kept == len(corpus) + 1
    assert report.example_lines == lines
    for reason, _, fragment in corpus:
        assert any(fragment in d for d in report.example_details[reason]), (fragment, report.example_details)
    for reason, numbers in lines.items():
        assert report.examples[reason] == [n - 1 for n in numbers]  # one row per line
    summary = report.summary()
    for numbers in lines.values():
        for number in numbers:
            assert f"line {number} (row {number - 1})" in summary


def test_explicit_corpus_drops_each_kind_with_its_line(bpe, tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = write_corpus(path, EXPLICIT_CORPUS, line(GOOD))
    pairs, report = load_preference_data(config(path), bpe)
    assert report.format == "explicit" and len(pairs) == report.kept
    assert_reported(report, EXPLICIT_CORPUS, lines)


def test_conversational_corpus_drops_each_kind_with_its_line(bpe, tmp_path):
    path = tmp_path / "chat.jsonl"
    corpus = [(reason, line(row), fragment) for reason, row, fragment in CONVERSATIONAL_CORPUS]
    lines = write_corpus(path, corpus, line(GOOD_CONVERSATION))
    pairs, report = load_preference_data(config(path), bpe)
    assert report.format == "conversational"
    assert_reported(report, corpus, lines)


@pytest.mark.parametrize(
    "reason, raw, fragment", EXPLICIT_CORPUS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(EXPLICIT_CORPUS)]
)
def test_strict_mode_names_file_line_and_field(bpe, tmp_path, reason, raw, fragment):
    path = tmp_path / "one.jsonl"
    path.write_bytes(line(GOOD) + b"\n" + raw + line(GOOD))  # a blank line: line 3, row 1
    with pytest.raises(DataError) as caught:
        load_preference_data(config(path, strict=True), bpe)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 3 (row 1): ")
    assert fragment in message and f"({reason};" in message


def test_consecutive_roles_drop_only_where_the_template_rejects_them(bpe_dir, tmp_path):
    twice = {
        "prompt": [msg("user", "hi"), msg("user", "again")],
        **{k: GOOD_CONVERSATION[k] for k in ("chosen", "rejected")},
    }
    path = tmp_path / "chat.jsonl"
    path.write_bytes(line(GOOD_CONVERSATION) + line(twice))
    accepting = AutoTokenizer.from_pretrained(str(bpe_dir))  # ChatML-like: renders any order
    pairs, report = load_preference_data(config(path), accepting)
    assert len(pairs) == 2 and not report.dropped
    alternating = AutoTokenizer.from_pretrained(str(bpe_dir))
    alternating.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    pairs, report = load_preference_data(config(path), alternating)
    assert [p.source_index for p in pairs] == [0]
    assert report.dropped == {TEMPLATE_REJECTED: 1} and report.example_lines == {TEMPLATE_REJECTED: [2]}
    assert "roles must alternate" in report.example_details[TEMPLATE_REJECTED][0]


def test_nothing_left_after_truncation_names_the_limit(bpe, tmp_path):
    path = tmp_path / "long.jsonl"
    long_prompt = "How do I bake bread? " * 40
    path.write_bytes(line(GOOD) + line({**GOOD, "prompt": long_prompt}))
    # max_prompt_length == max_length leaves no room (Config.validate forbids it; the data
    # layer must still drop rather than emit an empty response).
    cfg = config(path, max_length=16, max_prompt_length=16)
    pairs, report = load_preference_data(cfg, bpe)
    assert report.dropped == {NOTHING_LEFT: 1} and report.example_lines == {NOTHING_LEFT: [2]}
    assert "data.max_length=16" in report.example_details[NOTHING_LEFT][0]
    with pytest.raises(DataError, match=r"long\.jsonl: line 2 \(row 1\): no response token fits"):
        load_preference_data(config(path, max_length=16, max_prompt_length=16, strict=True), bpe)


def test_csv_rows_keep_their_lines_and_bad_bytes_cost_one_row(bpe, tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([GOOD["prompt"], GOOD["chosen"], GOOD["rejected"]])
        writer.writerow(["multi\nline prompt", " a", " b"])  # lines 3-4
        writer.writerow(["p", " a", " b", "extra"])  # line 5
        writer.writerow(["p", " a"])  # line 6: no rejected
    with open(path, "ab") as handle:
        handle.write(b'caf\xe9," a"," b"\r\n')  # line 7: not UTF-8
    pairs, report = load_preference_data(config(path), bpe)
    assert [p.source_index for p in pairs] == [0, 1]
    assert report.dropped == {MALFORMED_ROW: 1, MISSING_FIELD: 1, NOT_UTF8: 1}
    assert report.example_lines == {MALFORMED_ROW: [5], MISSING_FIELD: [6], NOT_UTF8: [7]}
    assert report.example_details[MALFORMED_ROW] == ["4 fields, the header has 3"]


def test_json_list_items_that_are_not_objects_are_dropped_by_row(bpe, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, "text", GOOD]))
    pairs, report = load_preference_data(config(path), bpe)
    assert report.dropped == {NOT_AN_OBJECT: 1} and report.examples == {NOT_AN_OBJECT: [1]}
    assert report.example_lines == {}  # a .json file has no line per row
    assert "row 1: expected a JSON object, got a string" in report.summary()
    with pytest.raises(DataError, match=r"d\.json: row 1: expected a JSON object"):
        load_preference_data(config(path, strict=True), bpe)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", b'[{"prompt": "p",\n "chosen": }]', r"bad\.json: not valid JSON: .* at line 2 column"),
        ("deep.json", b"[" * 100_000, r"deep\.json: not valid JSON"),
        ("cut.jsonl.gz", gzip.compress(line(GOOD) * 50)[:-20], r"cut\.jsonl\.gz: cannot read past line"),
        ("junk.jsonl.gz", b"not gzip at all", r"junk\.jsonl\.gz: cannot read"),
        ("junk.parquet", b"PAR1 not parquet", r"junk\.parquet: not a readable parquet file"),
        ("d.tsv", b"a\tb\n", r"d\.tsv: unsupported file type"),
    ],
)
def test_unreadable_files_are_one_line_errors(bpe, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        load_preference_data(config(path), bpe)
    assert "\n" not in str(caught.value)


def test_utf8_bom_and_line_separators_inside_strings(bpe, tmp_path):
    path = tmp_path / "bom.jsonl"
    odd = {**GOOD, "chosen": " Mix\u2028flour\u0085and water."}  # not line ends in JSON Lines
    path.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(GOOD, ensure_ascii=False).encode()
        + b"\n"
        + json.dumps(odd, ensure_ascii=False).encode()
        + b"\r\n"
    )
    pairs, report = load_preference_data(config(path), bpe)
    assert len(pairs) == 2 and not report.dropped


def test_no_usable_pair_names_the_first_bad_line(bpe, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"{oops\n" + line({"prompt": "p", "chosen": " a", "rejected": 5}))
    with pytest.raises(DataError) as caught:
        load_preference_data(config(path), bpe)
    message = str(caught.value)
    assert "no usable preference pair out of 2 rows (invalid_json: 1, missing_field: 1" in message
    assert "first: line 1 (row 0): not valid JSON" in message
    # No row has the keys of any format: the first row's keys are named.
    path.write_bytes(line({"prompt": "p", "chosen": " a"}))
    with pytest.raises(DataError, match=r"cannot detect the data format .* \['chosen', 'prompt'\]"):
        load_preference_data(config(path), bpe)


def test_format_is_detected_past_broken_first_rows(bpe, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"{broken\n" + line({"prompt": "p"}) + line(GOOD))
    pairs, report = load_preference_data(config(path), bpe)
    assert report.format == "explicit" and [p.source_index for p in pairs] == [2]


# ---------------------------------------------------------------------------- through the CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_dpo.cli", "data", "check", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_data_check_cli_reports_drops_then_strict_fails_in_one_line(bpe_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    lines = write_corpus(train, EXPLICIT_CORPUS, line(GOOD))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_bytes(line(GOOD) + line({"prompt": "p", "chosen": " x", "rejected": " x"}))
    common = [
        f"model.name_or_path={bpe_dir}",
        f"data.train_path={train}",
        f"data.eval_path={evaluation}",
        "data.max_length=128",
        "data.max_prompt_length=64",
    ]
    ok = cli(*common)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    assert f"train split: {train}: explicit format, {len(EXPLICIT_CORPUS) * 2 + 1} rows" in ok.stdout
    for reason, numbers in lines.items():
        assert f" {reason} (rows" in ok.stdout
        assert f"line {numbers[0]} (row {numbers[0] - 1}):" in ok.stdout
    assert "eval split:" in ok.stdout and "line 2 (row 1): chosen and rejected are the same text" in ok.stdout
    assert ok.stdout.rstrip().endswith("data check: usable (train 11 pairs, eval 1 pairs)")

    strict = cli(*common, "data.strict=true")
    assert strict.returncode == 2
    assert "Traceback" not in strict.stderr
    errors = [text for text in strict.stderr.splitlines() if text.startswith("error:")]
    assert errors == [
        f"error: {train}: line 2 (row 1): not valid JSON: Expecting value (column 27) "
        "(invalid_json; data.strict=true stops at the first bad row)"
    ]


def test_data_check_exits_2_when_a_split_has_no_pair(bpe_dir, tmp_path, capsys):
    from lora_dpo.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe\n" + line({"prompt": "p", "chosen": 1, "rejected": " b"}))
    code = main(["data", "check", f"model.name_or_path={bpe_dir}", f"data.train_path={bad}"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "dropped 1 not_utf8" in out and "line 1 (row 0): byte 0xff at byte offset 0 is not UTF-8" in out
    assert "data check: not usable (train 0 pairs)" in out
    assert err.strip().splitlines()[-1].startswith(f"error: {bad}: no usable preference pair out of 2 rows")


# ------------------------------------------------------------------------------------- fuzz

# Realistic rows (so that pairs get through tokenization and truncation), mixed with junk.
PIECES = [
    " How",
    " do",
    " I",
    " bake",
    " bread",
    "?",
    " Mix",
    " flour",
    "\n",
    " é",
    " 🍞",
    "  ",
    "</s>",
    "<s>",
    "\n\nHuman:",
    "\n\nAssistant:",
    "\x00",
    "\u2028",
]


def mostly(good: st.SearchStrategy, other: st.SearchStrategy, odds: int = 3) -> st.SearchStrategy:
    """`good` `odds` times for each `other` (one_of would take each branch equally often)."""
    return st.integers(0, odds).flatmap(lambda k: other if k == 0 else good)


GOOD_TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join)
TEXT = mostly(
    GOOD_TEXT, st.one_of(st.text(max_size=8), st.sampled_from(["", " \n", "\ud800", " a\udcff"])), 7
)
LEAF = st.one_of(TEXT, st.integers(), st.floats(), st.none(), st.booleans())
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "bot", 1]), "content": LEAF}
    ),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), LEAF, max_size=3),
    LEAF,
)
JUNK_ROW = st.one_of(
    st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "other"]),
        st.one_of(LEAF, st.lists(MESSAGE, max_size=4)),
        max_size=4,
    ),
    st.fixed_dictionaries(
        {
            "prompt": st.lists(MESSAGE, max_size=3),
            "chosen": st.lists(MESSAGE, max_size=2),
            "rejected": st.lists(MESSAGE, max_size=2),
        }
    ),
    LEAF,
)


def dialogue(turns: list[str]) -> list[dict]:
    return [msg("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(turns)]


GOOD_ROWS = {
    "explicit": st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    "implicit": st.builds(
        lambda p, c, r, marker: {"chosen": p + marker + c, "rejected": p + marker + r},
        GOOD_TEXT,
        TEXT,
        TEXT,
        st.sampled_from(["\n\nAssistant:", " "]),
    ),
    "conversational": st.builds(
        lambda turns, c, r: {
            "prompt": dialogue(turns),
            "chosen": [msg("assistant", c)],
            "rejected": [msg("assistant", r)],
        },
        st.lists(GOOD_TEXT, min_size=1, max_size=3).filter(lambda t: len(t) % 2 == 1),
        TEXT,
        TEXT,
    ),
}


def row_lists(min_size: int = 0) -> st.SearchStrategy:
    """Rows of one format (a real file has one), with junk among them."""
    return st.sampled_from(sorted(GOOD_ROWS)).flatmap(
        lambda fmt: st.lists(mostly(GOOD_ROWS[fmt], JUNK_ROW), min_size=min_size, max_size=6)
    )


ROWS = row_lists()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def json_bytes(value, ascii_only: bool) -> bytes:
    # ensure_ascii=False writes lone surrogates raw: surrogatepass makes them invalid UTF-8.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def csv_bytes(rows: list) -> bytes:
    """The rows as CSV under the first row's keys; other values become JSON text."""
    header = next(
        (list(row) for row in rows if isinstance(row, dict) and row), ["prompt", "chosen", "rejected"]
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        values = [row.get(key, "") for key in header] if isinstance(row, dict) else [row]
        writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in values])
    return out.getvalue().encode("utf-8", "surrogatepass")


JUNK_LINE = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"", b"{", b"[" * 3000, b"1e999999", b"9" * 5000, b"\xef\xbb\xbf{}", b"null", b'"x"']),
)
LINES = st.lists(
    mostly(st.builds(json_bytes, mostly(GOOD_ROWS["explicit"], JUNK_ROW), st.booleans()), JUNK_LINE),
    min_size=1,
    max_size=8,
)
SUFFIXES = [".jsonl", ".json", ".csv"]


def named(content: st.SearchStrategy, suffix: str) -> st.SearchStrategy:
    """(bytes, file suffix): mostly the suffix the content is written for, sometimes another."""
    return st.tuples(content, mostly(st.just(suffix), st.sampled_from(SUFFIXES)))


FILE = st.one_of(
    named(LINES.map(lambda lines: b"\n".join(lines)), ".jsonl"),
    named(st.builds(json_bytes, row_lists(1), st.booleans()), ".json"),
    named(row_lists(1).map(csv_bytes), ".csv"),
    st.tuples(st.binary(max_size=200), st.sampled_from(SUFFIXES)),
)
# Mostly valid lengths (max_prompt_length < max_length), sometimes ones validation forbids.
LENGTHS = mostly(
    st.integers(2, 48).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
    st.tuples(st.integers(1, 48), st.integers(1, 48)),
)
CONFIG = LENGTHS.flatmap(
    lambda lengths: st.fixed_dictionaries(
        {
            "max_length": st.just(lengths[0]),
            "max_prompt_length": st.just(lengths[1]),
            "format": mostly(st.just("auto"), st.sampled_from(["explicit", "implicit", "conversational"])),
            "strict": st.sampled_from([False, False, False, True]),
        }
    )
)


def check_result(pairs, report, cfg: DataConfig, eos: int) -> None:
    assert report.kept == len(pairs)
    assert report.kept + sum(report.dropped.values()) == report.total
    for pair in pairs:
        assert pair.prompt_ids and pair.chosen_ids and pair.rejected_ids
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert len(pair.prompt_ids) + len(ids) <= cfg.max_length
            assert ids[-1] == eos or len(pair.prompt_ids) + len(ids) == cfg.max_length


@FUZZ
@given(file=FILE, overrides=CONFIG)
def test_fuzzed_files_give_pairs_or_data_errors(bpe, file, overrides):
    content, suffix = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(content)
        # As configured, then strict: the first bad row ends the read, in one line.
        for cfg in (config(path, **overrides), config(path, **{**overrides, "strict": True})):
            try:
                check_result(*load_preference_data(cfg, bpe), cfg, bpe.eos_token_id)
            except LoraDpoError as exc:
                assert "\n" not in str(exc)


@FUZZ
@given(rows=ROWS, overrides=CONFIG)
def test_fuzzed_rows_give_pairs_or_data_errors(bpe, rows, overrides):
    cfg = config(**overrides)
    try:
        check_result(*build_pairs(rows, bpe, cfg, "fuzz"), cfg, bpe.eos_token_id)
    except LoraDpoError as exc:
        assert "\n" not in str(exc)


def test_readme_documents_every_drop_reason_and_the_default():
    from lora_dpo.data import DROP_REASONS

    readme = (ROOT / "README.md").read_text()
    for reason in DROP_REASONS:
        assert f"`{reason}`" in readme, reason
    assert "`lora-dpo data check" in readme and "data.strict: false" in readme
