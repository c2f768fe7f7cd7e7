"""Preference data: loaders, format detection, tokenization rules, truncation, drop report."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lora_dpo.config import DataConfig
from lora_dpo.data import (
    DIALOGUES_DIFFER,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    INVALID_JSON,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    NOTHING_LEFT,
    TokenizedPair,
    build_pairs,
    detect_format,
    load_preference_data,
    split_implicit,
    tokenization_settings,
    tokenizer_fingerprint,
)
from lora_dpo.demo.tokenizer import train_bpe_tokenizer
from lora_dpo.errors import DataError
from lora_dpo.sources import read_source


def shared_data(*parts: str) -> Path:
    """A file under the project's sibling `shared/data` folder; skips the test when absent."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = path.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


CORPUS = [
    "Human: What is the capital of France?",
    "Assistant: The capital of France is Paris, a city on the Seine.",
    "Human: How do I bake bread at home?",
    "Assistant: Mix flour, water, salt and yeast, let it rise, then bake it.",
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
] * 20

ROWS = [
    {"prompt": "Say hi, please.", "chosen": " Hi, there!", "rejected": ' "No", I said.'},
    {"prompt": "Línea 2\nwith a newline", "chosen": " ok, done", "rejected": " nope"},
    {"prompt": "Third, with commas", "chosen": " yes", "rejected": " no"},
]


def config(**overrides) -> DataConfig:
    return DataConfig(**{"max_length": 256, "max_prompt_length": 128, **overrides})


