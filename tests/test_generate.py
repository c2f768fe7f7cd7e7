"""`lora-dpo generate`: held-out completions from the policy and its reference, on the demo run."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch

from lora_dpo.batching import pad_id_of
from lora_dpo.cli import main
from lora_dpo.config import load_config
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.generate import (
    GenerationSettings,
    cut_at_stop,
    generate_completions,
    held_out_prompts,
    left_pad,
    stop_token_ids,
)
from lora_dpo.model import load_adapter, load_base_model, load_tokenizer
from lora_dpo.samples import read_samples

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, run once: a taught reference and a DPO policy that prefers kind words."""
    from lora_dpo.demo import run_demo

    workdir = tmp_path_factory.mktemp("generate-demo")
    demo = run_demo(workdir)
    return demo.train.output_dir


@pytest.fixture(scope="module")
def config(demo_run):
    return load_config(demo_run / "config.yaml")


@pytest.fixture(scope="module")
def policy(config, demo_run):
    """The 4-bit base with the demo's adapter (fp32 compute on the CPU), and the held-out prompts."""
    tokenizer = load_tokenizer(config.model)
    pairs, _ = load_preference_data(config.data, tokenizer, "eval")
    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=CPU)
    return load_adapter(base, demo_run / "adapter"), tokenizer, held_out_prompts(pairs, 10)