def explicit(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(CORPUS, out)
    return out


@pytest.fixture(scope="session")
def bpe(bpe_dir):
    return AutoTokenizer.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    model = shared_data("llama2-tokenizer", "tokenizer.model")
    out = tmp_path_factory.mktemp("llama2")
    shutil.copy(model, out / "tokenizer.model")
    settings = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",  # pad == eos, the common trap
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return out


@pytest.fixture(scope="session")
def llama(llama_dir):
    return AutoTokenizer.from_pretrained(str(llama_dir))


@pytest.fixture(params=["bpe", "llama"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def one_pair(rows: list[dict], tokenizer, **overrides) -> TokenizedPair:
    pairs, report = build_pairs(rows, tokenizer, config(**overrides), "test")
    assert len(pairs) == 1, report.summary()
    return pairs[0]


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------- loaders


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_source(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(path, split) of ROWS written as `kind`."""
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "train"
    if kind == "json-list":
        (tmp_path / "d.json").write_text(json.dumps(ROWS))
        return str(tmp_path / "d.json"), "train"
    if kind == "json-data":
        (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
        return str(tmp_path / "d.json"), "train"
    if kind == "json-lines":  # hub-style ".json" that is really JSON Lines
        return str(write_jsonl(tmp_path / "d.json", ROWS)), "train"
    if kind == "jsonl.gz":
        with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in ROWS)
        return str(tmp_path / "d.jsonl.gz"), "train"
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet"), "train"
    if kind == "csv":
        with open(tmp_path / "d.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
        return str(tmp_path / "d.csv"), "train"
    import datasets

    datasets.disable_progress_bars()
    if kind == "dataset-dir":
        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
        return str(tmp_path / "ds"), "train"
    assert kind == "datasetdict-dir"
    parts = {
        "train": datasets.Dataset.from_list(ROWS[:1]),
        "test": datasets.Dataset.from_list(ROWS),
    }
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    return str(tmp_path / "dd"), "test"


@pytest.mark.parametrize(
    "kind",
    [
        "jsonl",
        "json-list",
        "json-data",
        "json-lines",
        "jsonl.gz",
        "parquet",
        "csv",
        "dataset-dir",
        "datasetdict-dir",
    ],
)
def test_every_source_format_round_trips_the_rows(kind, tmp_path, bpe):
    path, split = write_source(kind, tmp_path)
    assert read_source(path, split).rows == ROWS
    pairs, report = load_preference_data(config(train_path=path, train_split=split), bpe)
    assert [p.source_index for p in pairs] == [0, 1, 2] and not report.dropped


def test_malformed_jsonl_line_names_file_and_line(tmp_path, bpe):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    pairs, report = load_preference_data(config(train_path=str(path)), bpe)
    assert len(pairs) == 1 and report.example_lines == {INVALID_JSON: [3]}
    with pytest.raises(DataError, match=r"broken\.jsonl: line 3 \(row 1\): not valid JSON"):
        load_preference_data(config(train_path=str(path), strict=True), bpe)


def test_jsonl_line_that_is_not_an_object_is_named(tmp_path, bpe):
    path = write_jsonl(tmp_path / "list.jsonl", [ROWS[0]])
    path.write_text(path.read_text() + "[1, 2]\n")
    pairs, report = load_preference_data(config(train_path=str(path)), bpe)
    assert len(pairs) == 1 and report.example_lines == {NOT_AN_OBJECT: [2]}
    with pytest.raises(DataError, match=r"list\.jsonl: line 2 \(row 1\): expected a JSON object"):
        load_preference_data(config(train_path=str(path), strict=True), bpe)


def test_missing_local_file(tmp_path, bpe):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        load_preference_data(config(train_path=str(tmp_path / "nope.jsonl")), bpe)
    with pytest.raises(DataError, match="file not found"):
        load_preference_data(config(train_path="data/sub/train"), bpe)


def test_missing_split_of_a_saved_datasetdict(tmp_path, bpe):
    path, _ = write_source("datasetdict-dir", tmp_path)
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        load_preference_data(config(train_path=path, train_split="validation"), bpe)


def test_hub_name_offline_is_one_clear_line(monkeypatch, bpe):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables at import time; they may be imported already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as caught:
        load_preference_data(config(train_path="someone/no-such-preference-set"), bpe)
    message = str(caught.value)
    assert "\n" not in message
    assert "someone/no-such-preference-set" in message and "network" in message


# ------------------------------------------------------------------------ formats and prompts


@pytest.mark.parametrize(
    "row, expected",
    [
        (explicit("p", "a", "b"), "explicit"),
        ({"chosen": "H: x A: a", "rejected": "H: x A: b"}, "implicit"),
        ({"prompt": [user("x")], "chosen": [assistant("a")], "rejected": [assistant("b")]}, "conversational"),
        ({"chosen": [user("x"), assistant("a")], "rejected": [user("x"), assistant("b")]}, "conversational"),
    ],
)
def test_detect_format(row, expected):
    assert detect_format(row) == expected


def test_undetectable_format_names_the_keys():
    with pytest.raises(DataError, match=r"\['question', 'answer'\]|\['answer', 'question'\]"):
        detect_format({"question": "q", "answer": "a"})


def test_hh_style_prompt_ends_after_the_last_assistant_marker():
    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bread?\n\nAssistant:"
    prompt, chosen, rejected = split_implicit(shared + " Mix flour.", shared + " No.")
    assert (prompt, chosen, rejected) == (shared, " Mix flour.", " No.")


def test_implicit_without_markers_splits_at_a_word_boundary():
    prompt, chosen, rejected = split_implicit("Q: sky colour? A: blue", "Q: sky colour? A: black")
    assert (prompt, chosen, rejected) == ("Q: sky colour? A:", " blue", " black")


def test_dialogues_that_differ_before_the_last_turn_are_dropped(bpe):
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    bad = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: more\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: c",
    }
    pairs, report = build_pairs([good, bad, good], bpe, config(), "t")
    assert report.format == "implicit"
    assert [p.source_index for p in pairs] == [0, 2]
    assert report.dropped == {DIALOGUES_DIFFER: 1}
    assert report.examples[DIALOGUES_DIFFER] == [1]


def test_every_drop_is_counted_by_reason(bpe):
    rows = [
        explicit("p", " a", " b"),
        {"prompt": "p", "chosen": " a"},  # no rejected
        explicit("p", " a", 7),  # not a string
        explicit("p", "   ", " b"),
        explicit("p", " same", " same"),
        explicit("p", " c", " d"),
    ]
    pairs, report = build_pairs(rows, bpe, config(), "t")
    assert [p.source_index for p in pairs] == [0, 5]
    assert report.dropped == {MISSING_FIELD: 2, EMPTY_RESPONSE: 1, IDENTICAL_RESPONSES: 1}
    assert report.examples == {MISSING_FIELD: [1, 2], EMPTY_RESPONSE: [3], IDENTICAL_RESPONSES: [4]}
    assert report.kept + sum(report.dropped.values()) == report.total == 6
    json.dumps(report.to_dict())
    assert "missing_field" in report.summary()


# ------------------------------------------------------------------------ tokenization rules


def test_prompt_has_one_bos_and_responses_end_with_one_eos(tokenizer):
    row = explicit("Human: How do I bake bread?", " Mix flour and water.", " No.")
    pair = one_pair([row], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids[-1] == eos and ids.count(eos) == 1
    # pad == eos, and the EOS is still the last response token: nothing was masked away.
    assert tokenizer.pad_token_id == eos


@pytest.mark.parametrize(
    "prompt, chosen",
    [
        ("Human: How do I bake bread?\n\nAssistant:", " Mix flour, water and salt."),
        # No space after the prompt: tokenized alone, SentencePiece would add a phantom "▁".
        ("Question: How do I bake bread?\n", "Mix flour, water and salt."),
    ],
    ids=["space-led", "newline-then-word"],
)
def test_responses_continue_the_prompt_and_decode_back(tokenizer, prompt, chosen):
    pair = one_pair([explicit(prompt, chosen, " Buy it.")], tokenizer)
    joint = tokenizer(prompt + chosen)["input_ids"]
    assert list(pair.prompt_ids + pair.chosen_ids[:-1]) == joint
    assert decoded(tokenizer, pair.chosen_ids).strip() == chosen.strip()
    assert decoded(tokenizer, pair.rejected_ids).strip() == "Buy it."


def test_decoded_response_is_exact_with_byte_level_bpe(bpe):
    pair = one_pair([explicit("Human: Hello?", " Hello there, fox!", " No.")], bpe)
    assert decoded(bpe, pair.chosen_ids) == " Hello there, fox!"


def test_prompt_text_with_its_own_bos_string_gets_one_bos(tokenizer):
    pair = one_pair([explicit("<s>Human: Hello?", " Hi.", " No.")], tokenizer)
    bos = tokenizer.bos_token_id
    assert pair.prompt_ids[:2] != (bos, bos)
    assert pair.prompt_ids.count(bos) == 1


def test_response_that_already_ends_with_eos_is_not_doubled(tokenizer):
    pair = one_pair([explicit("Human: Hello?", " Hi there.</s>", " No.")], tokenizer)
    eos = tokenizer.eos_token_id
    assert pair.chosen_ids[-1] == eos and pair.chosen_ids.count(eos) == 1
    assert pair.chosen_ids[-2] != eos


def test_tokenizer_without_eos_is_an_error(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="no EOS token"):
        build_pairs([explicit("p", " a", " b")], tokenizer, config(), "t")


# ------------------------------------------------------------------------- chat templates

CONVERSATION = {
    "prompt": [user("How do I bake bread?"), assistant("With flour."), user("And then?")],
    "chosen": [assistant("Let it rise, then bake it.")],
    "rejected": [assistant("No idea.")],
}


def test_conversational_prompt_is_the_inference_prompt_with_one_bos(bpe):
    pair = one_pair([CONVERSATION], bpe)
    rendered = bpe.apply_chat_template(CONVERSATION["prompt"], add_generation_prompt=True)
    assert list(pair.prompt_ids) == rendered["input_ids"]
    assert pair.prompt_ids[0] == bpe.bos_token_id and pair.prompt_ids.count(bpe.bos_token_id) == 1


def test_conversational_end_of_turn_is_the_single_eos(bpe):
    # The template closes each turn with `</s>\n`: the EOS stays, the newline after it goes.
    pair = one_pair([CONVERSATION], bpe)
    eos = bpe.eos_token_id
    expected = {pair.chosen_ids: "Let it rise, then bake it.", pair.rejected_ids: "No idea."}
    for ids, text in expected.items():
        assert ids[-1] == eos and ids.count(eos) == 1
        assert decoded(bpe, ids) == text


def test_implicit_conversational_shares_all_but_the_last_message(bpe):
    history = CONVERSATION["prompt"]
    row = {
        "chosen": history + CONVERSATION["chosen"],
        "rejected": history + CONVERSATION["rejected"],
    }
    differ = {"chosen": row["chosen"], "rejected": [user("Other?")] + CONVERSATION["rejected"]}
    pairs, report = build_pairs([row, differ], bpe, config(), "t")
    assert pairs[0] == one_pair([CONVERSATION], bpe)
    assert report.dropped == {DIALOGUES_DIFFER: 1}


def test_template_without_end_of_turn_gets_eos_appended(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    pair = one_pair([CONVERSATION], tokenizer)
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert pair.chosen_ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.bos_token_id not in pair.prompt_ids  # this template writes no BOS


def test_llama_chat_template_with_bos_string_gets_one_bos(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    pair = one_pair([CONVERSATION], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos
    assert pair.chosen_ids[-1] == eos and pair.chosen_ids.count(eos) == 1
    assert decoded(tokenizer, pair.chosen_ids).strip() == "Let it rise, then bake it."


def test_template_whose_generation_prompt_is_not_a_prefix_is_an_error(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    with pytest.raises(DataError, match="chat template"):
        build_pairs([CONVERSATION], tokenizer, config(), "t")


def test_conversational_data_needs_a_chat_template(llama):
    with pytest.raises(DataError, match="chat template"):
        build_pairs([CONVERSATION], llama, config(), "t")


# ------------------------------------------------------------------------------ truncation

LONG_PROMPT = "Human: " + " ".join(f"word{i}" for i in range(60)) + "\n\nAssistant:"
LONG_CHOSEN = " " + " ".join(f"reply{i}" for i in range(30))


def test_prompt_is_cut_from_the_left_first_keeping_bos(tokenizer):
    row = explicit(LONG_PROMPT, LONG_CHOSEN, " Short.")
    full = one_pair([row], tokenizer, max_length=4096, max_prompt_length=2048)
    pairs, report = build_pairs([row], tokenizer, config(max_length=48, max_prompt_length=20), "t")
    (cut,) = pairs
    assert report.truncated == 1
    assert cut.prompt_ids == (tokenizer.bos_token_id,) + full.prompt_ids[-19:]
    assert cut.chosen_ids == full.chosen_ids[:28]  # cut from the right, EOS included
    assert cut.rejected_ids == full.rejected_ids  # short enough to keep its EOS
    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) == 48


def test_short_prompt_is_kept_and_responses_cut_from_the_right(tokenizer):
    row = explicit("Human: Hi?", LONG_CHOSEN, LONG_CHOSEN + " more")
    full = one_pair([row], tokenizer, max_length=4096, max_prompt_length=2048)
    cut = one_pair([row], tokenizer, max_length=20, max_prompt_length=10)
    assert cut.prompt_ids == full.prompt_ids
    room = 20 - len(full.prompt_ids)
    assert cut.chosen_ids == full.chosen_ids[:room]
    assert cut.rejected_ids == full.rejected_ids[:room]


def test_nothing_left_after_truncation_is_a_counted_drop(bpe):
    rows = [explicit(LONG_PROMPT, " Yes.", " No."), explicit("Hi", " Yes.", " No.")]
    # A prompt limit equal to max_length leaves no room for responses (config validation
    # forbids it, so the data layer must still handle it rather than emit empty responses).
    pairs, report = build_pairs(rows, bpe, config(max_length=16, max_prompt_length=16), "t")
    assert [p.source_index for p in pairs] == [1]
    assert report.dropped == {NOTHING_LEFT: 1} and report.examples == {NOTHING_LEFT: [0]}


# ------------------------------------------------------------------- pair hash and settings


def test_pair_hash_depends_on_every_id_and_on_the_boundaries():
    base = TokenizedPair((1, 2, 3), (4, 5), (6,), source_index=0)
    assert base.pair_hash == TokenizedPair((1, 2, 3), (4, 5), (6,), source_index=9).pair_hash
    assert len(base.pair_hash) == 32
    variants = [
        TokenizedPair((1, 2, 7), (4, 5), (6,), 0),
        TokenizedPair((1, 2, 3), (4, 8), (6,), 0),
        TokenizedPair((1, 2, 3), (4, 5), (9,), 0),
        TokenizedPair((1, 2), (3, 4, 5), (6,), 0),  # same ids, boundary moved
        TokenizedPair((1, 2, 3), (6,), (4, 5), 0),  # chosen and rejected swapped
    ]
    hashes = {v.pair_hash for v in variants} | {base.pair_hash}
    assert len(hashes) == len(variants) + 1
    # Stable across processes and releases: the reference cache is looked up by it.
    expected = "ed3bed63d4df290472f1b4ef2dd85b78abcb088ae5174f27aa225bd96c0c8331"
    assert base.pair_hash.hex() == expected


def test_tokenization_settings_identify_the_tokenizer(bpe, bpe_dir, llama):
    cfg = config()
    settings = tokenization_settings(bpe, cfg)
    assert settings["max_length"] == 256 and settings["max_prompt_length"] == 128
    assert settings["bos_token_id"] == bpe.bos_token_id and settings["adds_bos"] is True
    assert settings["eos_token_id"] == bpe.eos_token_id
    assert "pad_token_id" not in settings  # padding never changes a value: masks use lengths
    assert settings["chat_template_sha256"] is not None
    json.dumps(settings)
    # A pure function of the saved tokenizer file, so equal in every process.
    on_disk = json.loads((bpe_dir / "tokenizer.json").read_text())
    expected = hashlib.sha256(json.dumps(on_disk, sort_keys=True).encode()).hexdigest()
    assert tokenizer_fingerprint(bpe) == expected
    other = tokenization_settings(llama, cfg)
    assert other["tokenizer_sha256"] != settings["tokenizer_sha256"]
    assert other["chat_template_sha256"] is None
    assert tokenization_settings(bpe, config(max_length=512)) != settings


# ------------------------------------------------------------------------- whole data sets


def test_load_preference_data_applies_max_pairs_and_explains_empty_results(bpe, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    pairs, report = load_preference_data(config(train_path=str(path), max_pairs=2), bpe)
    assert report.total == 2 and [p.source_index for p in pairs] == [0, 1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [explicit("p", " x", " x"), {"prompt": "p"}])
    with pytest.raises(DataError, match="no usable preference pair .*identical_responses: 1"):
        load_preference_data(config(train_path=str(bad)), bpe)
    with pytest.raises(DataError, match="data.eval_path is empty"):
        load_preference_data(config(train_path=str(path)), bpe, split="eval")


def test_real_hh_rlhf_with_the_llama2_tokenizer(llama):
    path = shared_data("hh-rlhf-harmless-base", "test.jsonl.gz")
    cfg = config(train_path=str(path), max_length=512, max_prompt_length=256)
    pairs, report = load_preference_data(cfg, llama)
    print("\n" + report.summary())
    assert report.format == "implicit"
    assert report.total == 2312
    assert report.dropped[DIALOGUES_DIFFER] == 5
    assert report.dropped[EMPTY_RESPONSE] == 4
    assert report.kept == len(pairs) == report.total - sum(report.dropped.values())
    bos, eos = llama.bos_token_id, llama.eos_token_id
    for pair in pairs:
        assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos
        room = 512 - len(pair.prompt_ids)
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert len(ids) <= room
            assert ids[-1] == eos or len(ids) == room  # EOS unless cut by truncation
            assert eos not in ids[:-1]
    rows = read_source(str(path)).rows
    for pair in pairs[:50]:
        row = rows[pair.source_index]
        _, chosen, _ = split_implicit(row["chosen"], row["rejected"])
        if pair.chosen_ids[-1] == eos:
            assert decoded(llama, pair.chosen_ids) == chosen.strip()


# ---------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_is_deterministic_fast_and_llama_like(tmp_path, bpe_dir):
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(CORPUS, tmp_path / "again")
    assert time.perf_counter() - start < 2.0
    again = (tmp_path / "again" / "tokenizer.json").read_text()
    assert again == (bpe_dir / "tokenizer.json").read_text()
    eos = tokenizer.convert_tokens_to_ids("</s>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == eos
    plain = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert tokenizer("Hello there")["input_ids"] == [tokenizer.bos_token_id] + plain
    chat = tokenizer.apply_chat_template([user("Hi")], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<s>") and chat.endswith("<|assistant|>\n")


# ------------------------------------------------------------------------------- data check


def test_report_keeps_the_first_rows_of_each_reason_with_their_lines_and_details():
    from lora_dpo.data import DataReport

    report = DataReport(source="s", format="explicit", total=20)
    # Two passes (text, then tokens) record out of order: the smallest rows are kept, aligned.
    for index in (9, 3, 7, 1, 8, 2, 0, 5):
        report.record_drop(EMPTY_RESPONSE, index, f"detail {index}", line=index + 10)
    assert report.dropped == {EMPTY_RESPONSE: 8}
    assert report.examples[EMPTY_RESPONSE] == [0, 1, 2, 3, 5]
    assert report.example_lines[EMPTY_RESPONSE] == [10, 11, 12, 13, 15]
    assert report.example_details[EMPTY_RESPONSE] == [f"detail {i}" for i in (0, 1, 2, 3, 5)]
    assert "line 10 (row 0): detail 0" in report.summary()
    assert report.first_problem() == "line 10 (row 0): detail 0"


def hh_rlhf_quirks(path: Path) -> tuple[list[int], list[int]]:
    """Rows whose transcripts differ before the last assistant turn, and rows with an empty
    response, found straight from the file (an oracle for the data check)."""
    marker = "\n\nAssistant:"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    differ, empty = [], []
    for index, row in enumerate(rows):
        cut = {key: row[key].rfind(marker) + len(marker) for key in ("chosen", "rejected")}
        if row["chosen"][: cut["chosen"]] != row["rejected"][: cut["rejected"]]:
            differ.append(index)
        elif any(not row[key][cut[key] :].strip() for key in ("chosen", "rejected")):
            empty.append(index)
    return differ, empty


def test_data_check_on_real_hh_rlhf_reports_its_quirks(llama_dir, capsys):
    from lora_dpo.cli import main

    path = shared_data("hh-rlhf-harmless-base", "test.jsonl.gz")
    differ, empty = hh_rlhf_quirks(path)
    assert (len(differ), len(empty)) == (5, 4)  # as ../shared/data/README.md says
    args = ["data", "check", f"model.name_or_path={llama_dir}", f"data.train_path={path}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    print("\n" + out)
    assert "implicit format, 2312 rows, 2303 pairs kept, 9 dropped" in out
    assert f"dropped 5 {DIALOGUES_DIFFER} (rows {', '.join(map(str, differ))})" in out
    assert f"dropped 4 {EMPTY_RESPONSE} (rows {', '.join(map(str, empty))})" in out
    for index in differ:
        assert f"line {index + 1} (row {index}): the transcripts differ at character" in out
    for index in empty:
        assert f"line {index + 1} (row {index}): the chosen response is empty" in out
    assert out.rstrip().endswith("data check: usable (train 2303 pairs)")

    assert main(args + ["data.strict=true"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    first = min(differ + empty)
    assert error.startswith(f"error: {path}: line {first + 1} (row {first}): the chosen response is empty")