def test_generate_writes_samples_of_policy_and_reference(config, demo_run, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--config",
                str(demo_run / "config.yaml"),
                "--adapter",
                str(demo_run),
                "--prompts",
                "6",
                "--max-new-tokens",
                "24",
            ]
        )
        == 0
    )
    samples = read_samples(demo_run / "samples.jsonl")
    lines = (demo_run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == len(lines) == 6
    assert set(json.loads(lines[0])) == {
        "step",
        "index",
        "prompt",
        "reference",
        "policy",
        "reference_tokens",
        "policy_tokens",
        "reference_finished",
        "policy_finished",
    }
    assert [s.index for s in samples] == list(range(6)) and {s.step for s in samples} == {24}
    # the eval split's first distinct prompts, in the data's order
    rows = [json.loads(line) for line in open(config.data.eval_path)]
    distinct = list(dict.fromkeys(row["prompt"] for row in rows))[:6]
    assert [s.prompt for s in samples] == distinct
    assert all(s.reference_finished and s.policy_finished for s in samples)
    assert any(s.policy != s.reference for s in samples)  # DPO changed what it writes
    markdown = (demo_run / "samples.md").read_text()
    assert "| prompt | reference | policy |" in markdown
    assert all(s.policy in markdown and s.reference in markdown for s in samples)
    printed = capsys.readouterr().out
    assert "| prompt | reference | policy |" in printed and str(demo_run / "samples.jsonl") in printed

    # greedy is deterministic: a second run (to --out) writes the same samples
    assert (
        main(
            [
                "generate",
                "--config",
                str(demo_run / "config.yaml"),
                "--adapter",
                str(demo_run / "adapter"),
                "--prompts",
                "6",
                "--max-new-tokens",
                "24",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert (tmp_path / "again" / "samples.jsonl").read_text() == (demo_run / "samples.jsonl").read_text()


def test_completions_stop_at_eos_and_say_when_they_ran_out(policy):
    model, tokenizer, prompts = policy
    eos = tokenizer.eos_token_id
    settings = GenerationSettings(max_new_tokens=24)
    done = generate_completions(model, tokenizer, prompts, settings, [eos], pad_id_of(tokenizer), CPU)
    assert all(c.finished for c in done)
    for c in done:
        assert c.ids[-1] == eos and eos not in c.ids[:-1]  # cut right after the first EOS
        assert c.text == tokenizer.decode(c.ids[:-1]) and tokenizer.eos_token not in c.text
    short = generate_completions(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=3), [eos], pad_id_of(tokenizer), CPU
    )
    assert all(not c.finished and len(c.ids) == 3 for c in short)
    assert [c.ids for c in short] == [c.ids[:3] for c in done]


def test_left_padding_generates_what_each_prompt_alone_does(policy):
    """Batched prompts of different lengths, left-padded with pad == eos: every completion is
    exactly the one the prompt gets alone (greedy, fp32 compute), for the policy and the
    reference."""
    model, tokenizer, prompts = policy
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap is armed
    stops, pad_id = [tokenizer.eos_token_id], pad_id_of(tokenizer)
    batched = GenerationSettings(max_new_tokens=24, batch_size=len(prompts))
    alone = GenerationSettings(max_new_tokens=24, batch_size=1)
    for adapter_on in (True, False):
        with contextlib.nullcontext() if adapter_on else model.disable_adapter():
            together = generate_completions(model, tokenizer, prompts, batched, stops, pad_id, CPU)
            one_by_one = generate_completions(model, tokenizer, prompts, alone, stops, pad_id, CPU)
        assert [c.ids for c in together] == [c.ids for c in one_by_one]


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(policy):
    model, tokenizer, prompts = policy
    stops, pad_id = [tokenizer.eos_token_id], pad_id_of(tokenizer)

    def sample(seed: int) -> list[tuple[int, ...]]:
        settings = GenerationSettings(max_new_tokens=24, sample=True, temperature=1.0, seed=seed)
        return [
            c.ids for c in generate_completions(model, tokenizer, prompts * 2, settings, stops, pad_id, CPU)
        ]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample(1)
    assert torch.equal(torch.get_rng_state(), state)  # training's dropout and data order are untouched
    assert sample(1) == first
    assert sample(2) != first


def test_prompts_are_the_first_distinct_ones_in_data_order():
    def pair(prompt: tuple[int, ...], index: int) -> TokenizedPair:
        return TokenizedPair(prompt, (7, 2), (8, 2), index)

    pairs = [pair((1, 5), 0), pair((1, 6), 1), pair((1, 5), 2), pair((1, 4), 3), pair((1, 6), 4)]
    assert held_out_prompts(pairs, 10) == [(1, 5), (1, 6), (1, 4)]
    assert held_out_prompts(pairs, 2) == [(1, 5), (1, 6)]


def test_left_pad_masks_from_lengths_even_where_a_prompt_holds_the_pad_id():
    input_ids, mask = left_pad([(1, 2, 0), (0,)], pad_id=0)  # pad id 0 inside a real prompt
    assert input_ids.tolist() == [[1, 2, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([5, 6, 2, 7, 2], [2, 9]) == ((5, 6, 2), True)
    assert cut_at_stop([5, 9, 2], [2, 9]) == ((5, 9), True)
    assert cut_at_stop([5, 6], [2]) == ((5, 6), False)


def test_chat_data_also_stops_at_the_templates_end_of_turn(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    eos = tokenizer.eos_token_id
    assert stop_token_ids(tokenizer, conversational=True) == [eos]  # its turns end with EOS itself
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert stop_token_ids(tokenizer, conversational=True) == [eos, end]
    assert stop_token_ids(tokenizer, conversational=False) == [eos]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0.7"], "--temperature: a sampling setting, and --sample is not given"),
        (["--sample", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--prompts", "0"], "--prompts 0: must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    assert main(["generate", "--adapter", str(tmp_path), *flags, "data.eval_path=x.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_an_adapter_path_without_an_adapter_is_a_one_line_error(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(tmp_path),
                "data.eval_path=x.jsonl",
                f"model.name_or_path={tmp_path}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == f"error: --adapter {tmp_path}: no adapter_config.json there or in {tmp_path / 'adapter'}"


def test_eval_judges_the_policy_against_the_reference_with_a_reward_model(config, demo_run, tmp_path, capsys):
    """`lora-dpo eval` with train.reward_model: eval/win_rate and eval/score_gain equal what the
    reward model's known scores give on the completions `lora-dpo generate` writes for the same
    prompts and length (greedy: the same completions)."""
    from lora_dpo.demo.models import build_last_token_reward_model

    tokenizer = load_tokenizer(config.model)
    token_scores = torch.tensor(
        [(token * 7919) % 11 - 5.0 for token in range(len(tokenizer))]
    )  # fixed, varied
    judge_dir = build_last_token_reward_model(tmp_path / "rm", tokenizer, token_scores)
    # 3 new tokens: completions stop mid-description, so their last tokens differ
    assert (
        main(
            [
                "generate",
                "--config",
                str(demo_run / "config.yaml"),
                "--adapter",
                str(demo_run),
                "--prompts",
                "8",
                "--max-new-tokens",
                "3",
                "--out",
                str(tmp_path / "samples"),
            ]
        )
        == 0
    )
    samples = read_samples(tmp_path / "samples" / "samples.jsonl")

    def score(text: str) -> float:
        return token_scores[tokenizer(text)["input_ids"][-1]].item() / (1 + 1e-6) ** 0.5

    gains = [score(s.prompt + s.policy) - score(s.prompt + s.reference) for s in samples]
    expected_rate = sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gains) / len(gains)
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--config",
                str(demo_run / "config.yaml"),
                "--adapter",
                str(demo_run / "adapter"),
                f"train.reward_model={judge_dir}",
                "train.generate_prompts=8",
                "train.generate_max_new_tokens=3",
            ]
        )
        == 0
    )
    printed = dict(
        line.split(": ") for line in capsys.readouterr().out.splitlines() if line.startswith("eval/")
    )
    assert float(printed["eval/win_rate"]) == pytest.approx(expected_rate, abs=1e-4)
    assert float(printed["eval/score_gain"]) == pytest.approx(sum(gains) / len(gains), abs=1e-4)
    assert expected_rate != 0.5  # the check can tell a judged policy from an unjudged one


def test_report_shows_the_samples_and_judges_them(demo_run):
    """After `lora-dpo generate`, `lora-dpo report` has a Samples section (reference vs policy)
    and the two generation checks, judged and quiet on the demo's healthy policy."""
    assert (
        main(
            [
                "generate",
                "--config",
                str(demo_run / "config.yaml"),
                "--adapter",
                str(demo_run),
                "--prompts",
                "7",
                "--max-new-tokens",
                "24",
            ]
        )
        == 0
    )
    samples = read_samples(demo_run / "samples.jsonl")
    assert main(["report", str(demo_run)]) == 0
    text = (demo_run / "report.md").read_text()
    section = text[text.index("## Samples") : text.index("## Config")]
    assert "first 5 held-out prompts" in section and "Step 24:" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "| prompt |" not in line]
    assert len(rows) == 5
    for sample, row in zip(samples, rows):
        assert row == f"| {sample.prompt.replace(chr(10), '⏎')} | {sample.reference} | {sample.policy} |"
    assert "| generated length | ok | mean " in text and "| repetition | ok | repeated word 4-grams" in text


# ---- during training: train.generate_every and train.reward_model ---------------------------

RM_SCORES = lambda vocab: torch.tensor([(token * 7919) % 11 - 5.0 for token in range(vocab)])  # noqa: E731


@pytest.fixture(scope="module")
def train_root(demo_workdir, tmp_path_factory):
    """The demo's random tiny model and data with a cache over 48 train and 48 eval pairs, and a
    reward model whose score of a text is RM_SCORES[its last token]."""
    from lora_dpo.demo.models import build_last_token_reward_model
    from precompute import precompute_reference

    root = tmp_path_factory.mktemp("train-samples")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    precompute_reference(sample_config(root, root / "unused"))
    tokenizer = load_tokenizer(sample_config(root, root / "unused").model)
    build_last_token_reward_model(root / "rm", tokenizer, RM_SCORES(len(tokenizer)))
    return root


def sample_config(root, output_dir, **train):
    from lora_dpo.demo import demo_config

    config = demo_config(root)
    config.data.max_pairs = 48
    config.precompute.cache_dir = str(root / "cache")
    config.train.output_dir = str(output_dir)
    config.train.overwrite_output_dir = False
    config.train.per_device_batch_size = 8
    config.train.max_steps = 6
    config.train.logging_steps = 2
    config.train.save_steps = 0
    config.train.generate_prompts = 3
    config.train.generate_max_new_tokens = 3  # cut mid-text: the last tokens, hence the scores, vary
    for key, value in train.items():
        setattr(config.train, key, value)
    config.validate()
    return config


def test_training_writes_samples_and_judges_every_eval(train_root, tmp_path):
    from lora_dpo.report import read_metrics
    from lora_dpo.run.directory import RunDirectory, RunState
    from lora_dpo.train import train

    run = tmp_path / "run"
    result = train(
        sample_config(train_root, run, generate_every=4, eval_steps=3, reward_model=str(train_root / "rm"))
    )
    samples = read_samples(run / "samples.jsonl")
    assert [(s.step, s.index) for s in samples] == [
        (step, i) for step in (4, 6) for i in range(3)
    ]  # and the end
    assert samples[0].reference == samples[3].reference  # the reference never changes
    assert "Step 4:" in (run / "samples.md").read_text()
    assert RunDirectory(run).state() is RunState.FINISHED and RunDirectory(run).foreign_entries() == []

    evals = {int(r["step"]): r for r in read_metrics(run / "metrics.jsonl").evals}
    assert sorted(evals) == [0, 3, 6]
    assert (
        evals[0]["eval/win_rate"] == 0.5 and evals[0]["eval/score_gain"] == 0.0
    )  # the policy is the reference
    tokenizer = load_tokenizer(sample_config(train_root, run).model)
    scores = RM_SCORES(len(tokenizer))

    def score(text: str) -> float:
        return scores[tokenizer(text)["input_ids"][-1]].item()

    final = [s for s in samples if s.step == 6]  # the same prompts and length as the judge's
    gains = [score(s.prompt + s.policy) - score(s.prompt + s.reference) for s in final]
    assert evals[6]["eval/win_rate"] == sum(1.0 if g > 0 else 0.5 if g == 0 else 0.0 for g in gains) / 3
    assert evals[6]["eval/score_gain"] == pytest.approx(sum(gains) / 3 / (1 + 1e-6) ** 0.5, abs=1e-5)
    assert result.eval_after.win_rate == evals[6]["eval/win_rate"]

    report = (run / "report.md").read_text()
    assert "## Samples" in report and "Step 6:" in report and "Step 4:" not in report.split("## Samples")[1]
    assert "| generated length |" in report and "| repetition |" in report
    assert "eval/win_rate" in report

    # the saved adapter writes what the policy wrote at the last step (the training layout's
    # attention was switched back and forth around each generation)
    assert (
        main(
            [
                "generate",
                "--config",
                str(run / "config.yaml"),
                "--adapter",
                str(run),
                "--prompts",
                "3",
                "--max-new-tokens",
                "3",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    again = read_samples(tmp_path / "again" / "samples.jsonl")
    assert [(s.reference, s.policy) for s in again] == [(s.reference, s.policy) for s in final]


def test_generating_during_training_does_not_change_the_training(train_root, tmp_path):
    """Greedy generation draws no random numbers and restores train mode and attention: the
    losses of a run with samples at every step equal those of a run without (dropout on)."""
    from lora_dpo.train import train

    def losses(**settings) -> list[float]:
        config = sample_config(train_root, tmp_path / str(settings), logging_steps=1, **settings)
        config.lora.dropout = 0.1  # dropout draws from the RNG that generation must leave alone
        return [record["loss"] for record in train(config).history]

    assert losses(generate_every=1) == losses(generate_every=0)


def test_without_an_eval_split_a_run_says_it_has_no_prompts_to_complete(train_root, tmp_path, caplog):
    from lora_dpo.train import train

    config = sample_config(train_root, tmp_path / "run", generate_every=2, max_steps=2)
    config.data.eval_path = ""
    with caplog.at_level("WARNING"):
        train(config)
    assert "train.generate_every=2: no eval split (data.eval_path), so no samples" in caplog.text
    assert not (tmp_path / "run" / "samples.jsonl").exists()


def test_a_resumed_run_keeps_the_samples_up_to_its_checkpoint(train_root, tmp_path, monkeypatch):
    """Interrupted after step 5 (samples of steps 1-5 written, checkpoint at 4), then resumed:
    samples.jsonl ends as the uninterrupted run's (step 5 once, not twice)."""
    from lora_dpo.faults import FAIL_AT_STEP, InjectedFault
    from lora_dpo.train import train

    whole = tmp_path / "whole"
    train(sample_config(train_root, whole, generate_every=1))
    broken = sample_config(train_root, tmp_path / "broken", generate_every=1, save_steps=4)
    monkeypatch.setenv(FAIL_AT_STEP, "5")
    with pytest.raises(InjectedFault):
        train(broken)
    monkeypatch.delenv(FAIL_AT_STEP)
    assert {s.step for s in read_samples(tmp_path / "broken" / "samples.jsonl")} == {1, 2, 3, 4, 5}
    train(broken, resume=True)
    assert (tmp_path / "broken" / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()


def test_a_resume_may_change_what_is_generated(tmp_path):
    """Greedy generation draws no random numbers: the generation settings are not part of what
    a run computes, so --resume accepts (and records) new ones."""
    from lora_dpo.run.resume import check_resume

    saved = load_config(None, ["data.eval_path=e.jsonl"])
    keys = {
        "train.generate_every": 5,
        "train.generate_prompts": 2,
        "train.generate_max_new_tokens": 9,
        "train.reward_model": "rm",
    }
    asked = load_config(None, ["data.eval_path=e.jsonl", *(f"{k}={v}" for k, v in keys.items())])
    changes = check_resume(saved, asked, tmp_path)
    assert {key: change["resume"] for key, change in changes.items()} == keys
